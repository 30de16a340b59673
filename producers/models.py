"""The models a tenant may use, as OpenAI's ``/v1/models`` lists them, and how a model
name of the OpenAI-compatible endpoints (chat, completions, Batch lines) maps to a
provider and a model: an alias (``model_aliases``), ``provider|model``, or a model of the
default provider."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from config.settings import Settings
from jobs.validation import PROVIDER_DEFAULT_MODELS
from producers.auth import CallerDep
from producers.web import ApiError

router = APIRouter()


def resolve_model(settings: Settings, name: Any) -> dict[str, Any]:
    """The ``provider`` and ``model`` fields of a job for the public model ``name`` (a
    name that is not a string is passed on, for validation to name)."""
    if not isinstance(name, str):
        return {"model": name}
    target = settings.model_aliases.get(name, name)
    if "|" in target:
        provider, model = target.split("|", 1)
        return {"provider": provider, "model": model}
    return {"model": target}


def models_for(settings: Settings, tenant: str) -> list[dict[str, Any]]:
    """The models ``tenant`` may use, in OpenAI's shape: each alias, and each provider's
    allowed models (its default where any name is allowed) as ``provider|model``."""
    seen: dict[str, str] = {}
    for alias, target in settings.model_aliases.items():
        provider, _, model = target.partition("|")
        if model and settings.may_use(tenant, provider, model)[1]:
            seen[alias] = provider
    entries = settings.tenant_providers.get(tenant, settings.tenant_providers.get("*", []))
    explicit = [e for e in entries if "|" in e]
    for provider, default in PROVIDER_DEFAULT_MODELS.items():
        for model in settings.allowed_models.get(provider) or [default]:
            if settings.may_use(tenant, provider, model)[1]:
                seen[f"{provider}|{model}"] = provider
    for entry in explicit:
        seen.setdefault(entry, entry.split("|", 1)[0])
    return [{"id": model_id, "object": "model", "created": 0, "owned_by": owner}
            for model_id, owner in seen.items()]


@router.get("/v1/models", tags=["openai"])
async def list_models(request: Request, caller: CallerDep) -> dict[str, Any]:
    """The models the key's tenant may use (OpenAI's list shape)."""
    return {"object": "list", "data": models_for(request.app.state.settings, caller.tenant)}


@router.get("/v1/models/{model_id:path}", tags=["openai"])
async def get_model(model_id: Annotated[str, Path()], request: Request,
                    caller: CallerDep) -> dict[str, Any]:
    """One model the key's tenant may use; 404 for any other."""
    for model in models_for(request.app.state.settings, caller.tenant):
        if model["id"] == model_id:
            return model
    raise ApiError(404, "not_found", f"the model {model_id!r} does not exist or this key "
                   "may not use it; GET /v1/models lists the ones it may")
