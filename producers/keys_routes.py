"""Admin routes for API keys: list, create, rotate and revoke, as `promptbatch keys` does.
Only an admin key may call them; a revoked key is refused by every API process from its
next request (keys are read from SQL on each request). A key is revoked by its prefix,
never by the whole key in a URL (access logs keep URLs: one sent by mistake is refused,
and the access log keeps only its prefix)."""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from producers.accounts import PREFIX_CHARS, Accounts, KeyError_, KeyInfo
from producers.auth import Caller, CallerDep, Forbidden
from producers.web import ApiError

router = APIRouter(prefix="/v1/admin/keys", tags=["keys"])

#: A revoking URL's last segment when it is longer than a prefix (a whole key, sent by
#: mistake): the access log keeps only its prefix.
_WHOLE_KEY_PATH = re.compile(rf"(/v1/admin/keys/[^/?#]{{{PREFIX_CHARS}}})[^/?#]+")


class _HideKeys(logging.Filter):
    """Cuts a whole key in a revoking URL down to its prefix in uvicorn's access log
    (whose records carry ``(client, method, path, http version, status)``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) > 2 and isinstance(args[2], str):
            record.args = (*args[:2], _WHOLE_KEY_PATH.sub(r"\1...", args[2]), *args[3:])
        return True


def hide_keys_in_access_log() -> None:
    """Install ``_HideKeys`` on uvicorn's access log (once; after logging is set up)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _HideKeys) for f in access.filters):
        access.addFilter(_HideKeys())


class NewKey(BaseModel):
    """A key to create."""

    tenant: str = Field(min_length=1, max_length=64)
    admin: bool = False
    expires_in_days: float | None = Field(default=None, gt=0)


class Rotation(BaseModel):
    """A tenant whose keys to rotate."""

    tenant: str = Field(min_length=1, max_length=64)
    admin: bool = False
    grace_hours: float = Field(default=24.0, ge=0)


def _admin(caller: Caller, request: Request) -> Accounts:
    if not caller.admin:
        raise Forbidden("only an admin key may manage API keys")
    return request.app.state.accounts  # type: ignore[no-any-return]


def _shown(k: KeyInfo) -> dict[str, Any]:
    return {"prefix": k.prefix, "tenant": k.tenant, "admin": k.admin,
            "created_at": k.created_at, "last_used_at": k.last_used_at,
            "expires_at": k.expires_at, "revoked_at": k.revoked_at,
            "active": k.active(time.time())}


@router.get("")
async def list_keys(request: Request, caller: CallerDep,
                    tenant: str | None = None) -> dict[str, Any]:
    """Every stored key (never the keys themselves)."""
    accounts = _admin(caller, request)
    keys = await run_in_threadpool(accounts.list_keys, tenant)
    return {"object": "list", "data": [_shown(k) for k in keys]}


@router.post("", status_code=201)
async def create_key(body: NewKey, request: Request, caller: CallerDep) -> dict[str, Any]:
    """A new key, returned once."""
    accounts = _admin(caller, request)
    key = f"pb-{secrets.token_urlsafe(24)}"
    until = None if body.expires_in_days is None else time.time() + body.expires_in_days * 86400
    await run_in_threadpool(accounts.add_key, key, body.tenant, body.admin, until)
    return {"key": key, "tenant": body.tenant, "admin": body.admin, "expires_at": until}


@router.post("/rotate", status_code=201)
async def rotate_keys(body: Rotation, request: Request, caller: CallerDep) -> dict[str, Any]:
    """A new key for the tenant; its old keys work for ``grace_hours`` more."""
    accounts = _admin(caller, request)
    key = f"pb-{secrets.token_urlsafe(24)}"
    old = await run_in_threadpool(accounts.rotate, body.tenant, key, body.grace_hours * 3600,
                                  body.admin)
    return {"key": key, "tenant": body.tenant, "admin": body.admin, "old_keys": old,
            "old_keys_expire_at": time.time() + body.grace_hours * 3600}


@router.delete("/{prefix}")
async def revoke_key(prefix: str, request: Request, caller: CallerDep) -> dict[str, Any]:
    """Revoke a key named by its prefix (6 to 11 characters, as the list shows it). A
    whole key is refused: a URL is written to access logs."""
    accounts = _admin(caller, request)
    if len(prefix) > PREFIX_CHARS:
        raise ApiError(422, "invalid_request_error", (
            f"DELETE /v1/admin/keys/{{prefix}} takes a key's prefix (at most {PREFIX_CHARS} "
            "characters, as GET /v1/admin/keys lists them), never a whole key: a URL is "
            "written to access logs. Nothing was revoked; send DELETE "
            f"/v1/admin/keys/{prefix[:PREFIX_CHARS]} to revoke the key that starts so"))
    try:
        info = await run_in_threadpool(accounts.revoke, prefix)
    except KeyError_ as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    return _shown(info)
