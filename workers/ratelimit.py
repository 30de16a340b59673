"""Shared rate limits: token buckets in Redis, one Lua step on the server's clock.

Limits are set per ``provider|model`` (or per provider) in ``Settings.rate_limits``:
``rpm`` (requests per minute) and ``tpm`` (tokens per minute: estimated prompt tokens
plus ``max_tokens``), optionally per tenant. Every worker takes from the same buckets, and
waits for budget rather than sending into a 429.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import redis

from config import keys
from config.settings import Settings
from jobs import lua
from workers import metrics


@dataclass(frozen=True, slots=True)
class Limit:
    """Requests and tokens per minute (0: no limit of that kind)."""

    rpm: float = 0.0
    tpm: float = 0.0
    per_tenant: bool = False


def limit_for(settings: Settings, deployment: str) -> Limit | None:
    """The limit of ``provider|model``, else of its provider, else None."""
    raw = settings.rate_limits.get(deployment) or settings.rate_limits.get(
        deployment.split("|", 1)[0])
    if not raw:
        return None
    return Limit(rpm=float(raw.get("rpm", 0)), tpm=float(raw.get("tpm", 0)),
                 per_tenant=bool(raw.get("per_tenant", 0)))


class RateLimiter:
    """Takes budget from the shared buckets, waiting while there is none."""

    def __init__(self, client: redis.Redis, settings: Settings,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self._take = client.register_script(lua.source("take_tokens"))
        self.clock = clock
        self.sleep = sleep

    def fits(self, deployment: str, requests: int, tokens: int) -> bool:
        """Whether one take of this size can ever succeed (else: send fewer at once)."""
        return self.fits_shares(deployment, {"": (requests, tokens)})

    def fits_shares(self, deployment: str, shares: Mapping[str, tuple[int, int]]) -> bool:
        """Whether one take of a call with these ``shares`` (``acquire_shares``) can ever
        succeed: under a per-tenant limit, each tenant's share against its own bucket."""
        limit = limit_for(self.settings, deployment)
        if limit is None:
            return True
        return all((not limit.rpm or requests <= limit.rpm)
                   and (not limit.tpm or tokens <= limit.tpm)
                   for requests, tokens in _scoped(limit, shares).values())

    def acquire(self, deployment: str, tenant: str, requests: int, tokens: int,
                deadline: float | None) -> bool:
        """Take budget for a call of one tenant's requests (``acquire_shares``)."""
        return self.acquire_shares(deployment, {tenant: (requests, tokens)}, deadline)

    def acquire_shares(self, deployment: str, shares: Mapping[str, tuple[int, int]],
                       deadline: float | None) -> bool:
        """Take budget for a call, waiting as long as needed but not past ``deadline``.
        ``shares``: the requests and tokens of each tenant in the call (a batch mixes
        tenants): with a per-tenant limit each tenant's bucket is charged its own share,
        all at once or none; otherwise the deployment's bucket is charged the sum.

        Returns False (and takes nothing) when the budget would come too late.
        """
        limit = limit_for(self.settings, deployment)
        if limit is None:
            return True
        bucket_keys: list[str] = []
        args: list[float] = []
        for tenant, (requests, tokens) in sorted(_scoped(limit, shares).items()):
            scope = f"{deployment}|{tenant}" if limit.per_tenant else deployment
            if limit.rpm:
                bucket_keys.append(keys.rate_bucket(f"{scope}|requests"))
                args += [limit.rpm, limit.rpm / 60.0, requests]
            if limit.tpm:
                bucket_keys.append(keys.rate_bucket(f"{scope}|tokens"))
                args += [limit.tpm, limit.tpm / 60.0, tokens]
        while True:
            now = self.clock()
            wait = float(self._take(keys=bucket_keys, args=args))
            if wait <= 0:
                return True
            if deadline is not None and now + wait > deadline:
                return False
            pause = min(wait, 1.0)
            metrics.RATE_LIMIT_WAIT.labels(*metrics.deployment_labels(deployment)).inc(pause)
            self.sleep(pause)


def _scoped(limit: Limit, shares: Mapping[str, tuple[int, int]],
            ) -> Mapping[str, tuple[int, int]]:
    """What each bucket is charged: each tenant its own share under a per-tenant limit,
    else the deployment's one bucket the sum."""
    if limit.per_tenant:
        return shares
    return {"": (sum(r for r, _ in shares.values()), sum(t for _, t in shares.values()))}
