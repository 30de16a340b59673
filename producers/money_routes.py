"""Money routes: what was spent and saved (``GET /v1/spend``: a tenant's key sees its own
tenant's, an admin key any tenant's or all), and the budgets of tenants and keys (admin
keys only: ``/v1/admin/budgets``), as ``promptbatch spend`` and ``promptbatch tenants
budget`` / ``keys budget`` show and set them."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from jobs import budgets, ledger
from producers.auth import CallerDep, Forbidden
from producers.web import ApiError, client_of

router = APIRouter(tags=["money"])

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def _day(field: str, value: str | None) -> str | None:
    if value is not None and not _DAY.match(value):
        raise ApiError(422, "invalid_request_error", f"{field} must be a day as YYYY-MM-DD",
                       [{"field": field, "message": "a day as YYYY-MM-DD"}])
    return value


def budget_view(b: budgets.Budget) -> dict[str, Any]:
    """A budget as the API shows it."""
    return {"scope": b.scope, "name": b.name, "limit_usd": b.limit_usd, "period": b.period,
            "spent_usd": round(b.spent_usd, 6), "reserved_usd": round(b.reserved_usd, 6),
            "resets_at": b.resets_at}


def total_view(t: ledger.Total) -> dict[str, Any]:
    """One group's spend and savings as the API shows them."""
    return {"group": t.group, "jobs": t.jobs, "unpriced_jobs": t.unpriced,
            "prompt_tokens": t.prompt_tokens, "cached_tokens": t.cached_tokens,
            "completion_tokens": t.completion_tokens, "cost_usd": round(t.cost_usd, 6),
            "saved_usd": round(t.saved_total, 6),
            "saved_by_reason": {k: round(v, 6) for k, v in sorted(t.saved_usd.items())}}


@router.get("/v1/spend")
async def spend(request: Request, caller: CallerDep,
                by: Annotated[Literal["day", "deployment", "key", "tenant"], Query(
                    description="How to group: day, deployment, key or tenant.")] = "day",
                tenant: Annotated[str | None, Query(
                    description="Admin keys: this tenant's (default: every tenant's).")]
                = None,
                since: Annotated[str | None, Query(
                    description="The first day (UTC, YYYY-MM-DD).")] = None,
                until: Annotated[str | None, Query(
                    description="The last day (UTC, YYYY-MM-DD).")] = None,
                ) -> dict[str, Any]:
    """What was spent and saved, summed per day, deployment, key or tenant, with the
    budgets that apply."""
    if not caller.admin:
        if tenant not in (None, caller.tenant):
            raise Forbidden(f"this API key belongs to tenant {caller.tenant!r}; only an "
                            "admin key may read another tenant's spend")
        tenant = caller.tenant
    engine = client_of(request).store.engine
    rows = await run_in_threadpool(lambda: ledger.totals(
        engine, by=by, tenant=tenant, since=_day("since", since), until=_day("until", until)))
    found = await run_in_threadpool(budgets.get_budgets, engine)
    if tenant is not None:
        found = [b for b in found if (b.scope == "tenant" and b.name == tenant)
                 or (b.scope == "key" and not caller.admin and b.name == caller.key)]
    return {"object": "spend", "by": by, "tenant": tenant, "since": since, "until": until,
            "data": [total_view(t) for t in rows],
            "cost_usd": round(sum(t.cost_usd for t in rows), 6),
            "saved_usd": round(sum(t.saved_total for t in rows), 6),
            "budgets": [budget_view(b) for b in found]}


class BudgetBody(BaseModel):
    """A budget to set."""

    limit_usd: float = Field(ge=0, allow_inf_nan=False,
                             description="The most to spend per period, in US dollars.")
    period: Literal["day", "month", "none"] = Field(
        default="month", description="day or month (UTC), or none (it never resets).")


def _admin(caller: Any) -> None:
    if not caller.admin:
        raise Forbidden("only an admin key may read or set budgets")


@router.get("/v1/admin/budgets")
async def list_budgets(request: Request, caller: CallerDep) -> dict[str, Any]:
    """Every budget, with its spend in the current period and what is reserved."""
    _admin(caller)
    found = await run_in_threadpool(budgets.get_budgets, client_of(request).store.engine)
    return {"object": "list", "data": [budget_view(b) for b in found]}


@router.put("/v1/admin/budgets/{scope}/{name}")
async def set_budget(scope: Literal["tenant", "key"], name: str, body: BudgetBody,
                     request: Request, caller: CallerDep) -> dict[str, Any]:
    """Set the budget of a tenant, or of a key (by its prefix, as keys are listed)."""
    _admin(caller)
    engine = client_of(request).store.engine
    if scope == "key" and not await run_in_threadpool(request.app.state.accounts.has_prefix,
                                                      name):
        raise ApiError(404, "not_found", f"no stored key has the prefix {name!r} (GET "
                       "/v1/admin/keys lists them)",
                       [{"field": "name", "message": "not a stored key's prefix"}])
    found = await run_in_threadpool(budgets.set_budget, engine, scope, name, body.limit_usd,
                                    body.period)
    return budget_view(found)


@router.delete("/v1/admin/budgets/{scope}/{name}")
async def remove_budget(scope: Literal["tenant", "key"], name: str, request: Request,
                        caller: CallerDep) -> dict[str, Any]:
    """Remove a budget (its tenant or key then spends without a limit)."""
    _admin(caller)
    done = await run_in_threadpool(budgets.remove_budget, client_of(request).store.engine,
                                   scope, name)
    if not done:
        raise ApiError(404, "not_found", f"no budget for {scope} {name!r}")
    return {"scope": scope, "name": name, "deleted": True}
