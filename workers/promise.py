"""The schema promise, kept where the worker receives an answer.

Every final answer of a provider call goes through ``SchemaPromise.judge`` in the one
retry layer (``workers.retry``) before the one result path records it, so every way in
(chat, jobs, JSONL, Batch) keeps the same promise: a SUCCEEDED job that asked for a JSON
response format holds a ``parsed`` value that validates, and its tool calls' arguments
validate against their tools' parameters (``jobs.answers``).

An answer that does not validate is asked again, at most ``schema_retries`` times and
only while the job's deadline has not passed: in the retry layer's next round, as a
request of its own that carries the conversation, the answer and the validation error
(``jobs.answers.reask``). Asking in the same task rather than re-queueing the job into a
later batch of the scheduler keeps the job owned by its batch (no new state in Redis, no
second delivery, nothing that a crash could run twice), costs no scheduling tick, and
is how every other retry of a provider call is made; the request asked again still goes
out alone or with the batch's other re-asks, which share its provider, model and shape.
After the last try the job ends FAILED with ``error_code`` ``invalid_output``, its error
naming the first validation error, the raw answer kept in ``text`` (and its tool calls).

Counted in ``promptbatch_invalid_outputs_total{provider,model,outcome}``: ``retried``,
an answer that did not validate and was asked again; ``repaired``, a job whose answer
validated after being asked again; ``failed``, a job ended FAILED with
``invalid_output``. The usage of a job asked again is the sum of all its answers'.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from config.settings import Settings
from jobs.answers import INVALID_OUTPUT, Problem, check_answer, needs_check, reask
from jobs.models import Usage
from workers.metrics import INVALID_OUTPUTS, deployment_labels
from workers.providers.base import ProviderReply, ProviderRequest


def _add(a: Usage | None, b: Usage | None) -> Usage | None:
    if a is None or b is None:
        return a or b
    return Usage(prompt_tokens=a.prompt_tokens + b.prompt_tokens,
                 completion_tokens=a.completion_tokens + b.completion_tokens,
                 cached_tokens=a.cached_tokens + b.cached_tokens)


class SchemaPromise:
    """Checks the answers of one provider call (``ProviderCaller.call``) and decides
    which are asked again."""

    def __init__(self, settings: Settings, clock: Callable[[], float]) -> None:
        self.settings = settings
        self.clock = clock
        self._asked: dict[str, int] = {}
        self._checked: set[str] = set()
        #: The last answer of a job that did not validate, and why.
        self._invalid: dict[str, tuple[ProviderReply, Problem, str]] = {}
        #: The usage of a job's earlier answers (asked again).
        self._spent: dict[str, Usage | None] = {}

    def start(self, requests: Sequence[ProviderRequest]) -> None:
        """Forget the last call's jobs; note which of these have answers to check."""
        self._asked, self._invalid, self._spent = {}, {}, {}
        self._checked = {r.job_id for r in requests
                         if needs_check(r.response_format, r.tools)}

    def retries(self, job_id: str) -> int | None:
        """How many times the job's answer was asked again (None: nothing checked)."""
        return self._asked.get(job_id, 0) if job_id in self._checked else None

    def judge(self, req: ProviderRequest, reply: ProviderReply,
              deployment: str) -> ProviderReply | ProviderRequest:
        """The reply to record (with its parsed value, or FAILED ``invalid_output``), or
        the request that asks again."""
        if req.job_id not in self._checked:
            return reply
        usage = _add(self._spent.get(req.job_id), reply.usage)
        if not reply.ok:
            return dataclasses.replace(reply, usage=usage)
        checked = check_answer(reply.text, reply.tool_calls, reply.refusal,
                               response_format=req.response_format, tools=req.tools,
                               tool_choice=req.tool_choice)
        asked = self._asked.get(req.job_id, 0)
        if checked.ok:
            self._invalid.pop(req.job_id, None)
            if asked:
                INVALID_OUTPUTS.labels(*deployment_labels(deployment), "repaired").inc()
            return dataclasses.replace(reply, parsed=checked.parsed, usage=usage)
        assert checked.problem is not None
        reply = dataclasses.replace(reply, usage=usage)
        self._invalid[req.job_id] = (reply, checked.problem, deployment)
        if asked < self.settings.schema_retries and (req.deadline is None
                                                     or self.clock() < req.deadline):
            self._asked[req.job_id] = asked + 1
            self._spent[req.job_id] = usage
            INVALID_OUTPUTS.labels(*deployment_labels(deployment), "retried").inc()
            messages = reask(req.messages, req.prompt, reply.text, reply.tool_calls,
                             checked.problem)
            return dataclasses.replace(req, prompt=None, messages=tuple(messages),
                                       text="\n".join(m.rendered() for m in messages))
        why = "" if asked >= self.settings.schema_retries else "; the deadline passed"
        failed = self.invalid(req.job_id, why)
        assert failed is not None
        return failed

    def invalid(self, job_id: str, why: str = "") -> ProviderReply | None:
        """The FAILED reply of a job whose last answer did not validate (None when it has
        none): the raw answer kept, the first validation error named. ``why``: what
        stopped the asking, when not the number of tries."""
        last = self._invalid.pop(job_id, None)
        if last is None:
            return None
        reply, problem, deployment = last
        INVALID_OUTPUTS.labels(*deployment_labels(deployment), "failed").inc()
        answers = self._asked.get(job_id, 0) + 1
        return dataclasses.replace(
            reply, error=f"invalid output: {problem} (after {answers} answer(s){why})",
            error_code=INVALID_OUTPUT, parsed=None, transient=False, whole_request=False)
