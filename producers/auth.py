"""Who is calling: the API key of a request, its tenant, and whether it is an admin key.

A key is sent as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` (both declared in
the OpenAPI document, so ``/docs`` has an Authorize button). Keys come from the settings
(``api_keys``: key -> tenant; ``api_admin_keys``: key -> tenant, for admin keys) or from
the SQL table ``api_keys`` (``promptbatch keys add TENANT [--admin]``; only SHA-256 is
stored). A tenant key acts for its own tenant only; an admin key (a backend service that
submits on behalf of its customers, or the operator) may name any tenant in a job and
read any tenant's jobs.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from config.settings import Settings

bearer = HTTPBearer(auto_error=False, scheme_name="bearer",
                    description="Your promptbatch API key: `Authorization: Bearer <key>`.")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="apiKey",
                              description="Your promptbatch API key, as `X-API-Key: <key>`.")


#: An Authorization scheme safe to name in a message: a short word of letters (Basic,
#: Token, ...); anything else may be a key, and is not repeated.
_SCHEME = re.compile(r"[A-Za-z]{1,12}")


class Unauthorized(Exception):
    """Raised when a request carries no key, or one that is unknown, revoked or expired."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Forbidden(Exception):
    """Raised when a key asks for what only an admin key may do (HTTP 403)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class Caller:
    """The tenant a request acts for, and whether its key is an admin key."""

    tenant: str
    admin: bool = False
    #: The key's shown prefix (a stored key's ``pb-...``; a key from the settings:
    #: ``env-`` and the start of its SHA-256): what its jobs and spend are recorded under.
    key: str | None = None

    @property
    def scope(self) -> str | None:
        """The tenant reads are limited to (None: an admin key reads every tenant)."""
        return None if self.admin else self.tenant

    def scope_to(self, tenant: str | None) -> str | None:
        """The scope of a read that names ``tenant``: an admin key's choice; a tenant key
        reads only its own (``Forbidden`` for another)."""
        if tenant is None or tenant == self.tenant:
            return tenant if self.admin else self.tenant
        if not self.admin:
            raise Forbidden(f"this API key belongs to tenant {self.tenant!r}; only an admin "
                            "key may read another tenant's jobs")
        return tenant


def _match(key: str, table: dict[str, str]) -> str | None:
    for known, tenant in table.items():
        if hmac.compare_digest(known.encode(), key.encode()):
            return tenant
    return None


async def caller_of(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None,
    header_key: Annotated[str | None, Security(api_key_header)] = None,
) -> Caller:
    """The caller of a request; ``Unauthorized`` (HTTP 401) without a known key."""
    key = credentials.credentials if credentials is not None else (header_key or "")
    if not key:
        raise Unauthorized(_missing(request.headers.get("authorization")))
    settings: Settings = request.app.state.settings
    tenant = _match(key, settings.api_admin_keys)
    if tenant is not None:
        return Caller(tenant, admin=True, key=settings_key_id(key))
    tenant = _match(key, settings.api_keys)
    if tenant is not None:
        return Caller(tenant, key=settings_key_id(key))
    accounts = request.app.state.accounts
    found = await run_in_threadpool(accounts.holder_of, key)
    if found is None:
        why = await run_in_threadpool(accounts.refusal, key)
        raise Unauthorized(why or "unknown API key: check the key you send, or ask the "
                           "operator of this service for one")
    return Caller(found[0], admin=found[1], key=found[2])


def settings_key_id(key: str) -> str:
    """What a key from the settings is recorded as (never the key or a part of it)."""
    return "env-" + hashlib.sha256(key.encode()).hexdigest()[:8]


def _missing(authorization: str | None) -> str:
    """What is wrong with a request that brought no key: no header, or an Authorization
    header in another form than ``Bearer <key>`` (never echoing what may be a key)."""
    send = "send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    if not authorization or not authorization.strip():
        return f"missing API key: {send}"
    parts = authorization.split(None, 1)
    if len(parts) == 1:
        if parts[0].lower() == "bearer":
            return f"the Authorization header has the Bearer scheme but no key: {send}"
        return ("the Authorization header has no scheme: put 'Bearer' and a space before "
                f"the key ({send})")
    scheme = parts[0]
    named = f" {scheme!r}" if _SCHEME.fullmatch(scheme) else ""
    return f"the Authorization header's scheme{named} is not Bearer: {send}"


CallerDep = Annotated[Caller, Depends(caller_of)]

#: ``?tenant=``: an admin key's choice of tenant, where an id may name several tenants'
#: jobs (their own ``client_id``).
TenantQuery = Annotated[str | None, Query(
    description="Admin keys: the tenant whose job is meant, when several tenants use the "
    "same id of their own (client_id).")]
