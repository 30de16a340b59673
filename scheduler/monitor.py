"""The scheduler's watch over its deployments, replicas and classes: it feeds the pure
``scheduler.anomalies.Watch`` from what the scheduler sees, stores baselines and
anomalies in Redis, logs each raise and clear, and acts:

* ``latency_high`` or ``throughput_low`` on a replica: the replica gets only a probe
  batch now and then (one when it has none and none went to it for ``anomaly_probe_s``)
  and what no other replica can take, until it clears (``Routing.slow``); it is not
  ejected (errors eject, as the cool-down does).
* ``errors_high`` on a deployment that has fallbacks (``Settings.fallbacks``): the
  scheduler sets ``keys.avoid`` (a short TTL, renewed each second while it lasts), which
  the workers' retry layer reads as it reads a cool-down: new calls go to the fallback,
  but for the probe share, before the cool-down would (it needs failures in a row).
* ``deadline_risk`` on a class: the desired worker slots become at least the slots that
  meet every pending deadline of the class and keep up with arrivals, plus
  ``anomaly_deadline_headroom``, and do not fall while it lasts (``desired``).

Each action can be turned off per kind (``anomaly_actions_off``), and each is logged with
the anomaly that caused it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Sequence
from typing import Any

import redis

from config import keys
from config.settings import PRIORITY_NAMES, Settings
from jobs.stats import Count
from scheduler.anomalies import Anomaly, BatchSeen, Calls, Change, Kind, Watch, rules, tuning
from scheduler.metrics import AnomalyView
from scheduler.routing import Routing
from scheduler.scaling import DeadlineRisk

log = logging.getLogger(__name__)

#: How often baselines are written to Redis, in seconds.
SAVE_EVERY_S = 10.0
#: Time-to-live of an ``avoid`` key; the active scheduler renews it every second.
AVOID_TTL_S = 15


class Monitor:
    """See the module. Called from the scheduler's loop only."""

    def __init__(self, r: redis.Redis, settings: Settings, routing: Routing,
                 view: AnomalyView | None = None) -> None:
        self.r = r
        self.settings = settings
        self.routing = routing
        self.view = view
        self.enabled = settings.anomaly_detection
        self.off = set(settings.anomaly_actions_off)
        self.watch = Watch(rules(settings), tuning(settings))
        self.raised: dict[tuple[str, str, str, str], int] = {}
        self._saved_at = 0.0
        self._last_save = 0.0
        self._hits: dict[str, tuple[int, int]] | None = None
        self._urls: dict[str, list[str]] = {}
        #: Per class at risk: the most slots its deadline_risk asked for so far.
        self._held: dict[str, int] = {}

    # --- becoming active ----------------------------------------------------------------

    def load(self, now: float) -> None:
        """Start from what the previous scheduler stored: baselines, active anomalies
        (their actions apply again) and the raised counts."""
        self.watch = Watch(rules(self.settings), tuning(self.settings))
        self._hits = None
        if not self.enabled:
            return
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(keys.BASELINES)
        pipe.hgetall(keys.ANOMALIES)
        pipe.hgetall(keys.ANOMALIES_RAISED)
        stored, active, raised = pipe.execute()
        stale = self._stale(stored, now)
        if stale:  # a deployment or replica long gone: kept no longer than retention
            self.r.hdel(keys.BASELINES, *stale)
        taken = self.watch.load_baselines({k: v for k, v in stored.items() if k not in stale})
        found = []
        for raw in active.values():
            with contextlib.suppress(ValueError, TypeError):
                found.append(Anomaly.load(raw))
        self.watch.restore(found, now)
        self.raised = {}
        for name, n in raised.items():
            parts = str(name).split("|")
            if len(parts) == 4:
                self.raised[(parts[0], parts[1], parts[2], parts[3])] = int(n)
        for a in found:
            self._act(a, on=True, now=now)
        self._saved_at = now
        if taken or found:
            log.info("anomaly detection: %d baselines and %d active anomalies taken over",
                     taken, len(found))

    def _stale(self, stored: dict[str, str], now: float) -> list[str]:
        """Baselines last taught more than ``retention_days`` ago (none with 0)."""
        if self.settings.retention_days <= 0:
            return []
        cutoff = now - self.settings.retention_days * 86400
        stale = []
        for name, raw in stored.items():
            try:
                if float(json.loads(raw).get("at", 0.0)) < cutoff:
                    stale.append(name)
            except (ValueError, TypeError, AttributeError):
                stale.append(name)
        return stale

    # --- observations -------------------------------------------------------------------

    def on_event(self, fields: dict[str, str], now: float) -> None:
        """A batch's end (``pb:events``), with the timing of its provider call."""
        if not self.enabled or "seconds" not in fields or "deployment" not in fields:
            return
        try:
            self.watch.batch(now, self._seen(fields))
        except (ValueError, TypeError, KeyError) as exc:  # an older worker's event
            log.debug("event not understood by the anomaly detection: %s", exc)

    def _seen(self, f: dict[str, str]) -> BatchSeen:
        ran_on = f.get("ran_on") or f["deployment"]
        replica = self._replica(ran_on, int(f["replica"])) if "replica" in f else ""
        calls = tuple(Calls(str(dep), self._replica(str(dep), int(i)), int(n), int(e))
                      for dep, i, n, e in json.loads(f.get("calls", "[]")))
        return BatchSeen(deployment=ran_on, replica=replica, size=int(f["size"]),
                         seconds=float(f["seconds"]),
                         completion_tokens=int(f.get("completion_tokens", 0)),
                         prompt_tokens=int(f.get("prompt_tokens", 0)),
                         cached_tokens=int(f.get("cached_tokens", 0)),
                         ttft_s=float(f["ttft"]) if "ttft" in f else None, calls=calls)

    def _replica(self, deployment: str, index: int) -> str:
        """The address (without the scheme) of replica ``index`` of the deployment's
        provider; "" for none."""
        provider = deployment.split("|", 1)[0]
        urls = self._urls.get(provider)
        if urls is None:
            urls = self._urls[provider] = [u for u, _, _ in self.settings.replicas(provider)]
        return urls[index].split("://", 1)[-1] if 0 <= index < len(urls) else ""

    def on_totals(self, totals: Sequence[Count], now: float) -> None:
        """The cluster's job counters: jobs answered without a call of their own (exact,
        semantic, coalesced) over jobs submitted, per deployment, since the last call."""
        if not self.enabled:
            return
        sums: dict[str, list[int]] = {}
        for c in totals:
            if c.kind in ("submitted", "cache"):
                pair = sums.setdefault(f"{c.provider}|{c.model}", [0, 0])
                pair[0 if c.kind == "cache" else 1] += c.value
        previous, self._hits = self._hits, {d: (h, s) for d, (h, s) in sums.items()}
        if previous is None:
            return
        for dep, (hits, submitted) in self._hits.items():
            h0, s0 = previous.get(dep, (0, 0))
            if submitted > s0:
                self.watch.exact_cache(now, dep, max(0, hits - h0), submitted - s0)

    def on_deadlines(self, risks: Sequence[DeadlineRisk | None], now: float) -> None:
        """Each class's deadline pressure now."""
        if not self.enabled:
            return
        for cls, risk in enumerate(risks):
            name = PRIORITY_NAMES[cls] if cls < len(PRIORITY_NAMES) else str(cls)
            if risk is None:
                self.watch.deadline(now, name, 0.0, 0.0, 0.0)
            else:
                self.watch.deadline(now, name, risk.pressure, risk.projected_s, risk.slack_s)

    # --- judging, acting, storing -------------------------------------------------------

    def step(self, now: float) -> list[Change]:
        """Judge; act on, log and store what changed; renew what the active anomalies
        hold (``avoid`` keys); save the baselines every ``SAVE_EVERY_S``."""
        if not self.enabled:
            return []
        changes = self.watch.step(now)
        pipe = self.r.pipeline(transaction=False)
        for change in changes:
            a = change.anomaly
            if change.raised:
                log.warning("anomaly raised: %s", a.describe())
                self._act(a, on=True, now=now)
                pipe.hincrby(keys.ANOMALIES_RAISED, "|".join(a.labels), 1)
                self.raised[a.labels] = self.raised.get(a.labels, 0) + 1
            else:
                log.info("anomaly cleared: %s (%s; active for %.0f s)", a.describe(),
                         a.cleared_why, now - a.raised_at)
                self._act(a, on=False, now=now)
                pipe.hdel(keys.ANOMALIES, a.id)
                pipe.zadd(keys.ANOMALIES_RECENT, {a.dump(): now})
        if any(not c.raised for c in changes):
            if self.settings.retention_days > 0:
                pipe.zremrangebyscore(keys.ANOMALIES_RECENT, "-inf",
                                      now - self.settings.retention_days * 86400)
            pipe.zremrangebyrank(keys.ANOMALIES_RECENT, 0, -self.settings.anomaly_recent_max - 1)
        for a in self.watch.active.values():
            pipe.hset(keys.ANOMALIES, a.id, a.dump())
            if self._avoids(a):
                pipe.set(keys.avoid(f"{a.provider}|{a.model}"), a.id, ex=AVOID_TTL_S)
        if now - self._last_save >= SAVE_EVERY_S:
            stored = self.watch.dump_baselines(self._saved_at)
            if stored:
                pipe.hset(keys.BASELINES, mapping=dict(stored.items()))
            self._saved_at = self._last_save = now
        pipe.execute()
        if self.view is not None:
            self.view.update(self.raised, {a.labels for a in self.watch.active.values()})
        return changes

    def _avoids(self, a: Anomaly) -> bool:
        """Whether the anomaly sends its deployment's batches to a fallback."""
        return (a.kind == Kind.ERRORS_HIGH and not a.replica and a.kind not in self.off
                and bool(self.settings.fallbacks.get(f"{a.provider}|{a.model}")))

    def _act(self, a: Anomaly, *, on: bool, now: float) -> None:
        """Apply (``on``) or undo the anomaly's action, and log it with the anomaly."""
        if a.kind in self.off:
            return
        what = ""
        if a.kind in (Kind.LATENCY_HIGH, Kind.THROUGHPUT_LOW) and a.replica:
            if self.routing.slow(a.provider, a.replica, a.id, on):
                every = self.settings.anomaly_probe_s
                what = (f"routing: replica {a.replica} of {a.provider} gets only probe "
                        f"batches (one at most every {every:g} s) and what no other replica "
                        "can take" if on else
                        f"routing: replica {a.replica} of {a.provider} back to its weight")
        elif self._avoids(a):
            fallbacks = ", ".join(self.settings.fallbacks[f"{a.provider}|{a.model}"])
            what = (f"fallbacks: new calls of {a.provider}|{a.model} go to {fallbacks} first"
                    if on else f"fallbacks: {a.provider}|{a.model} is first again")
            if not on:
                with contextlib.suppress(redis.RedisError):
                    self.r.delete(keys.avoid(f"{a.provider}|{a.model}"))
        elif a.kind == Kind.DEADLINE_RISK:
            what = (f"scaling: desired worker slots at least those that meet every pending "
                    f"deadline of class {a.model} and keep up with arrivals, "
                    f"+{self.settings.anomaly_deadline_headroom:.0%}, held while it lasts"
                    if on else
                    f"scaling: desired worker slots as the backlog asks (class {a.model})")
        if what:
            if on and what not in a.actions:
                a.actions.append(what)
            log.warning("anomaly action: %s (anomaly %s)", what, a.id)

    def desired(self, desired: int, reason: str, risks: Sequence[DeadlineRisk | None],
                cap: int | None, keep_up: float = 0.0) -> tuple[int, str]:
        """The scaling signal with ``deadline_risk``'s action: while a class is at risk,
        at least the slots that meet every one of its pending deadlines and keep up with
        the arrivals (``keep_up`` slots), plus the headroom, and never less than the
        figure this asked for since the risk was raised (a backlog that drains unevenly
        must not scale the workers down while deadlines are still at risk); within the
        rate limits' ``cap``."""
        if Kind.DEADLINE_RISK in self.off or not self.enabled:
            return desired, reason
        at_risk = {a.model for a in self.watch.of_kind(Kind.DEADLINE_RISK)}
        self._held = {k: v for k, v in self._held.items() if k in at_risk}
        for cls, risk in enumerate(risks):
            name = PRIORITY_NAMES[cls] if cls < len(PRIORITY_NAMES) else str(cls)
            if name not in at_risk:
                continue
            need = 0 if risk is None else math.ceil(
                (risk.need + keep_up) * (1 + self.settings.anomaly_deadline_headroom) - 1e-9)
            need = max(need, self._held.get(name, 0))
            if cap is not None:
                need = min(need, cap)
            self._held[name] = max(need, self._held.get(name, 0))
            if need > desired:
                desired, reason = need, (f"deadline risk in {name}: the slots that meet its "
                                         "deadlines, plus headroom")
        return desired, reason

    # --- what status shows --------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """The active anomalies, newest first (for the overview)."""
        return [json.loads(a.dump()) for a in
                sorted(self.watch.active.values(), key=lambda a: -a.raised_at)]

    def step_down(self) -> None:
        """No longer active: nothing is exported, and the actions this scheduler applied
        are undone in its memory (the next scheduler applies them again)."""
        for a in list(self.watch.active.values()):
            if a.kind in (Kind.LATENCY_HIGH, Kind.THROUGHPUT_LOW) and a.replica:
                self.routing.slow(a.provider, a.replica, a.id, on=False)
        if self.view is not None:
            self.view.update(None, set())
