"""The OpenAPI document, made to match what the API really does.

The job routes read their JSON body themselves (size limit, NaN refused, errors naming
``jobs.N.field``), so FastAPI cannot infer its schema: ``JobRequest`` and ``JobsRequest``
are added here. Errors are documented in the API's own shape (``{"error": ...}``) instead
of FastAPI's ``detail`` shape, on every route that answers them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from jobs.models import JobRequest


class FieldError(BaseModel):
    """One refused field."""

    field: str = Field(description="Dotted path of the field, e.g. `jobs.3.prompt`.")
    message: str


class ErrorBody(BaseModel):
    """What went wrong."""

    type: str = Field(description="invalid_request_error, authentication_error, "
                      "not_found_error, rate_limit_error, request_too_large, "
                      "service_unavailable, ...")
    message: str
    errors: list[FieldError] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    """Every error the API answers."""

    error: ErrorBody


class JobsRequest(BaseModel):
    """Many jobs in one request: all are accepted, or none."""

    jobs: list[JobRequest] = Field(min_length=1, description="At most "
                                   "`api_max_jobs_per_request` (10,000) jobs.")


#: Errors every authenticated route may answer.
_COMMON = {"401": "No API key, or one that is unknown, revoked or expired.",
           "422": "Invalid input; `errors` names each field.",
           "503": "Redis or the job store is unavailable; nothing was changed."}
_SPECIFIC = {("/v1/jobs", "post"): {"413": "The body or the number of jobs is over the limit.",
                                    "429": "The tenant's pending quota is full."},
             ("/v1/jobs/{job_id}", "get"): {"404": "No such job (or another tenant's)."},
             ("/v1/jobs/{job_id}/result", "get"): {"404": "No such job."},
             ("/v1/jobs/{job_id}", "delete"): {
                 "404": "No such job.",
                 "409": "Too late: the job started or ended (the error has its `state`)."}}


def _schemas() -> dict[str, Any]:
    """Component schemas of the models above, their nested models included."""
    out: dict[str, Any] = {}
    for model in (JobRequest, JobsRequest, ErrorResponse):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out


def build(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app``."""
    doc = get_openapi(title=app.title, version=app.version, description=app.description,
                      routes=app.routes)
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas.update(_schemas())
    error = {"content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path, methods in doc.get("paths", {}).items():
        for method, op in methods.items():
            responses = op.setdefault("responses", {})
            codes = dict(_SPECIFIC.get((path, method), {}))
            if op.get("security"):
                codes = {**_COMMON, **codes}
            elif "422" in responses:
                codes["422"] = _COMMON["422"]
            for code, text in codes.items():
                responses[code] = {"description": text, **error}
    return doc


def install_openapi(app: FastAPI) -> None:
    """Serve ``build(app)`` (computed once) as the app's OpenAPI document."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
