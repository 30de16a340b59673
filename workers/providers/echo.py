"""``echo``: deterministic and instant; for tests and for measuring the pipeline itself."""

from __future__ import annotations

from collections.abc import Sequence

from jobs.models import Usage
from workers.providers.base import ProviderReply, ProviderRequest


def _tokens(text: str) -> int:
    return len(text) // 4 + 1


class EchoProvider:
    """Answers each prompt with ``echo: <prompt>``, cut to ``max_tokens`` tokens if set."""

    name = "echo"

    def complete(self, requests: Sequence[ProviderRequest]) -> list[ProviderReply]:
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
