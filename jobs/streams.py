"""A streaming job's output, chunk by chunk, in a Redis Stream per job.

The worker appends as the provider produces: an ``attempt`` entry when a provider attempt
starts (a reader discards the text of the attempts before it: a retry, or a worker that
died mid-stream, starts over), ``t`` entries of text, and an ``end`` entry with the final
state once the result is stored. The stream is bounded (``MAXLEN``) and expires with the
result; a reader that falls behind the bound is told so (``lost``). Entry ids are the
SSE event ids, so a reader resumes after the last one it saw (``Last-Event-ID``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis

from config import keys

#: Most entries a job's stream keeps.
MAXLEN = 20_000


@dataclass(frozen=True)
class Event:
    """One entry of a job's stream: ``kind`` is attempt, chunk, end or lost."""

    id: str
    kind: str
    text: str = ""


class Sink:
    """Where a provider writes the chunks of the streaming jobs it runs."""

    def __init__(self, r: redis.Redis, ttl_s: int) -> None:
        self.r = r
        self.ttl_s = ttl_s

    def begin(self, job_id: str) -> None:
        """A provider attempt starts: readers discard the text of earlier attempts."""
        self._add(job_id, {"attempt": uuid.uuid4().hex[:8]})

    def chunk(self, job_id: str, text: str) -> None:
        if text:
            self._add(job_id, {"t": text})

    def end(self, job_ids: list[str], states: list[str]) -> None:
        """The jobs' results are stored (in one round trip)."""
        pipe = self.r.pipeline(transaction=False)
        for job_id, state in zip(job_ids, states, strict=True):
            pipe.xadd(keys.job_stream(job_id), {"end": state}, maxlen=MAXLEN,
                      approximate=True)
            pipe.expire(keys.job_stream(job_id), self.ttl_s)
        pipe.execute()

    def _add(self, job_id: str, fields: dict[str, str]) -> None:
        try:
            pipe = self.r.pipeline(transaction=False)
            pipe.xadd(keys.job_stream(job_id), fields,  # type: ignore[arg-type]
                      maxlen=MAXLEN, approximate=True)
            pipe.expire(keys.job_stream(job_id), self.ttl_s)
            pipe.execute()
        except redis.RedisError:
            pass  # a lost chunk costs a reader some text, never the job: the result is whole


def read(r: redis.Redis, job_id: str, after: str = "0-0", block_ms: int = 1000, *,
         check_lost: bool = True) -> list[Event]:
    """Entries after ``after`` (waiting up to ``block_ms`` for the first); with
    ``check_lost`` (a reader resuming), a ``lost`` event first when entries after
    ``after`` were trimmed away."""
    name = keys.job_stream(job_id)
    reply: Any = r.xread({name: after}, count=500, block=block_ms)
    out: list[Event] = []
    if check_lost and after != "0-0":
        first: Any = r.xrange(name, count=1)
        if first and older(after, str(first[0][0])) and not _has(r, name, after):
            out.append(Event(id=after, kind="lost"))
    for _, entries in reply or []:
        for entry_id, fields in entries:
            out.append(event_of(str(entry_id), fields))
    return out


def _has(r: redis.Redis, name: str, entry_id: str) -> bool:
    return bool(r.xrange(name, min=entry_id, max=entry_id, count=1))


def older(a: str, b: str) -> bool:
    """Whether stream entry id ``a`` comes before ``b``."""
    ta, sa = (int(x) for x in a.split("-"))
    tb, sb = (int(x) for x in b.split("-"))
    return (ta, sa) < (tb, sb)


def event_of(entry_id: str, fields: dict[str, str]) -> Event:
    """The event of a stream entry."""
    if "t" in fields:
        return Event(entry_id, "chunk", fields["t"])
    if "attempt" in fields:
        return Event(entry_id, "attempt", fields["attempt"])
    return Event(entry_id, "end", fields.get("end", ""))


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
    """The final state in a job's Celery result meta ('' if there is none)."""
    return str(json.loads(meta).get("promptbatch", {}).get("state", "")) if meta else ""


def follow(r: redis.Redis, job_id: str, after: str = "0-0") -> Iterator[Event]:
    """Every event from ``after`` on, until the ``end`` event (for a job that ended with
    no stream, as one answered from the cache, an ``end`` with its final state). Only
    the first read checks whether ``after`` was trimmed away: a reader that keeps
    reading stays within the stream's bound."""
    check = True
    while True:
        events = read(r, job_id, after, check_lost=check)
        check = False
        for e in events:
            yield e
            if e.kind == "end":
                return
            after = e.id if e.kind != "lost" else "0-0"  # from the oldest entry kept
        if not events:
            raw: Any = r.get(keys.celery_result(job_id))
            if raw is not None and not r.exists(keys.job_stream(job_id)):
                yield Event(after, "end", final_state(raw))
                return
