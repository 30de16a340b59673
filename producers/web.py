"""What every family of API routes shares: the error shape and its handlers, the JSON
body reader, and the app's settings and client."""

from __future__ import annotations

import logging
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError

from config.settings import Settings
from jobs import jsonbody
from jobs.errors import (
    AmbiguousJob,
    BudgetExceeded,
    InvalidJob,
    JobNotFound,
    PromptBatchError,
    ServiceUnavailable,
    SubmitUnconfirmed,
    TenantQuotaExceeded,
)
from producers.auth import Forbidden, Unauthorized
from producers.client import Client

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raised inside a route to answer with a given status and message."""

    def __init__(self, status: int, kind: str, message: str,
                 errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.errors = errors or []
        self.headers = headers


#: Retry-After of a 503 (a Sentinel failover takes a few seconds; a restart about as long).
UNAVAILABLE_RETRY_AFTER_S = "2"


def error_response(status: int, kind: str, message: str,
           errors: list[dict[str, Any]] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"type": kind, "message": message}
    if errors:
        body["errors"] = errors
    return JSONResponse({"error": body}, status_code=status, headers=headers)


#: What to do about a body over each limit, by the setting that holds it.
_TOO_LARGE_ADVICE = {
    "api_max_request_bytes": "send images by http(s) URL rather than inline",
    "api_max_body_bytes": "send fewer jobs per request and images by http(s) URL rather "
                          "than inline",
    "api_max_file_bytes": "split the file into several batches",
}


def too_large(limit: int, setting: str) -> ApiError:
    """The 413 of a body over ``limit`` bytes (the ``setting`` that holds it): what the
    limit is and what to do."""
    advice = _TOO_LARGE_ADVICE.get(setting, "send less")
    message = (f"the body is over {limit} bytes ({setting}): {advice}, or raise "
               f"PROMPTBATCH_{setting.upper()} on the server")
    return ApiError(413, "request_too_large", message,
                    [{"field": "(body)", "message": message}])


async def read_json(request: Request, limit: int, setting: str) -> Any:
    """The request's JSON body: 413 over ``limit`` bytes (a declared length is refused
    before anything is read; the message names ``setting``, the limit's, and what to
    do), 400 if it is not UTF-8 JSON or nests deeper than ``api_max_json_depth``, 422
    for NaN, Infinity or a number out of range (naming its field)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise too_large(limit, setting)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit, setting)
        chunks.append(chunk)
    try:
        return jsonbody.parse(b"".join(chunks), settings_of(request).api_max_json_depth)
    except jsonbody.JsonRefused as exc:
        if exc.kind in ("constant", "number"):
            raise ApiError(422, "invalid_request_error", f"{exc.field}: {exc.message}",
                           [{"field": exc.field, "message": exc.message}]) from None
        raise ApiError(400, "invalid_body", f"the body is {exc.message}"
                       if exc.kind == "invalid" else exc.message,
                       [{"field": "(body)", "message": exc.message}]) from None


def bounded(value: Any, field: str, low: float, high: float, unit: str = "") -> float:
    """A number read from a request (a JSON number, or a header's or a query's text),
    within ``low`` to ``high``: a 422 naming ``field`` otherwise. Nothing converts it
    before its bounds are checked, so no size of number raises."""
    if isinstance(value, str):
        try:
            value = float(value.strip()) if len(value) <= 64 else None
        except ValueError:
            value = None
    ok = (not isinstance(value, bool) and isinstance(value, int | float)
          and low <= value <= high)  # NaN is never within bounds
    if not ok:
        message = f"must be a number from {_written(low)} to {_written(high)}{unit}"
        raise ApiError(422, "invalid_request_error", f"{field}: {message}",
                       [{"field": field, "message": message}])
    return float(value)


def _written(number: float) -> str:
    """A bound as a person writes it (86400, not 8.64e+04)."""
    return str(int(number)) if float(number).is_integer() else str(number)


def settings_of(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings  # type: ignore[no-any-return]


def client_of(request: Request) -> Client:
    """The app's client (Redis and SQL)."""
    return request.app.state.client  # type: ignore[no-any-return]


#: Plain words for the parser's errors of query parameters and headers, by pydantic's type.
_PLAIN_MESSAGES = {
    "int_parsing": "must be a whole number",
    "int_parsing_size": "a number too large",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "finite_number": "must be a finite number",
}

#: Errors answered with a status and a type, their message as it is.
_PLAIN: dict[type[Exception], tuple[int, str]] = {
    Unauthorized: (401, "authentication_error"),
    Forbidden: (403, "permission_error"),
    JobNotFound: (404, "not_found_error"),
    TenantQuotaExceeded: (429, "rate_limit_error"),
}


def _plain(status: int, kind: str) -> Any:
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        return error_response(status, kind, str(exc))
    return handler


def install_errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def apierror_response(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.kind, exc.message, exc.errors, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_parameters(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if p not in ("query", "path",
                                                                          "header", "body")),
                   "message": _PLAIN_MESSAGES.get(e["type"], str(e["msg"]))}
                  for e in exc.errors()]
        return error_response(422, "invalid_request_error",
                      "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors)

    @app.exception_handler(InvalidJob)
    async def invalid(_: Request, exc: InvalidJob) -> JSONResponse:
        return error_response(422, "invalid_request_error", str(exc),
                      [{"field": f, "message": m} for f, m in exc.errors])

    @app.exception_handler(AmbiguousJob)
    async def ambiguous(_: Request, exc: AmbiguousJob) -> JSONResponse:
        return JSONResponse({"error": {
            "type": "conflict", "message": str(exc), "tenants": exc.tenants,
            "errors": [{"field": "tenant", "message": "several tenants have a job with this "
                        "id: add ?tenant=NAME"}]}}, status_code=409)

    for kind, (status, name) in _PLAIN.items():
        app.add_exception_handler(kind, _plain(status, name))

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("dependency unavailable: %s", exc)
        reply = error_response(503, "service_unavailable", "Redis or the job store is "
                               "unavailable; nothing was changed, try again shortly")
        reply.headers["Retry-After"] = UNAVAILABLE_RETRY_AFTER_S
        return reply

    for kind in (ServiceUnavailable, redis.RedisError, SQLAlchemyError):
        app.add_exception_handler(kind, unavailable)

    @app.exception_handler(SubmitUnconfirmed)
    async def unconfirmed(_: Request, exc: SubmitUnconfirmed) -> JSONResponse:
        log.warning("submit unconfirmed: %s", exc)
        body = {"error": {"type": "service_unavailable", "message": str(exc),
                          "ids": exc.job_ids}}
        return JSONResponse(body, status_code=503,
                            headers={"Retry-After": UNAVAILABLE_RETRY_AFTER_S})

    @app.exception_handler(BudgetExceeded)
    async def over_budget(_: Request, exc: BudgetExceeded) -> JSONResponse:
        budget = {"scope": exc.scope, "name": exc.name, "limit_usd": exc.limit_usd,
                  "period": exc.period, "spent_usd": round(exc.spent_usd, 6),
                  "reserved_usd": round(exc.reserved_usd, 6),
                  "needed_usd": round(exc.needed_usd, 6), "resets_at": exc.resets_at}
        return JSONResponse({"error": {"type": "budget_exceeded", "message": str(exc),
                                       "budget": budget, "errors": []}}, status_code=402)

    @app.exception_handler(PromptBatchError)
    async def other(_: Request, exc: PromptBatchError) -> JSONResponse:
        return error_response(400, "invalid_request_error", str(exc))

    @app.exception_handler(TimeoutError)
    async def timeout(request: Request, exc: TimeoutError) -> Response:
        return await unavailable(request, exc)

    _install_last_resorts(app)


def _install_last_resorts(app: FastAPI) -> None:
    """Whatever a request raises that no route expected: never a bare traceback."""

    @app.exception_handler(RecursionError)
    async def too_deep(_: Request, exc: RecursionError) -> JSONResponse:
        return error_response(400, "invalid_body", "the request nests too deeply",
                              [{"field": "(body)", "message": "nested too deeply"}])

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug of ours, never the caller's: logged with its traceback here, and answered
        # in the API's error shape without one.
        log.error("unexpected error in %s %s", request.method, request.url.path,
                  exc_info=exc)
        return error_response(500, "internal_error", "an unexpected error; it was logged. "
                              "Nothing was changed unless the response said so; try again")
