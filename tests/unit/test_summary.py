"""The run summary."""

from __future__ import annotations

import pytest

from jobs.models import JobResult, JobState, Usage
from jobs.money import usd
from promptbatch.summary import percentile, summarize


def test_percentile_by_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 50) is None


def test_summary_counts_batches_states_and_latency_per_class() -> None:
    results = [
        JobResult(id="a", state=JobState.SUCCEEDED, batch_id="b1", batch_size=2,
                  batch_similarity=0.9, created_at=0.0, finished_at=1.0,
                  usage=Usage(prompt_tokens=10, cached_tokens=5)),
        JobResult(id="b", state=JobState.SUCCEEDED, batch_id="b1", batch_size=2,
                  batch_similarity=0.9, created_at=0.0, finished_at=2.0,
                  usage=Usage(prompt_tokens=10, cached_tokens=5)),
        JobResult(id="c", state=JobState.EXPIRED, created_at=0.0, finished_at=3.0),
    ]
    s = summarize(results, [0, 0, 4], wall_s=3.0)
    assert (s.jobs, s.batches, s.mean_batch_size) == (3, 1, 2.0)
    assert s.mean_similarity == 0.9
    assert (s.succeeded, s.expired, s.failed) == (2, 1, 0)
    assert (s.prompt_tokens, s.cached_tokens) == (20, 10)
    assert [(c.name, c.jobs, c.p50_ms) for c in s.classes] == [("critical", 2, 1000.0),
                                                              ("bulk", 1, 3000.0)]


def test_a_result_after_its_deadline_counts_as_a_miss_like_an_expiry() -> None:
    results = [
        JobResult(id="on-time", state=JobState.SUCCEEDED, created_at=0.0, deadline=5.0,
                  finished_at=4.0),
        JobResult(id="late", state=JobState.SUCCEEDED, created_at=0.0, deadline=5.0,
                  finished_at=6.5),
        JobResult(id="expired", state=JobState.EXPIRED, created_at=0.0, deadline=5.0,
                  finished_at=5.0),
        JobResult(id="no-deadline", state=JobState.SUCCEEDED, created_at=0.0,
                  finished_at=60.0),
    ]
    s = summarize(results, [0, 0, 0, 0], wall_s=60.0)
    assert (s.with_deadline, s.missed_deadline) == (3, 2)
    assert [r.missed_deadline for r in results] == [False, True, True, False]


def test_the_summary_counts_jobs_answered_without_their_own_call() -> None:
    results = [JobResult(id="a", state=JobState.SUCCEEDED, created_at=0.0, finished_at=1.0),
               JobResult(id="b", state=JobState.SUCCEEDED, created_at=0.0, finished_at=1.0,
                         cache="exact", cache_source="a"),
               JobResult(id="c", state=JobState.SUCCEEDED, created_at=0.0, finished_at=1.0,
                         cache="coalesced", cache_source="a"),
               JobResult(id="d", state=JobState.SUCCEEDED, created_at=0.0, finished_at=1.0,
                         cache="exact", cache_source="a")]
    s = summarize(results, [2, 2, 2, 2], wall_s=1.0)
    assert s.from_cache == {"coalesced": 1, "exact": 2}


def test_percentiles_past_the_exact_range_are_within_one_percent() -> None:
    from promptbatch.summary import Quantiles

    q = Quantiles(exact_up_to=100)
    values = [float(v) for v in range(1, 100_001)]
    for v in values:
        q.add(v)
    assert q.values is None and q.count == 100_000  # folded into the histogram
    for p in (50, 90, 99):
        exact = percentile(values, p)
        assert exact is not None and abs(q.percentile(p) - exact) / exact < 0.011  # type: ignore[operator]
    assert len(q.buckets) < 1200  # bounded by the range of values, not their number


def test_checked_answers_are_counted_valid_at_first_repaired_or_failed() -> None:
    results = [
        JobResult(id="first", state=JobState.SUCCEEDED, schema_retries=0),
        JobResult(id="again", state=JobState.SUCCEEDED, schema_retries=1),
        JobResult(id="bad", state=JobState.FAILED, schema_retries=1,
                  error_code="invalid_output"),
        JobResult(id="plain", state=JobState.SUCCEEDED),
        JobResult(id="down", state=JobState.FAILED, schema_retries=1, error="HTTP 500"),
    ]
    s = summarize(results, [2] * 5, wall_s=1.0)
    assert (s.valid_first, s.repaired, s.invalid, s.checked) == (1, 1, 1, 3)
    assert s.schema_row() == ("answers checked: valid at first answer / repaired / failed",
                              "1 / 1 / 1")
    assert summarize(results[3:4], [2], wall_s=1.0).schema_row() is None


def test_the_summary_shows_what_the_run_cost_and_saved_by_reason() -> None:
    from jobs.costs import call_charge, hit_usage, priced
    from jobs.prices import PriceBook, library_price
    from promptbatch.summary import money_rows

    book = PriceBook()
    price = library_price("openai", "gpt-4o-mini")
    assert price is not None
    call = Usage(prompt_tokens=2000, cached_tokens=1500, completion_tokens=100)
    fast, _ = priced(JobResult(id="a", state=JobState.SUCCEEDED, provider="openai",
                               model="gpt-4o-mini", usage=call), book)
    lane, _ = priced(JobResult(id="b", state=JobState.SUCCEEDED, provider="openai",
                               model="gpt-4o-mini", usage=call, lane="provider_batch"), book)
    hit = JobResult(id="c", state=JobState.SUCCEEDED, provider="openai", model="gpt-4o-mini",
                    cache="exact", usage=hit_usage(call, price))
    unpriced = JobResult(id="d", state=JobState.SUCCEEDED, provider="openai",
                         model="no-such-model", usage=Usage(prompt_tokens=5))
    s = summarize([fast, lane, hit, unpriced], [2, 4, 2, 2], wall_s=1.0, prices=book)
    full = call_charge(call, price)
    assert full.cost is not None
    assert s.cost_usd == pytest.approx(full.cost * 1.5) and s.unpriced == 1
    assert s.saved_usd["exact_cache"] == pytest.approx(full.cost)
    assert s.saved_usd["batch_discount"] == pytest.approx(full.cost * 0.5)
    assert s.saved_usd["prefix_cache"] == pytest.approx(full.saved["prefix_cache"] * 1.5)
    rows = money_rows(s)
    assert rows[0] == ("cost", f"{usd(s.cost_usd)} (1 job without a price)")
    saved = sum(s.saved_usd.values())
    share = 100 * saved / (saved + s.cost_usd)
    assert rows[1] == (f"saved ({share:.0f}% of what it would have cost)", usd(saved))
    # A line per reason, each short enough for an 80-column terminal; every amount to 1%.
    assert rows[2:] == [(f"  by {k}", usd(v)) for k, v in sorted(s.saved_usd.items())]
    for amount, (_, shown) in zip([s.cost_usd, saved, *dict(sorted(s.saved_usd.items()))
                                   .values()], rows, strict=True):
        assert float(shown.split()[0].lstrip("$")) == pytest.approx(amount, rel=0.01)
    assert [k for k, _ in rows[2:]] == ["  by batch_discount", "  by exact_cache",
                                        "  by prefix_cache"]


def test_the_run_summary_with_its_money_fits_an_80_column_terminal() -> None:
    import io

    from rich.console import Console

    from jobs.costs import hit_usage, priced
    from jobs.prices import PriceBook
    from promptbatch.summary import summary_table

    book = PriceBook()
    price = book.price("simulated", "sim-1")
    call = Usage(prompt_tokens=180, cached_tokens=160, completion_tokens=96)
    results = [priced(JobResult(id=f"j{i}", state=JobState.SUCCEEDED, provider="simulated",
                                model="sim-1", usage=call, batch_id="b", batch_size=20,
                                batch_similarity=0.9, created_at=0.0, finished_at=1.0 + i,
                                deadline=100.0), book)[0] for i in range(20)]
    results.append(JobResult(id="twin", state=JobState.SUCCEEDED, provider="simulated",
                             model="sim-1", cache="coalesced", usage=hit_usage(call, price),
                             created_at=0.0, finished_at=2.0))
    s = summarize(results, [i % 5 for i in range(21)], wall_s=7.25, prices=book)
    assert s.cost_usd > 0 and set(s.saved_usd) == {"coalesced", "prefix_cache"}
    table = summary_table(s)
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(table)
    lines = out.getvalue().rstrip("\n").split("\n")
    assert len(lines) == table.row_count + 3, "a row wrapped:\n" + out.getvalue()
    assert max(len(line) for line in lines) <= 80


def test_a_resumed_runs_earlier_results_count_in_every_figure_but_the_speed() -> None:
    from rich.console import Console

    from promptbatch.summary import SummaryBuilder, summary_table

    builder = SummaryBuilder()
    for i in range(3):
        builder.add(JobResult(id=f"old{i}", state=JobState.SUCCEEDED, schema_retries=0,
                              usage=Usage(prompt_tokens=10, cost_usd=0.5)), 2, earlier=True)
    builder.add(JobResult(id="new", state=JobState.FAILED, error_code="invalid_output",
                          usage=Usage(prompt_tokens=10, cost_usd=0.5)), 2)
    s = builder.build(wall_s=2.0)
    assert (s.jobs, s.resumed, s.succeeded, s.failed) == (4, 3, 3, 1)
    assert (s.valid_first, s.invalid, s.cost_usd, s.prompt_tokens) == (3, 1, 2.0, 40)
    assert s.jobs_per_s == 0.5  # one job in this run's two seconds
    console = Console(width=200, record=True)
    console.print(summary_table(s))
    text = console.export_text()
    assert "of them finished before this run resumed" in text and "jobs/s (this run)" in text
