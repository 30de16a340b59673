"""The health of deployments: failures in a row and cool-downs, shared by all workers in
Redis (``workers.retry`` reads and records it around each provider call)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import redis

from config import keys
from config.settings import Settings
from workers import metrics

log = logging.getLogger(__name__)


@dataclass
class Health:
    """Failures in a row and cool-downs of deployments, shared by all workers in Redis."""

    client: redis.Redis | None
    settings: Settings
    _local: dict[str, int] = field(default_factory=dict)

    def cooling(self, deployment: str) -> bool:
        if self.client is None:
            return False
        try:
            return bool(self.client.exists(keys.cooldown(deployment)))
        except redis.RedisError:
            return False

    def avoided(self, deployment: str) -> bool:
        """Whether the scheduler found the deployment's errors well above its baseline
        (``errors_high``): its batches then go to a fallback first (``keys.avoid``)."""
        if self.client is None:
            return False
        try:
            return bool(self.client.exists(keys.avoid(deployment)))
        except redis.RedisError:
            return False

    def recently_ok(self, deployment: str) -> bool:
        """Whether the deployment answered within ``provider_health_window_s``."""
        if self.client is None:
            return True
        try:
            return bool(self.client.exists(keys.healthy(deployment)))
        except redis.RedisError:
            return True

    def record(self, deployment: str, ok: bool) -> None:
        if self.client is None:
            return
        try:
            if ok:
                pipe = self.client.pipeline()
                pipe.delete(keys.failures(deployment))
                pipe.set(keys.healthy(deployment), "1",
                         ex=max(1, int(self.settings.provider_health_window_s)))
                pipe.execute()
                return
            pipe = self.client.pipeline()
            pipe.incr(keys.failures(deployment))
            pipe.expire(keys.failures(deployment), int(self.settings.cooldown_s) + 1)
            count = int(pipe.execute()[0])
            if count >= self.settings.cooldown_failures:
                log.warning("%s failed %d times in a row: cooling down for %g s", deployment,
                            count, self.settings.cooldown_s)
                pipe = self.client.pipeline(transaction=False)
                pipe.set(keys.cooldown(deployment), "1",
                         ex=max(1, int(self.settings.cooldown_s)))
                pipe.zadd(keys.COOLING, {deployment: time.time() + self.settings.cooldown_s})
                pipe.execute()
                metrics.COOLDOWNS.labels(*metrics.deployment_labels(deployment)).inc()
                self.client.delete(keys.failures(deployment))
        except redis.RedisError as exc:  # health is advice: never fail a batch over it
            log.warning("could not record the health of %s: %s", deployment, exc)
