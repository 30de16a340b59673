"""``echo``: deterministic and instant; for tests and for measuring the pipeline itself.

Test hooks, written in the prompt: ``[echo:sleep=SECONDS]`` makes the call last that
long (a batch's call lasts the longest such sleep, as if its requests ran in parallel),
and ``[echo:crash]`` kills the worker process during the call (a poison job).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Sequence

from jobs.models import Usage
from workers.providers.base import ProviderReply, ProviderRequest

_SLEEP = re.compile(r"\[echo:sleep=([0-9.]+)\]")


def _tokens(text: str) -> int:
    return len(text) // 4 + 1


class EchoProvider:
    """Answers each prompt with ``echo: <prompt>``, cut to ``max_tokens`` tokens if set."""

    name = "echo"

    def complete(self, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
        if any("[echo:crash]" in req.text for req in requests):
            os.kill(os.getpid(), signal.SIGKILL)
        pauses = [float(m.group(1)) for req in requests if (m := _SLEEP.search(req.text))]
        if pauses:
            time.sleep(max(pauses))
        replies: list[ProviderReply] = []
        for req in requests:
            text = f"echo: {req.text}"
            if req.params.max_tokens is not None:
                text = text[: req.params.max_tokens * 4]
            usage = Usage(prompt_tokens=_tokens(req.text), completion_tokens=_tokens(text))
            replies.append(ProviderReply(job_id=req.job_id, text=text, usage=usage))
        return replies

    def close(self) -> None:
        return None
