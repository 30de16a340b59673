"""A streaming job's output, chunk by chunk, in a Redis Stream per job.

The worker appends as the provider produces: an ``attempt`` entry when a provider attempt
starts (a reader discards the text of the attempts before it: a retry, or a worker that
died mid-stream, starts over) and ``t`` entries of text, each carrying its attempt's id
(``a``), so that a reader tells attempts apart even when an ``attempt`` entry could not be
written. The step that stores a job's result (``FINISH_MANY``) appends the ``end`` entry
with the final state, whatever ended the job (a worker, an expiry, a cancel, the
reconciler, a coalesced answer). The stream is bounded (``MAXLEN``) and expires with the
result; a reader that falls behind the bound is told so (``lost``). Entry ids are the SSE
event ids, so a reader resumes after the last one it saw (``Last-Event-ID``).

What a reader can rely on (``follow``, and the API's asynchronous reader): it ends with
an ``end`` event carrying the job's real final state within about ``BLOCK_MS`` of the
result being stored, whether or not the stream has an ``end`` entry, or exists at all (a
job answered from the cache, or not submitted with ``stream``); a job whose result has
left Redis (results live ``result_ttl_s``, jobs longer in SQL) ends its reader at once
with the state the store holds, when the reader is given the store's answer
(``settled``); with a time bound, it ends with a ``timeout`` event when the bound passes
first (the job keeps running).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import redis

from config import keys

#: Most entries a job's stream keeps.
MAXLEN = 20_000
#: How long one read waits in Redis, in milliseconds: a reader of a job whose stream has
#: no ``end`` entry learns of its result this long after it is stored, at most.
BLOCK_MS = 500
#: Entries read per round trip.
READ_COUNT = 500
#: A stream entry id (and so an SSE event id): milliseconds, a dash, a sequence number.
ENTRY_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
#: The largest part of an entry id Redis takes (each is an unsigned 64-bit number).
ENTRY_PART_MAX = 2**64 - 1
#: Seconds between two reads of the store's state by a reader whose job has no result in
#: Redis (the first read is at once): a job final only in the store ends its reader.
STORE_CHECK_S = 10.0


def entry_id(text: str) -> str | None:
    """``text`` as a stream entry id Redis takes, or None when it is not one."""
    text = text.strip()
    if not ENTRY_ID.match(text):
        return None
    if any(int(part) > ENTRY_PART_MAX for part in text.split("-")):
        return None
    return text


@dataclass(frozen=True)
class Event:
    """One event of a job's stream: ``kind`` is attempt, chunk, end, lost or timeout."""

    id: str
    kind: str
    text: str = ""


class Sink:
    """Where a provider writes the chunks of the streaming jobs it runs."""

    def __init__(self, r: redis.Redis, ttl_s: int) -> None:
        self.r = r
        self.ttl_s = ttl_s
        #: The attempt under way of each job this sink writes for.
        self._attempts: dict[str, str] = {}
        #: When each job's attempt began, and how long its first text took (monotonic).
        self._began: dict[str, float] = {}
        self._first: dict[str, float] = {}

    def begin(self, job_id: str) -> None:
        """A provider attempt starts: readers discard the text of earlier attempts."""
        attempt = uuid.uuid4().hex[:8]
        self._attempts[job_id] = attempt
        self._began[job_id] = time.monotonic()
        self._first.pop(job_id, None)
        if len(self._attempts) > 10_000:  # forget the oldest: those jobs are long done
            for old in list(self._attempts)[:5_000]:
                del self._attempts[old]
                self._began.pop(old, None)
                self._first.pop(old, None)
        self._add(job_id, {"attempt": attempt})

    def chunk(self, job_id: str, text: str) -> None:
        if text:
            if job_id not in self._first and job_id in self._began:
                self._first[job_id] = time.monotonic() - self._began[job_id]
            self._add(job_id, {"t": text, "a": self._attempts.get(job_id, "")})

    def first_token_s(self, job_id: str) -> float | None:
        """Seconds from the start of the job's last attempt to its first text (its time
        to first token), once; None if it streamed nothing."""
        self._began.pop(job_id, None)
        return self._first.pop(job_id, None)

    def _add(self, job_id: str, fields: dict[str, str]) -> None:
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.xadd(keys.job_stream(job_id), fields,  # type: ignore[arg-type]
                      maxlen=MAXLEN, approximate=True)
            pipe.expire(keys.job_stream(job_id), self.ttl_s)
            pipe.execute()
        except redis.RedisError:
            pass  # a lost entry costs a reader some text, never the job: the result is whole


def older(a: str, b: str) -> bool:
    """Whether stream entry id ``a`` comes before ``b``."""
    ta, sa = (int(x) for x in a.split("-"))
    tb, sb = (int(x) for x in b.split("-"))
    return (ta, sa) < (tb, sb)


class Cursor:
    """A reader's position in a job's stream and the attempt it is reading: turns raw
    entries into events (pure: the sync and the async reader share it). A chunk of
    another attempt than the one being read starts a new attempt, as an ``attempt``
    entry does."""

    def __init__(self, after: str = "0-0", attempt: str | None = None) -> None:
        self.after = after
        self.attempt = attempt
        self.ended = False

    def take(self, entries: list[tuple[Any, dict[str, Any]]]) -> list[Event]:
        """The events of entries read after ``after``; moves past them."""
        out: list[Event] = []
        for raw_id, fields in entries:
            entry_id = str(raw_id)
            if "t" in fields:
                attempt = str(fields.get("a") or "")
                if attempt and attempt != self.attempt:
                    if self.attempt is not None:  # an attempt entry that was not written
                        out.append(Event(self.after, "attempt", attempt))
                    self.attempt = attempt
                out.append(Event(entry_id, "chunk", str(fields["t"])))
            elif "attempt" in fields:
                self.attempt = str(fields["attempt"])
                out.append(Event(entry_id, "attempt", self.attempt))
            elif "end" in fields:
                out.append(Event(entry_id, "end", str(fields["end"])))
            self.after = entry_id
            if out and out[-1].kind == "end":
                self.ended = True
                return out
        return out

    def ending(self, meta: str) -> Event:
        """The ``end`` event of a job whose result is stored (its Celery meta)."""
        return self.ended_as(final_state(meta))

    def ended_as(self, state: str) -> Event:
        """The ``end`` event of a job that ended ``state``."""
        self.ended = True
        return Event(self.after, "end", state)

    @staticmethod
    def block_ms(until: float | None, now: float) -> int:
        """How long the next read may wait: ``BLOCK_MS``, less when the bound is near."""
        if until is None or until <= now:
            return BLOCK_MS
        return max(1, min(BLOCK_MS, int((until - now) * 1000)))

    @staticmethod
    def timed_out(until: float | None, now: float, got: bool) -> bool:
        """Whether a reader gives up: its bound has passed and the stream went quiet (a
        job still producing text keeps its reader past the bound)."""
        return until is not None and now >= until and not got

    @staticmethod
    def store_due(checked: float | None, now: float) -> bool:
        """Whether a reader whose job has no result in Redis asks the store again (at
        once the first time, then every ``STORE_CHECK_S``)."""
        return checked is None or now - checked >= STORE_CHECK_S

    @staticmethod
    def attempt_of(fields: dict[str, Any] | None) -> str | None:
        """The attempt an entry belongs to (resuming after it)."""
        if not fields:
            return None
        value = fields.get("a") if "t" in fields else fields.get("attempt")
        return str(value) if value else None


def text_of(events: list[Event]) -> str:
    """The text of the last attempt."""
    out: list[str] = []
    for e in events:
        if e.kind == "attempt":
            out = []
        elif e.kind == "chunk":
            out.append(e.text)
    return "".join(out)


def final_state(meta: str | None) -> str:
    """The final state in a job's Celery result meta ('' if there is none). A job that did
    not succeed has its record under ``promptbatch``; a succeeded job's record is Celery's
    ``result``."""
    if not meta:
        return ""
    data = orjson.loads(meta)
    record = data.get("promptbatch")
    if record is None and data.get("status") == "SUCCESS":
        record = data.get("result")
    return str((record or {}).get("state") or "")


def read(r: redis.Redis, job_id: str, after: str = "0-0", block_ms: int = BLOCK_MS, *,
         check_lost: bool = True) -> list[Event]:
    """Entries after ``after`` (waiting up to ``block_ms`` for the first); with
    ``check_lost`` (a reader resuming), a ``lost`` event first when entries after
    ``after`` were trimmed away."""
    cursor, events = _resume(r, job_id, after) if check_lost else (Cursor(after), [])
    reply: Any = r.xread({keys.job_stream(job_id): cursor.after}, count=READ_COUNT,
                         block=block_ms)
    for _, entries in reply or []:
        events += cursor.take(entries)
    return events


def _resume(r: redis.Redis, job_id: str, after: str) -> tuple[Cursor, list[Event]]:
    """The cursor of a reader resuming after ``after`` (and a ``lost`` event when the
    entries after it were trimmed away: it then reads from the oldest entry kept)."""
    if after == "0-0":
        return Cursor(), []
    name = keys.job_stream(job_id)
    first: Any = r.xrange(name, count=1)
    at: Any = r.xrange(name, min=after, max=after, count=1)
    if first and older(after, str(first[0][0])) and not at:
        return Cursor(), [Event(after, "lost")]
    return Cursor(after, Cursor.attempt_of(at[0][1] if at else None)), []


def follow(r: redis.Redis, job_id: str, after: str = "0-0", *,
           until: float | None = None,
           settled: Callable[[], str | None] | None = None) -> Iterator[Event]:
    """Every event from ``after`` on, until the ``end`` event (for a job whose stream has
    no ``end`` entry, or no stream at all, an ``end`` with its final state read from its
    result), or a ``timeout`` event once ``until`` (Unix time) has passed and the stream
    is quiet. ``settled``: the job's final state in the store ('' or None while it has
    none), asked while Redis holds no result (``Cursor.store_due``): a job whose result
    left Redis ends with it."""
    cursor, first = _resume(r, job_id, after)
    yield from first
    name = keys.job_stream(job_id)
    final: str | None = None  # the result, once stored: then drain what is left, and end
    state = ""  # the final state the store holds, when Redis has no result
    got = True
    checked: float | None = None
    while True:
        now = time.time()
        if final is None and Cursor.timed_out(until, now, got):
            yield Event(cursor.after, "timeout")
            return
        # The first read does not wait: a job long finished ends without a pause.
        block = None if final is not None or checked is None else Cursor.block_ms(until, now)
        reply: Any = r.xread({name: cursor.after}, count=READ_COUNT, block=block)
        entries = [entry for _, batch in reply or [] for entry in batch]
        got = bool(entries)
        yield from cursor.take(entries)
        if cursor.ended:
            return
        if got:
            continue
        if final is not None:
            yield cursor.ending(final) if not state else cursor.ended_as(state)
            return
        raw: Any = r.get(keys.celery_result(job_id))
        if raw is not None:  # every chunk was written before the result: read the rest
            final = str(raw)
        elif Cursor.store_due(checked, now):
            checked = now
            state = (settled() if settled is not None else None) or ""
            if state:  # final in the store, so every chunk is in the stream: drain, end
                final = ""
        if checked is None:
            checked = now
