"""``bench/cost.py``: its workload is what it says, and its three runs go to their end on
real processes (a second promptbatch playing OpenAI's Batch API for the lane), each run's
money read from what the system recorded."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from bench import cost

pytestmark = pytest.mark.integration


def test_the_workload_has_its_families_and_its_share_of_exact_repeats() -> None:
    jobs = cost.workload(2000, 40, 0.1)
    seen = Counter(json.dumps(j, sort_keys=True) for j in jobs)
    assert len(jobs) == 2000
    assert sum(n - 1 for n in seen.values()) == 200, "10% are copies of an earlier job"
    systems = {j["messages"][0]["content"] for j in jobs}
    assert len(systems) == 40
    assert min(len(s) for s in systems) // 4 >= 1024, "past OpenAI's caching threshold"
    assert {j["priority"] for j in jobs} == {"bulk"}
    assert all(j["params"]["temperature"] == 0 for j in jobs), "cacheable"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_each_run_ends_and_the_lane_run_pays_the_batch_discount(tmp_path: Path) -> None:
    args = cost.parse(["--jobs", "60", "--families", "4", "--lane-wait-s", "1",
                       "--time-scale", "0"])
    base, fast, lane = cost.measure(args, tmp_path)  # each checked: SQL, results, metrics
    assert base.answered == {"own call": 60} and base.sql_saved.get("coalesced", 0) == 0
    hits = fast.answered["exact"] + fast.answered["coalesced"]
    assert hits == 6 and fast.answered["own call"] == 54
    assert lane.lane_jobs == lane.answered["own call"] == 54
    assert lane.metric_saved["batch_discount"] == pytest.approx(lane.sql_cost)
    assert base.sql_cost / lane.sql_cost > 2
