"""Admin routes of the watching side: ``GET /v1/admin/anomalies``, what ``promptbatch
status`` shows of anomalies, as JSON. Only an admin key may call them (anomalies name
every tenant's deployments)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from config import keys
from producers.auth import CallerDep, Forbidden

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def _read(r: Any, recent: int, baselines: bool) -> dict[str, Any]:
    pipe = r.pipeline(transaction=False)
    pipe.hgetall(keys.ANOMALIES)
    pipe.zrevrange(keys.ANOMALIES_RECENT, 0, recent - 1)
    if baselines:
        pipe.hgetall(keys.BASELINES)
    found = pipe.execute()
    active = sorted((json.loads(v) for v in found[0].values()),
                    key=lambda a: -float(a["raised_at"]))
    out: dict[str, Any] = {"object": "anomalies", "active": active,
                           "recent": [json.loads(v) for v in found[1]]}
    if baselines:
        rows = []
        for name, raw in sorted(found[2].items()):
            signal, provider, model, replica, size_class = str(name).split("|")
            rows.append({"signal": signal, "provider": provider, "model": model,
                         "replica": replica, "size_class": int(size_class),
                         **json.loads(raw)})
        out["baselines"] = rows
    return out


@router.get("/anomalies")
async def anomalies(request: Request, caller: CallerDep,
                    recent: int = Query(default=50, ge=1, le=1000),
                    baselines: bool = False) -> dict[str, Any]:
    """The anomalies active now (newest first), the last ``recent`` that cleared, and
    with ``baselines=true`` the learned baselines they are judged against (levels of
    latency, time to first token and tokens/s are natural logs of their values, per
    batch-size class)."""
    if not caller.admin:
        raise Forbidden("only an admin key may read the anomalies")
    client = request.app.state.client
    return await run_in_threadpool(_read, client.r, recent, baselines)
