"""The result cache's steps: entries, identical requests that wait for one job
(coalescing: leaders and followers), hits counted, purges."""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Sequence
from typing import Any

from config import keys
from jobs import stats
from jobs.models import JobSpec
from jobs.steps.submit import Submit

#: Redis states of a leader that will still hand its followers their answer: staged by
#: its submit, waiting, sent, running, or waiting at a provider's batch endpoint.
_LEADING_STATES = frozenset({"STAGED", "QUEUED", "SCHEDULED", "RUNNING", "AT_PROVIDER"})


class CacheSteps(Submit):
    """CacheSteps: see the module."""

    def cache_get(self, cache_keys: Sequence[str]) -> list[str | None]:
        """Cached entries (JSON) of exact keys."""
        if not cache_keys:
            return []
        return list(self.r.mget([keys.cache_entry(k) for k in cache_keys]))  # type: ignore[arg-type]

    def cache_put(self, key: str, partition: str, entry: str, *, ttl_s: int, now: float,
                  max_entries: int, max_bytes: int) -> None:
        """Store an entry, keeping its partition within its bounds."""
        evicted = self._cache_put(keys=[keys.cache_entry(key), keys.cache_index(partition),
                                        keys.cache_sizes(partition), keys.cache_bytes(partition),
                                        keys.CACHE_PARTITIONS],
                                  args=[entry, ttl_s, now, max_entries, max_bytes, partition])
        if evicted:  # out of the partition's accounts already; each also expires on its own
            self.r.delete(*evicted)

    def coalesce(self, specs: Sequence[JobSpec], cache_keys: Sequence[str],
                 ttl_s: int) -> list[str]:
        """For staged jobs with these cache keys: per job the id of the job it waits for
        (its own when it leads)."""
        recent = keys.recent(stats.bucket_of(time.time()))
        pipe = self.r.pipeline(transaction=False)
        for spec, key in zip(specs, cache_keys, strict=True):
            self._coalesce(keys=[keys.cache_lead(key), keys.cache_followers(key),
                                 keys.job(spec.id), keys.STATS, recent],
                           args=[spec.id, ttl_s, stats.BUCKET_TTL_S, int(spec.priority),
                                 stats.label(spec.tenant, spec.provider, spec.model), key],
                           client=pipe)
        return [str(x) for x in pipe.execute()]

    def take_followers(self, leader: str, key: str) -> list[str]:
        """The jobs waiting for ``leader`` (which is final); it leads no more."""
        return [str(x) for x in self._take_followers(
            keys=[keys.cache_lead(key), keys.cache_followers(key)], args=[leader])]

    def release_followers(self, job_ids: Sequence[str]) -> list[str]:
        """Followers whose leader failed: published to run on their own; returns them."""
        if not job_ids:
            return []
        flags = self._release_followers(keys=[keys.job(j) for j in job_ids])
        freed = [j for j, f in zip(job_ids, flags, strict=True) if int(f)]
        self.publish(freed)
        return freed

    def release_orphan_followers(self, job_ids: Sequence[str]) -> list[str]:
        """Followers whose leader will never hand them over: it is final (its worker died
        before handing over, or it finished without its result reaching Redis), withdrawn,
        gone (its payload expired), or no longer leads their key. They run on their own.
        Returns them."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), "lead", "key")
        leads = pipe.execute()
        for lead, key in leads:
            pipe.exists(keys.celery_result(lead or "-"))
            pipe.get(keys.cache_lead(key or "-"))
            pipe.hget(keys.job(lead or "-"), "state")
        checks = pipe.execute()
        orphans = [j for i, (j, (lead, _)) in enumerate(zip(job_ids, leads, strict=True))
                   if lead is None or checks[3 * i] or checks[3 * i + 1] != lead
                   or checks[3 * i + 2] not in _LEADING_STATES]
        return self.release_followers(orphans)

    def cache_purge(self, partitions: str, digests: str = "*") -> int:
        """Delete the entries of the partitions that match the glob ``partitions`` whose
        hash matches ``digests``, and the accounts of partitions left empty; return how many
        entries went. The partitions come from their registry and the entries from each
        partition's index: no keyspace scan. (Their semantic vectors stay until they
        leave the semantic index: a lookup passes over a vector whose entry is gone.)"""
        gone = 0
        prefix = keys.cache_entry("")
        for part in self.r.zrange(keys.CACHE_PARTITIONS, 0, -1):
            part = str(part)
            if not fnmatch.fnmatchcase(part, partitions):
                continue
            names = [str(n) for n in self.r.zrange(keys.cache_index(part), 0, -1)]
            chosen = [n for n in names
                      if fnmatch.fnmatchcase(n[len(prefix):].rpartition(":")[2], digests)]
            for start in range(0, len(chosen), 500):
                gone += self._purge_batch(part, chosen[start:start + 500])
            if len(chosen) == len(names):
                pipe = self.r.pipeline(transaction=True)
                pipe.delete(keys.cache_index(part), keys.cache_sizes(part),
                            keys.cache_bytes(part))
                pipe.zrem(keys.CACHE_PARTITIONS, part)
                pipe.execute()
        return gone

    def _purge_batch(self, part: str, names: list[str]) -> int:
        sizes: list[Any] = list(self.r.hmget(keys.cache_sizes(part), names))
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(*names)
        pipe.zrem(keys.cache_index(part), *names)
        pipe.hdel(keys.cache_sizes(part), *names)
        total = sum(int(x) for x in sizes if x)
        if total:
            pipe.decrby(keys.cache_bytes(part), total)
        return int(pipe.execute()[0])  # entries that still existed (not yet expired)
