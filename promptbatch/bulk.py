"""A JSONL file of any size through promptbatch, in memory bounded by the work in flight.

``promptbatch run`` (and ``promptbatch submit --wait``) read the file twice, never holding
it: a first pass validates every line (a bad line is reported with its number and field
before anything is submitted), a second submits the lines in chunks while at most
``window`` jobs are pending (so neither this process nor the services hold more than
that), and collects results as they finish. Each result is appended, in the order it
finishes, to a spool file beside an index of fixed-size slots by line number; the output
file is then written in input order from them (``Spool.write``), without sorting or holding
the rows. The summary is built result by result (``SummaryBuilder``).

What it keeps in its run folder makes it resumable: ``submitted.tsv`` (line number and job
id, appended once a chunk is accepted) and the spool. Started again on the same file
after an interruption, it skips the lines submitted (without parsing them), waits for
their jobs still pending, and submits the rest; every line has an idempotency key derived
from the file's digest and its number, so a chunk cut short is matched to the jobs it
created, never submitted twice. The digest covers the options that change a job too
(``work_digest``): the same file with another ``--provider`` is a new run.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from jobs.errors import InvalidJob, JobNotFound
from jobs.models import JobRequest, JobResult
from jobs.prices import PriceBook
from promptbatch.jsonl import InputLine, parse_line, read_lines
from promptbatch.spool import Ledger, Spool
from promptbatch.summary import Summary, SummaryBuilder

#: Lines submitted per call (one SQL insert and one atomic Redis step each).
CHUNK = 1000
#: Jobs pending at most (submitted, not yet final) by default.
WINDOW = 40_000
#: Invalid lines kept for the report (the rest are counted).
REPORTED = 20
#: Seconds between two looks at every pending job's result, and at the SQL store's.
SWEEP_S = 1.0
SQL_SWEEP_S = 30.0
#: A result's answer fields besides its text, as output lines carry them.
ANSWER_FIELDS = ("tool_calls", "refusal", "finish_reason", "logprobs", "parsed")


@dataclass
class Scan:
    """The first pass: how many lines are valid, and the first invalid ones."""

    valid: int = 0
    invalid: int = 0
    errors: list[InvalidJob] = field(default_factory=list)
    last_line: int = 0


def file_digest(path: Path) -> str:
    """A short digest of the file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:20]


def work_digest(path: Path, options: Mapping[str, Any]) -> str:
    """A short digest of a bulk run's work: the file's bytes and every option that changes
    its jobs (a default provider, ...; None: not given). It is the prefix of its lines'
    idempotency keys and names its state, so the same file with other options is another
    run, never matched to the first one's jobs. Without options, the file's digest."""
    given = {k: v for k, v in options.items() if v is not None}
    digest = file_digest(path)
    if not given:
        return digest
    text = json.dumps({"file": digest, "options": given}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def scan(path: Path, provider: str | None = None, max_image_bytes: int | None = None,
         ) -> Scan:
    """Validate every line of the file, one at a time (constant memory); with
    ``provider``, the one the lines go to unless they name their own, and
    ``max_image_bytes``, the bound on an inline image (``parse_line``)."""
    out = Scan()
    try:
        for number, text in read_lines(path):
            out.last_line = number
            try:
                parse_line(number, text, provider, max_image_bytes)
                out.valid += 1
            except InvalidJob as exc:
                out.invalid += 1
                if len(out.errors) < REPORTED:
                    out.errors.append(exc)
    except InvalidJob as exc:  # a line that is not UTF-8 ends the file's reading
        out.invalid += 1
        if len(out.errors) < REPORTED:
            out.errors.append(exc)
    return out


def output_row(number: int, custom_id: str | None, job_id: str | None,
               res: JobResult | None, error: str | None = None) -> dict[str, Any]:
    """One line of the output file (``res`` None: an invalid line, with its ``error``):
    the answer (``text``, ``tool_calls``, ``refusal``, ``finish_reason``, ``logprobs``,
    ``parsed`` for a JSON response format), its usage and batch, on failure the ``error``
    and its ``error_code``, and how often an answer that did not validate was asked
    again (``schema_retries``)."""
    if res is None:
        return {"id": None, "job_id": None, "line": number, "state": "REJECTED",
                "text": None, **dict.fromkeys(ANSWER_FIELDS), "usage": None,
                "batch_id": None, "batch_size": None, "queued_ms": None,
                "latency_ms": None, "error": error, "error_code": None,
                "schema_retries": None}
    answer = res.model_dump(mode="json", include=set(ANSWER_FIELDS))
    return {"id": custom_id or job_id, "job_id": job_id,
            "line": number, "state": res.state.value, "text": res.text,
            **{k: answer[k] for k in ANSWER_FIELDS},
            "usage": res.usage.model_dump() if res.usage else None,
            "batch_id": res.batch_id, "batch_size": res.batch_size,
            "queued_ms": _ms(res.queued_ms), "latency_ms": _ms(res.latency_ms),
            "error": res.error, "error_code": res.error_code,
            "schema_retries": res.schema_retries}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass
class Progress:
    """What a bulk run has done so far."""

    submitted: int = 0
    finished: int = 0


class Backend(Protocol):
    """Where a bulk run sends its jobs and reads their results."""

    def submit(self, requests: list[JobRequest]) -> list[str]:
        """Submit jobs (all or none); their ids, in order."""
        ...

    def collect(self, pending: Collection[str], *, sweep: bool,
                sql: bool) -> list[JobResult]:
        """Results of pending jobs that finished since the last call (``sweep``: look at
        every pending job, not only the news; ``sql``: also where Redis lost them)."""
        ...

    def collected(self, job_ids: list[str]) -> None:
        """The results of these jobs are spooled: the backend may let them go."""
        ...

    def finished(self, job_ids: list[str]) -> list[JobResult]:
        """The results of jobs known to be final (a resumed run's earlier ones), those
        that can still be read."""
        ...


class LocalBackend:
    """Redis and the SQL store directly (``producers.client.Client``). ``forget``: the
    run owns its Redis (the local stack): a collected result and its job's keys are
    deleted from Redis at once (the SQL store keeps them), so that Redis holds only the
    work in flight."""

    def __init__(self, client: Any, forget: bool = False) -> None:
        self.client = client
        self.forget = forget
        self.cursor = self.client.queue.done_cursor()

    def submit(self, requests: list[JobRequest]) -> list[str]:
        return list(self.client.submit_many(requests))

    def collect(self, pending: Collection[str], *, sweep: bool,
                sql: bool) -> list[JobResult]:
        queue = self.client.queue
        self.cursor, done = queue.wait_done(self.cursor, 100)
        ids = [j for j in dict.fromkeys(done) if j in pending]
        found = [r for r in self._results(ids) if r is not None] if ids else []
        if (sweep or sql) and pending:
            have = {r.id for r in found}
            rest = [j for j in pending if j not in have]
            stored = [r for r in self._results(rest) if r is not None]
            found += stored
            if sql:
                seen = {r.id for r in stored}
                missing = [j for j in rest if j not in seen]
                if missing:
                    found += self._from_sql(missing)
        return found

    def collected(self, job_ids: list[str]) -> None:
        if self.forget and job_ids:
            self.client.queue.forget(job_ids)

    def finished(self, job_ids: list[str]) -> list[JobResult]:
        found = [r for r in self._results(job_ids) if r is not None]
        have = {r.id for r in found}
        rest = [j for j in job_ids if j not in have]
        for start in range(0, len(rest), 2000):
            stored = self.client.store.outcomes(rest[start:start + 2000])
            found += [JobResult.model_validate_json(raw) for raw in stored.values()
                      if raw is not None]
        return found

    def _results(self, ids: list[str]) -> list[JobResult | None]:
        out: list[JobResult | None] = []
        for start in range(0, len(ids), 2000):
            out += self.client.queue.results(ids[start:start + 2000])
        return out

    def _from_sql(self, ids: list[str]) -> list[JobResult]:
        """Results that left Redis (it expired them, or lost them): the SQL store's."""
        out: list[JobResult] = []
        for start in range(0, len(ids), 2000):
            part = ids[start:start + 2000]
            stored = self.client.store.outcomes(part)
            unknown = set(part) - stored.keys()
            if unknown:
                raise JobNotFound(sorted(unknown)[0])
            out += [JobResult.model_validate_json(raw) for raw in stored.values()
                    if raw is not None]
        return out


class BulkRun:
    """The second pass: submit in chunks within the window, collect, spool."""

    def __init__(self, backend: Backend, path: Path, folder: Path, digest: str, *,
                 window: int = WINDOW, chunk: int = CHUNK, skip_invalid: bool = False,
                 provider: str | None = None, prices: PriceBook | None = None,
                 max_image_bytes: int | None = None, count_earlier: bool = True) -> None:
        self.backend = backend
        self.path = path
        self.digest = digest
        self.window = window
        self.chunk = chunk
        self.skip_invalid = skip_invalid
        self.provider = provider
        #: The bound on an inline image lines are checked against (None: the service's).
        self.max_image_bytes = max_image_bytes
        #: Whether a resumed run's summary reads its earlier results again (a caller
        #: that prints no summary saves the reads).
        self.count_earlier = count_earlier
        self.spool = Spool(folder)
        self.ledger = Ledger(folder)
        self.summary = SummaryBuilder(prices)
        self.progress = Progress()
        #: job id -> (line, class, its own id) of the jobs pending.
        self.pending: dict[str, tuple[int, int, str | None]] = {}
        self.last_submitted = 0
        #: The last line of the file read (for writing the output).
        self.last_line = 0
        self._source: Iterator[tuple[int, str]] | None = None
        #: Where an interrupted run had got to, and its lines still pending then.
        self._resumed_to = 0
        self._resumed_pending: set[int] = set()

    def resume(self) -> int:
        """Take up what an interrupted run left: the lines submitted, and the jobs of
        those still pending. Returns how many lines were submitted already."""
        done = 0
        for number, job_id, cls, custom in self.ledger.read():
            self.last_submitted = max(self.last_submitted, number)
            done += 1
            if not self.spool.has(number):
                self.pending[job_id] = (number, cls, custom)
        self.progress.submitted = done
        self.progress.finished = done - len(self.pending)
        self._resumed_to = self.last_submitted
        self._resumed_pending = {number for number, _, _ in self.pending.values()}
        return done

    def run(self, on_progress: Callable[[Progress], None],
            stall_timeout: float) -> Summary:
        """Submit what is left, collect every result; the summary of the whole file's
        results, as the output has them: a resumed run's earlier results are read again
        (``Summary.resumed``), and its speed is this call's."""
        self._count_earlier()
        started = time.time()
        exhausted = False
        last_progress = time.monotonic()
        next_sweep = next_sql = 0.0  # both at once first: a resumed run's jobs may be done
        while not exhausted or self.pending:
            while not exhausted and len(self.pending) < self.window:
                exhausted = not self.submit_next()
                on_progress(self.progress)
            now = time.monotonic()
            sweep, sql = now >= next_sweep, now >= next_sql
            if sweep:
                next_sweep = now + SWEEP_S
            if sql:
                next_sql = now + SQL_SWEEP_S
            got = self._collect(sweep, sql)
            if got:
                last_progress = time.monotonic()
                on_progress(self.progress)
            elif time.monotonic() - last_progress > stall_timeout:
                raise TimeoutError(f"no job finished for {stall_timeout:g} s; "
                                   f"{len(self.pending)} still pending")
        self.spool.flush()
        return self.summary.build(time.time() - started)

    def _count_earlier(self) -> None:
        """Add to the summary the results an interrupted run spooled: the ledger's jobs
        whose lines are spooled (read from the ledger and the backend a chunk at a time,
        never held)."""
        if not self._resumed_to or not self.count_earlier:
            return
        batch: list[tuple[str, int]] = []
        for number, job_id, cls, _ in self.ledger.read():
            if job_id not in self.pending and self.spool.has(number):
                batch.append((job_id, cls))
            if len(batch) >= CHUNK:
                self._add_earlier(batch)
                batch = []
        self._add_earlier(batch)

    def _add_earlier(self, jobs: list[tuple[str, int]]) -> None:
        if not jobs:
            return
        classes = dict(jobs)
        found = self.backend.finished(list(classes))
        for res in found:
            self.summary.add(res, classes[res.id], earlier=True)
        self.summary.not_found += len(classes) - len({r.id for r in found})

    def submit_next(self) -> bool:
        """Submit the next chunk of lines; False once every line is submitted."""
        if self._source is None:
            self._source = self._lines()
        return self._submit_chunk(self._source)

    def _lines(self) -> Iterator[tuple[int, str]]:
        """The lines still to submit: those past where an interrupted run had got to, and
        those before it that it neither submitted nor spooled for good (an invalid line
        whose row it lost)."""
        for number, text in read_lines(self.path):
            self.last_line = number
            if number > self._resumed_to or not (number in self._resumed_pending
                                                 or self.spool.has(number)):
                yield number, text

    def _submit_chunk(self, lines: Iterator[tuple[int, str]]) -> bool:
        """Submit the next chunk of valid lines (spooling the invalid ones, with
        ``skip_invalid``); False once the file is read."""
        parsed: list[InputLine] = []
        for number, text in lines:
            try:
                parsed.append(parse_line(number, text, self.provider,
                                         self.max_image_bytes))
            except InvalidJob as exc:
                if not self.skip_invalid and number > self._resumed_to:
                    raise  # (before it: a line the interrupted run skipped)
                self.spool.put(number, output_row(number, None, None, None, str(exc)))
            if len(parsed) >= self.chunk:
                break
        if not parsed:
            return False
        requests = []
        for ln in parsed:
            update: dict[str, Any] = {}
            if ln.request.idempotency_key is None:
                update["idempotency_key"] = f"run:{self.digest}:{ln.number}"
            if ln.request.provider is None and self.provider:
                update["provider"] = self.provider
            requests.append(ln.request.model_copy(update=update) if update else ln.request)
        ids = self.backend.submit(requests)
        rows = [(ln.number, job_id, int(ln.request.priority), ln.custom_id)
                for ln, job_id in zip(parsed, ids, strict=True)]
        self.ledger.append(rows)
        for ln, job_id in zip(parsed, ids, strict=True):
            self.pending[job_id] = (ln.number, int(ln.request.priority), ln.custom_id)
        self.last_submitted = max(self.last_submitted, parsed[-1].number)
        self.progress.submitted += len(parsed)
        return True

    def _collect(self, sweep: bool, sql: bool) -> int:
        """Spool the results of pending jobs that finished; return how many."""
        found = self.backend.collect(self.pending, sweep=sweep, sql=sql)
        taken: list[str] = []
        for res in found:
            entry = self.pending.pop(res.id, None)
            if entry is None:
                continue
            number, cls, custom = entry
            self.spool.put(number, output_row(number, custom, res.id, res))
            self.summary.add(res, cls)
            self.progress.finished += 1
            taken.append(res.id)
        self.backend.collected(taken)
        return len(taken)
