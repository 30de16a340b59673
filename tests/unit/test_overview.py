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


LANES = {"waiting": 3, "waiting_oldest_s": 12.0, "open": 1, "jobs": 40,
         "deployments": {"openai|gpt-4o-mini": {"open": 1, "jobs": 40, "oldest_s": 5400.0}},
         "batches": [{"id": "5f1c2d3e-aaaa", "deployment": "openai|gpt-4o-mini",
                      "state": "submitted", "jobs": 40, "age_s": 5400.0,
                      "provider_batch_id": "batch_abc", "provider_status": "in_progress",
                      "polls": 7, "counts": {"total": 40, "completed": 12, "failed": 0}}]}


def test_status_shows_the_open_provider_batches_their_age_and_jobs() -> None:
    shown = _shown(inflight=0, workers=1, slots=2, desired_slots=1, lanes=LANES)
    for words in ("provider batches (half-price lane): 1 open with 40 jobs; 3 jobs waiting "
                  "to join one (oldest 12.0 s)", "5f1c2d3e openai|gpt-4o-mini submitted",
                  "90.0 min 40 in_progress completed 12 total 40 7"):
        assert words in shown, shown
    quiet = _shown(inflight=0, workers=1, slots=2, desired_slots=1,
                   lanes={**LANES, "open": 0, "jobs": 0, "waiting": 0, "batches": []})
    assert "provider batches" not in quiet


def test_the_metrics_show_the_open_provider_batches_per_deployment() -> None:
    from scheduler.metrics import _lane_metrics

    samples = {(m.name, tuple(sorted(s.labels.items()))): s.value
               for m in _lane_metrics(LANES) for s in m.samples}
    labels = (("model", "gpt-4o-mini"), ("provider", "openai"))
    assert samples[("promptbatch_provider_batches_open", labels)] == 1
    assert samples[("promptbatch_provider_batch_jobs", labels)] == 40
    assert samples[("promptbatch_provider_batch_oldest_age_seconds", labels)] == 5400.0
    assert samples[("promptbatch_provider_batch_waiting_jobs", ())] == 3
