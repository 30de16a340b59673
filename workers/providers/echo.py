"""``echo``: deterministic and instant; for tests and for measuring the pipeline itself.

It answers ``echo: <prompt>`` (cut to ``max_tokens`` tokens of four characters), or in
kind when the job asks for JSON or gives tools (``workers.providers.inkind``: JSON that
validates against the schema, tool calls whose arguments fit the tool's parameters;
never cut), with logprobs when asked.

Its usage follows the rule ``simulated`` states (``workers.providers.inkind.prompt_tokens``
counts for both, so that the two stub providers count a request alike): prompt tokens
are the prompt's text at four characters a token (plus one), each image by its
``detail`` (85 low, 765 high or auto: ``jobs.chat.image_tokens``), and the tool
definitions and a ``json_schema`` response format as their JSON text, four characters a
token; completion tokens are what it writes (the text, or each tool call's name and
arguments), four characters a token (plus one).

Test hooks, written in the prompt, obeyed only when the ``echo_test_hooks`` setting is on
(never by default: they let whoever submits a job stall or kill a worker):
``[echo:sleep=SECONDS]`` makes the call last that long (a batch's call lasts the longest
such sleep, as if its requests ran in parallel), and ``[echo:crash]`` kills the worker
process during the call (a poison job); ``[echo:chunk_ms=MS]`` spaces a streaming job's
chunks (one per word) that far apart, and ``[echo:crash_after=N]`` kills the worker after
the N-th chunk (a worker lost mid-stream; with a call log, only on the job's first
call). With ``echo_call_log`` set, every call is
recorded first, as one JSON line ``{"pid", "jobs"}``: tests count provider calls there.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from jobs.models import Usage
from jobs.streams import Sink
from workers.providers.base import ProviderReply, ProviderRequest
from workers.providers.inkind import answer, prompt_tokens

_SLEEP = re.compile(r"\[echo:sleep=([0-9.]+)\]")
_CHUNK_MS = re.compile(r"\[echo:chunk_ms=([0-9.]+)\]")
_CRASH_AFTER = re.compile(r"\[echo:crash_after=([0-9]+)\]")
_WORD = re.compile(r"\S+\s*|\s+")


def _tokens(text: str) -> int:
    return len(text) // 4 + 1


class EchoProvider:
    """Answers each prompt with ``echo: <prompt>`` (or in kind), cut to ``max_tokens``
    tokens if set."""

    name = "echo"
    probe_first = False
    streams = True

    def __init__(self, *, hooks: bool = False, call_log: Path | None = None) -> None:
        self.hooks = hooks
        self.call_log = call_log
        #: Where streaming jobs' chunks go (set by the worker).
        self.sink: Sink | None = None

    def _record(self, requests: Sequence[ProviderRequest]) -> None:
        assert self.call_log is not None
        line = json.dumps({"pid": os.getpid(), "jobs": [r.job_id for r in requests]}) + "\n"
        fd = os.open(self.call_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())  # one write: lines of processes do not interleave
        finally:
            os.close(fd)

    def complete(self, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
        if self.call_log is not None:
            self._record(requests)
        if self.hooks:
            if any("[echo:crash]" in req.text for req in requests):
                os.kill(os.getpid(), signal.SIGKILL)
            pauses = [float(m.group(1)) for req in requests if (m := _SLEEP.search(req.text))]
            if pauses:
                time.sleep(max(pauses))
        replies: list[ProviderReply] = []
        for req in requests:
            text = f"echo: {req.text}"
            limit = req.params.max_tokens
            cut = limit is not None and len(text) > limit * 4
            if limit is not None:
                text = text[: limit * 4]
            said = answer(req, text, cut=cut)
            if req.stream and self.sink is not None:
                self._stream(req, said.text or "")
            usage = Usage(prompt_tokens=prompt_tokens(req),
                          completion_tokens=_tokens(said.emitted))
            replies.append(ProviderReply(
                job_id=req.job_id, text=said.text, usage=usage, tool_calls=said.tool_calls,
                finish_reason=said.finish_reason, logprobs=said.logprobs))
        return replies

    def _stream(self, req: ProviderRequest, text: str) -> None:
        assert self.sink is not None
        pause = crash = None
        if self.hooks:
            if m := _CHUNK_MS.search(req.text):
                pause = float(m.group(1)) / 1000.0
            if m := _CRASH_AFTER.search(req.text):
                crash = int(m.group(1))
        self.sink.begin(req.job_id)
        for i, word in enumerate(_WORD.findall(text), start=1):
            if pause:
                time.sleep(pause)
            self.sink.chunk(req.job_id, word)
            if crash is not None and i >= crash and self._first_call(req.job_id):
                os.kill(os.getpid(), signal.SIGKILL)

    def _first_call(self, job_id: str) -> bool:
        if self.call_log is None or not self.call_log.exists():
            return True
        calls = sum(1 for line in self.call_log.read_text().splitlines()
                    if job_id in json.loads(line)["jobs"])
        return calls <= 1

    def close(self) -> None:
        return None
