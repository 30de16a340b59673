"""The overview `promptbatch status` prints, rendered from what a scheduler reports."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from promptbatch.overview import render


def _shown(**counts: int) -> str:
    data: dict[str, Any] = {
        "classes": [{"class": "normal", "pending": 3, "oldest_wait_s": 0.4, "slack_s": 9.0,
                     "inflight": 1, "submitted_last_min": 4, "finished_last_min": 1,
                     "missed_last_min": 0}],
        "cooling": [], "throughput": 0.5, "batch_seconds": 1.2, "scale_reason": "backlog",
        "replicas": [], "catching_up": False, "age_s": 0.3, "scheduler": "host:1",
        **counts}
    out = io.StringIO()
    Console(width=120, file=out).print(render(data))
    return " ".join(out.getvalue().split())


@pytest.mark.parametrize(("counts", "expected"), [
    ({"inflight": 1, "workers": 1, "slots": 1, "desired_slots": 1},
     ["1 batch in flight", "workers 1 with 1 slot;", "the work needs 1 slot (backlog)"]),
    ({"inflight": 2, "workers": 2, "slots": 4, "desired_slots": 0},
     ["2 batches in flight", "workers 2 with 4 slots;", "the work needs 0 slots (backlog)"]),
])
def test_counts_read_in_the_singular_and_the_plural(counts: dict[str, int],
                                                    expected: list[str]) -> None:
    shown = _shown(**counts)
    for words in expected:
        assert words in shown, shown


def test_todays_spend_names_the_dearest_tenants() -> None:
    from promptbatch.overview import spend_line

    money = {"day": "2026-12-06", "spent_usd": 12.5, "saved_usd": 0.031,
             "tenants": [{"tenant": t, "spent_usd": v, "saved_usd": 0.0}
                         for t, v in (("acme", 10.0), ("zeta", 2.0), ("beta", 0.4),
                                      ("tiny", 0.1))]}
    assert spend_line(money) == ("spent today (2026-12-06 UTC) $12.50, saved $0.0310: "
                                 "acme $10.00, zeta $2.00, beta $0.4000 and 1 more")
