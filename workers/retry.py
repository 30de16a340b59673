"""The one retry layer: every provider call of a batch goes through ``ProviderCaller.call``.

Providers never retry, and their HTTP clients are built with ``retries=0``, so a request
is retried here or nowhere:

* 429 and 529 wait what the server asks (``retry-after-ms``, ``Retry-After``), up to
  ``provider_retry_max_s``; a longer ask is not honoured by waiting, the deployment is
  counted as failing instead (so a fallback takes over).
* 5xx, timeouts and connection resets back off exponentially (``provider_retry_base_s``
  doubling, up to 25% jitter, capped at ``provider_retry_max_s``).
* Nothing is retried past a job's deadline, and a job gets ``provider_max_attempts``
  calls in all; then it ends FAILED with the last error as its reason.
* A group of requests that fails as a whole ``provider_split_after`` times in a row is
  split in halves, and the halves split again at their next failure as a whole: one
  poisonous prompt in a multi-prompt request then fails alone. A failure of a whole
  group is not held against its members' attempts (the poison cannot be told apart yet);
  once alone, or failing while others in its group succeed, a job has its attempts.
* A 4xx for one request that carries several jobs (``/v1/completions`` with a list) is
  not any one job's error: the request is split in halves at once, and only a 4xx for a
  request of one job fails that job.
* Errors of the job itself (context too long, another 4xx, an answer without content)
  are final at once; the other jobs' results are kept. A 200 whose body is cut off or
  not JSON is a transport fault, retried like a 5xx.
* Each job's outcome is handed to ``on_final`` as soon as it is final, so the batch
  stores the good answers while a poison is still being retried.
* While a deployment has no recent success (``provider_health_window_s``), a batch of
  a remote provider sends one request first and the rest only once it was answered: a
  dead deployment costs one request per attempt of the batch, not one per job. Its
  failures are the batch's (no job's own attempts): after ``provider_max_attempts`` of
  them every job of the batch ends FAILED.
* A deployment (``provider|model``) that fails ``cooldown_failures`` times in a row cools
  down for ``cooldown_s`` (shared in Redis), and its jobs go to the next of
  ``Settings.fallbacks`` meanwhile; so do they, but for a probe share, while the
  scheduler finds its errors well above their baseline (``errors_high``, ``keys.avoid``).
* Shared rate limits are taken before each call (``workers.ratelimit``).
* Every final answer is checked against what its job asked for (a JSON response format,
  tools) before it is handed on; one that does not validate is asked again in the next
  round, at most ``schema_retries`` times (``workers.promise``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from celery.exceptions import SoftTimeLimitExceeded

from config import keys
from config.settings import Settings
from jobs.capabilities import serves
from jobs.chat import extra_tokens
from workers import metrics
from workers.health import Health
from workers.promise import SchemaPromise
from workers.providers import Provider
from workers.providers.base import ProviderReply, ProviderRequest
from workers.ratelimit import RateLimiter

log = logging.getLogger(__name__)


def backoff(attempt: int, retry_after: float | None, *, base: float, cap: float,
            rng: random.Random) -> float | None:
    """Seconds to wait before call number ``attempt + 1``; None: do not wait for it.

    Pure: the randomness comes from ``rng``.
    """
    if retry_after is not None:
        return retry_after if retry_after <= cap else None
    return float(min(cap, base * 2 ** max(0, attempt - 1) * (1.0 + rng.uniform(0.0, 0.25))))


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a job's calls ended: the final reply, the calls made, where it ran."""

    reply: ProviderReply
    attempts: int
    deployment: str
    #: Times the answer was asked again for not validating (None: nothing checked).
    schema_retries: int | None = None


@dataclass
class _Chunk:
    requests: list[ProviderRequest]
    not_before: float = 0.0
    whole_failures: int = 0
    #: Requests held back until this chunk (a probe of one) gets an answer.
    held: list[ProviderRequest] = field(default_factory=list)

    def all(self) -> list[ProviderRequest]:
        return self.requests + self.held


class ProviderCaller:
    """Calls providers for a batch's requests, with retries, limits and fallbacks."""

    def __init__(self, settings: Settings, provider_for: Callable[[str], Provider],
                 limiter: RateLimiter | None = None, health: Health | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.provider_for = provider_for
        self.limiter = limiter
        self.health = health or Health(None, settings)
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        self._last: dict[str, str] = {}
        self._strikes: dict[str, int] = {}
        #: The replicas to try, in order (the scheduler's choice first), and those that
        #: failed during this call.
        self._order: list[int] = []
        self._failed: set[int] = set()
        #: The replica (index) that last answered, for the batch's timing event.
        self.replica: int | None = None
        self.promise = SchemaPromise(settings, clock)
        #: Requests asking again for an answer that did not validate (the next round).
        self._reask: list[ProviderRequest] = []
        #: The deployment that last answered, and per deployment and replica (-1: none)
        #: the requests of this call and how many failed transiently (for the scheduler's
        #: baselines).
        self.answered: str | None = None
        self.calls: dict[tuple[str, int], list[int]] = {}

    def call(self, requests: Sequence[ProviderRequest], provider: str,
             tenants: dict[str, str] | None = None,
             on_final: Callable[[dict[str, Outcome]], None] | None = None,
             replicas: Sequence[int] | None = None) -> dict[str, Outcome]:
        """Call until every request has a final reply; return them by job id. Each
        outcome is also handed to ``on_final`` as soon as it is final. ``replicas``: the
        order in which to try the provider's replicas (the scheduler's choice first)."""
        primary = f"{provider}|{requests[0].model}" if requests else provider
        self._order, self._failed, self.replica = list(replicas or []), set(), None
        self.answered, self.calls = None, {}
        attempts = {r.job_id: 0 for r in requests}
        self._strikes = {r.job_id: 0 for r in requests}
        self._last = {r.job_id: "" for r in requests}
        self.promise.start(requests)
        self._reask = []
        final: dict[str, Outcome] = {}
        reported: set[str] = set()
        chunks = [_Chunk(list(requests))]
        while chunks:
            chunks.sort(key=lambda c: c.not_before)
            chunk = chunks.pop(0)
            wait = chunk.not_before - self.clock()
            if wait > 0:
                self.sleep(wait)
            self._run_chunk(chunk, primary, tenants or {}, chunks, final, attempts)
            if on_final is not None and len(final) > len(reported):
                fresh = {k: v for k, v in final.items() if k not in reported}
                reported.update(fresh)
                on_final(fresh)
        return final

    def _run_chunk(self, chunk: _Chunk, primary: str, tenants: dict[str, str],
                   chunks: list[_Chunk], final: dict[str, Outcome],
                   attempts: dict[str, int]) -> None:
        now = self.clock()
        for r in [r for r in chunk.all() if r.deadline is not None and now >= r.deadline]:
            final[r.job_id] = self._gave_up(r, attempts, primary, "deadline reached")
        chunk.requests = [r for r in chunk.requests if r.job_id not in final]
        chunk.held = [r for r in chunk.held if r.job_id not in final]
        if not chunk.requests and chunk.held:
            chunk.requests, chunk.held = chunk.held[:1], chunk.held[1:]
        if not chunk.requests:
            return
        deployment = self._pick(primary, chunk.all())
        name, model = deployment.split("|", 1)
        target, replica, health = self._target(name, deployment)
        if (len(chunk.requests) > 1 and getattr(self.provider_for(name), "probe_first", False)
                and not self.health.recently_ok(health)):
            # No recent success: one request first, the rest once it was answered.
            chunk.held = chunk.requests[1:] + chunk.held
            chunk.requests = chunk.requests[:1]
        sent = [r if r.model == model else dataclasses.replace(r, model=model)
                for r in chunk.requests]  # (``replace`` costs ~9 us: only when it changes)
        if not self._budget(deployment, sent, tenants, chunks, final, attempts, chunk.held):
            return
        replies = self._complete(name, sent, target)
        failed = self._tally(deployment, replica, replies)
        again = self._settle(chunk.requests, replies, attempts, final, deployment, chunk,
                             health)
        if self._reask:  # answers that did not validate: asked again in the next round
            again.append(_Chunk(self._reask, self.clock()))
            self._reask = []
        self._after_call(again, primary, deployment, name, replica, failed)
        chunks += again

    def _after_call(self, again: list[_Chunk], primary: str, deployment: str, name: str,
                    replica: int | None, failed: int) -> None:
        """What a call's failures change for what is tried again: a failed replica is left
        for the next one at once, as is a deployment the scheduler avoids."""
        if replica is not None:
            if failed:
                self._failed.add(replica)
                if self._next_replica(deployment, name) is not None:
                    for c in again:  # another replica is there: no backoff
                        c.not_before = min(c.not_before, self.clock())
            else:
                self.replica = replica
        elif failed and again and self._moved(primary, deployment):
            for c in again:  # the scheduler moved its calls to a fallback: no backoff
                c.not_before = min(c.not_before, self.clock())

    def _tally(self, deployment: str, replica: int | None,
               replies: Sequence[ProviderReply]) -> int:
        """Count the call's requests and transient failures (``calls``); the failures."""
        failed = sum(1 for r in replies if r.transient)
        tally = self.calls.setdefault((deployment, -1 if replica is None else replica), [0, 0])
        tally[0] += len(replies)
        tally[1] += failed
        if not failed:
            self.answered = deployment
        return failed

    def _moved(self, primary: str, deployment: str) -> bool:
        """Whether ``deployment`` (failing) is one the scheduler avoids (``errors_high``)
        with another of ``primary``'s alternatives ready to take its calls."""
        options = [primary, *self.settings.fallbacks.get(primary, [])]
        return (len(options) > 1 and self.health.avoided(deployment)
                and any(not self._cooling(o) for o in options if o != deployment))

    def _target(self, name: str, deployment: str) -> tuple[Provider, int | None, str]:
        """The provider to call for ``deployment``, the replica (index) it is, and the name
        its health is kept under: a replica of its own when the provider has several."""
        provider = self.provider_for(name)
        members: list[Provider] | None = getattr(provider, "members", None)
        if not members:
            return provider, None, deployment
        i = self._next_replica(deployment, name)
        if i is None:  # every replica failed or cools down: the scheduler's first again
            i = self._order[0] if self._order and self._order[0] < len(members) else 0
            self._failed.clear()
        name_i = keys.replica(deployment, getattr(provider, "urls", [])[i])
        metrics.REPLICA_REQUESTS.labels(deployment, name_i.split("@", 1)[1]).inc()
        return members[i], i, name_i

    def _next_replica(self, deployment: str, name: str) -> int | None:
        """The first replica in the batch's order that neither failed in this call nor
        cools down."""
        urls: list[str] = getattr(self.provider_for(name), "urls", [])
        order = [i for i in self._order if 0 <= i < len(urls)]
        order += [i for i in range(len(urls)) if i not in order]
        for i in order:
            if i not in self._failed and not self.health.cooling(
                    keys.replica(deployment, urls[i])):
                return i
        return None

    def _pick(self, primary: str, requests: Sequence[ProviderRequest] = ()) -> str:
        """The primary deployment, or the first alternative not cooling down that serves
        every request (a fallback never drops a field its provider cannot serve:
        ``jobs.capabilities``). One the scheduler avoids (``errors_high``) comes after the
        others, but for a probe share of the calls (``anomaly_probe_share``), so that its
        recovery is seen."""
        fallbacks = self.settings.fallbacks.get(primary, [])
        later: list[str] = []
        for candidate in [primary, *fallbacks]:
            if candidate != primary and not all(
                    serves(candidate.split("|", 1)[0], r.params, r.messages)
                    for r in requests):
                continue
            if self._cooling(candidate):
                continue
            if (fallbacks and self.health.avoided(candidate)
                    and self.rng.random() >= self.settings.anomaly_probe_share):
                later.append(candidate)
                continue
            return self._chosen(primary, candidate)
        return self._chosen(primary, later[0]) if later else primary

    @staticmethod
    def _chosen(primary: str, candidate: str) -> str:
        if candidate != primary:
            metrics.FALLBACKS.labels(primary, candidate).inc()
        return candidate

    def _cooling(self, deployment: str) -> bool:
        """Whether the deployment cools down: every one of its replicas, if it has them."""
        urls: list[str] | None = getattr(
            self.provider_for(deployment.split("|", 1)[0]), "urls", None)
        if urls:
            return all(self.health.cooling(keys.replica(deployment, u)) for u in urls)
        return self.health.cooling(deployment)

    def _budget(self, deployment: str, sent: list[ProviderRequest], tenants: dict[str, str],
                chunks: list[_Chunk], final: dict[str, Outcome],
                attempts: dict[str, int], held: list[ProviderRequest]) -> bool:
        """Take rate-limit budget for the call; split or fail what cannot get it."""
        if self.limiter is None:
            return True
        cost = {r.job_id: len(r.text) // 4 + 1 + (r.params.max_tokens or 256)
                + extra_tokens(r.messages, r.tools, r.response_format) for r in sent}
        shares: dict[str, tuple[int, int]] = {}
        for r in sent:  # each job is charged to its own tenant
            n, t = shares.get(tenants.get(r.job_id, ""), (0, 0))
            shares[tenants.get(r.job_id, "")] = (n + 1, t + cost[r.job_id])
        if len(sent) > 1 and not self.limiter.fits_shares(deployment, shares):
            metrics.SPLITS.labels(*metrics.deployment_labels(deployment)).inc()
            half = len(sent) // 2
            chunks += [_Chunk(sent[:half]), _Chunk(sent[half:], held=held)]
            return False
        deadlines = [r.deadline for r in sent if r.deadline is not None]
        if self.limiter.acquire_shares(deployment, shares,
                                       min(deadlines) if deadlines else None):
            return True
        for r in sent:
            final[r.job_id] = self._gave_up(r, attempts, deployment,
                                            "deadline reached waiting for rate-limit budget")
        if held:
            chunks.append(_Chunk(held))
        return False

    def _complete(self, name: str, sent: list[ProviderRequest],
                  target: Provider | None = None) -> list[ProviderReply]:
        started = time.monotonic()
        try:
            replies = (target or self.provider_for(name)).complete(sent)
        except SoftTimeLimitExceeded:
            raise  # the task's time is up: the worker fails the batch, no retry here
        except Exception as exc:  # a provider bug or outage fails this call, transiently
            log.exception("provider %s raised", name)
            replies = [ProviderReply(job_id=r.job_id, transient=True,
                                     error=f"provider {name} raised {type(exc).__name__}: "
                                     f"{exc}") for r in sent]
        by_id = {r.job_id: r for r in replies}
        out = [by_id.get(r.job_id) or ProviderReply(job_id=r.job_id, error="no reply")
               for r in sent]
        _observe_call(name, sent[0].model if sent else "", out, time.monotonic() - started)
        return out

    def _settle(self, live: list[ProviderRequest], replies: list[ProviderReply],
                attempts: dict[str, int], final: dict[str, Outcome], deployment: str,
                chunk: _Chunk, health: str | None = None) -> list[_Chunk]:
        """Record final replies; return what is to be tried again, and when. ``health``:
        the name the call's health is kept under (a replica's), else the deployment."""
        health = health or deployment
        whole = len(live) > 1 and all(r.transient for r in replies)
        if len(live) > 1 and all(r.whole_request for r in replies):
            # The request of several jobs was refused as a whole: halves, at once.
            for req in live:
                attempts[req.job_id] += 1
                self._last[req.job_id] = replies[0].error or ""
            self.health.record(health, ok=True)  # it answered
            metrics.SPLITS.labels(*metrics.deployment_labels(deployment)).inc()
            half = len(live) // 2
            return [_Chunk(live[:half], self.clock()),
                    _Chunk(live[half:], self.clock(), held=chunk.held)]
        probe = bool(chunk.held) and all(r.transient for r in replies)
        again: list[ProviderRequest] = []
        worst_after: float | None = None
        for req, reply in zip(live, replies, strict=True):
            if self._take(req, reply, attempts, final, deployment, strike=not (whole or probe)):
                again.append(req)
                if reply.retry_after is not None:
                    worst_after = max(worst_after or 0.0, reply.retry_after)
        self.health.record(health, ok=len(again) < len(live))
        held = chunk.held
        released: list[_Chunk] = []
        if held and not probe:  # the deployment answered: send what was held back
            released, held = [_Chunk(held, self.clock())], []
        if probe and chunk.whole_failures + 1 >= self.settings.provider_max_attempts:
            for r in again + held:  # the deployment kept failing: the whole batch gives up
                self._last[r.job_id] = self._last[live[0].job_id]
                final[r.job_id] = self._gave_up(r, attempts, deployment,
                                                "the deployment kept failing; gave up")
            return released
        if not again:
            return released + ([_Chunk(held, self.clock())] if held else [])
        metrics.RETRIES.labels(*metrics.deployment_labels(deployment)).inc(len(again))
        return released + self._retry(again, held, worst_after, attempts, final, deployment,
                                      chunk, whole or probe, health)

    def _take(self, req: ProviderRequest, reply: ProviderReply, attempts: dict[str, int],
              final: dict[str, Outcome], deployment: str, *, strike: bool) -> bool:
        """Count the call of ``req`` and take its reply: final (once the schema promise
        checked it, or asked again: ``_reask``), or to be tried again (True). ``strike``:
        a transient error counts against the job's own attempts."""
        attempts[req.job_id] += 1
        self._last[req.job_id] = reply.error or ""
        if reply.transient and strike:
            self._strikes[req.job_id] += 1
        if not reply.transient:
            verdict = self.promise.judge(req, dataclasses.replace(
                reply, whole_request=False) if reply.whole_request else reply, deployment)
            if isinstance(verdict, ProviderRequest):
                self._reask.append(verdict)
            else:
                final[req.job_id] = self._outcome(verdict, attempts, deployment)
            return False
        if self._strikes[req.job_id] >= self.settings.provider_max_attempts:
            final[req.job_id] = self._outcome(dataclasses.replace(
                reply, transient=False, error=f"gave up after {attempts[req.job_id]} "
                f"attempts: {reply.error}"), attempts, deployment)
            return False
        return True

    def _retry(self, again: list[ProviderRequest], held: list[ProviderRequest],
               worst_after: float | None, attempts: dict[str, int],
               final: dict[str, Outcome], deployment: str, chunk: _Chunk,
               whole: bool, health: str | None = None) -> list[_Chunk]:
        """The chunks that try ``again`` (and what is held behind them) after a backoff."""
        attempt = max(attempts[r.job_id] for r in again)
        wait = backoff(attempt, worst_after, base=self.settings.provider_retry_base_s,
                       cap=self.settings.provider_retry_max_s, rng=self.rng)
        if wait is None:  # the server asks for longer than we wait: the deployment fails
            self.health.record(health or deployment, ok=False)
            wait = self.settings.provider_retry_max_s
        when = self.clock() + wait
        keep = []
        for r in again:
            if r.deadline is not None and when >= r.deadline:
                final[r.job_id] = self._gave_up(r, attempts, deployment,
                                                "deadline reached while retrying")
            else:
                keep.append(r)
        if not keep:
            return [_Chunk(held, self.clock())] if held else []
        failures = chunk.whole_failures + 1 if whole else 0
        if held:  # still probing: the probe goes again, the rest still held
            return [_Chunk(keep, when, failures, held=held)]
        if whole and failures >= self.settings.provider_split_after and len(keep) > 1:
            metrics.SPLITS.labels(*metrics.deployment_labels(deployment)).inc()
            half = len(keep) // 2
            return [_Chunk(keep[:half], when, failures), _Chunk(keep[half:], when, failures)]
        return [_Chunk(keep, when, failures)]

    def _outcome(self, reply: ProviderReply, attempts: dict[str, int],
                 deployment: str) -> Outcome:
        return Outcome(reply, attempts[reply.job_id], deployment,
                       self.promise.retries(reply.job_id))

    def _gave_up(self, req: ProviderRequest, attempts: dict[str, int], deployment: str,
                 why: str) -> Outcome:
        """A job given up on: FAILED with ``why``, or, when its last answer did not
        validate, FAILED ``invalid_output`` with that answer."""
        invalid = self.promise.invalid(req.job_id, f"; {why} before it was asked again")
        if invalid is not None:
            return self._outcome(invalid, attempts, deployment)
        last = self._last.get(req.job_id)
        detail = f"; last error: {last}" if last else ""
        return self._outcome(ProviderReply(job_id=req.job_id, error=f"{why} after "
                                           f"{attempts[req.job_id]} attempt(s){detail}"),
                             attempts, deployment)


def _observe_call(provider: str, model: str, replies: Sequence[ProviderReply],
                  seconds: float) -> None:
    """One call's time (under the outcome of its first reply) and each reply's outcome."""
    outcomes = [metrics.outcome_of(r.error, r.transient) for r in replies]
    for outcome in outcomes:
        metrics.REQUESTS.labels(provider, model, outcome).inc()
    if outcomes:
        metrics.REQUEST_SECONDS.labels(provider, model, outcomes[0]).observe(seconds)
