"""The models a tenant may use, as OpenAI's ``/v1/models`` lists them, and how a model
name of the OpenAI-compatible endpoints (chat, completions, Batch lines) maps to a
provider and a model: an alias (``model_aliases``), ``provider|model``, or a model of the
default provider.

Only deployments this API's settings can call are listed, and a job for another is
refused at submit, naming the setting that is missing (``missing_setting``): a vendor's
own API needs its key; a base URL to another host (a vLLM, SGLang or llama.cpp server, a
proxy) needs none. The API decides from its own settings: give it the same provider
settings as the workers.
"""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Path, Request

from config.settings import Settings
from jobs.models import JobSpec
from jobs.validation import PROVIDER_DEFAULT_MODELS
from producers.auth import CallerDep
from producers.web import ApiError

router = APIRouter()

#: Providers that need a key to reach their vendor's API: the vendor's host, and the
#: settings of the key and of the base URL.
_KEYED = {
    "openai": ("api.openai.com", "PROMPTBATCH_OPENAI_API_KEY", "PROMPTBATCH_OPENAI_BASE_URL"),
    "anthropic": ("api.anthropic.com", "PROMPTBATCH_ANTHROPIC_API_KEY",
                  "PROMPTBATCH_ANTHROPIC_BASE_URL"),
}


def missing_setting(settings: Settings, provider: str) -> str | None:
    """The setting ``provider`` lacks to be called (its API key), or None when it can be
    called: it needs no key, has one, or has an address other than its vendor's API."""
    if provider not in _KEYED:
        return None
    host, key_env, _ = _KEYED[provider]
    key = settings.openai_api_key if provider == "openai" else settings.anthropic_api_key
    if key.get_secret_value():
        return None
    base = settings.openai_base_url if provider == "openai" else settings.anthropic_base_url
    urls = [url for url, _, _ in settings.replicas(provider)] or [base]
    if any((urlsplit(url.strip()).hostname or "") != host for url in urls):
        return None
    return key_env


def uncallable(settings: Settings, spec: JobSpec) -> list[tuple[str, str]]:
    """The error of a job for a deployment these settings cannot call (none if it can)."""
    missing = missing_setting(settings, spec.provider)
    if missing is None:
        return []
    _, _, url_env = _KEYED[spec.provider]
    return [("provider", f"{spec.provider}|{spec.model} cannot be called: {missing} is not "
             f"set on this deployment (or set {url_env} to a server that needs no key)")]


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
    allowed models (its default where any name is allowed) as ``provider|model``; only of
    providers these settings can call (``missing_setting``)."""
    seen: dict[str, str] = {}
    callable_ = {p for p in PROVIDER_DEFAULT_MODELS if missing_setting(settings, p) is None}
    for alias, target in settings.model_aliases.items():
        provider, _, model = target.partition("|")
        if model and provider in callable_ and settings.may_use(tenant, provider, model)[1]:
            seen[alias] = provider
    entries = settings.tenant_providers.get(tenant, settings.tenant_providers.get("*", []))
    explicit = [e for e in entries if "|" in e and e.split("|", 1)[0] in callable_]
    for provider, default in PROVIDER_DEFAULT_MODELS.items():
        for model in settings.allowed_models.get(provider) or [default]:
            if provider in callable_ and settings.may_use(tenant, provider, model)[1]:
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
