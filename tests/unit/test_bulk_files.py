"""The files a bulk run keeps: the first pass over the input, the spool of output rows,
and the ledger of submitted lines (real files in a temporary folder)."""

from __future__ import annotations

import json
from pathlib import Path

from promptbatch.bulk import Ledger, Spool, scan


def test_a_bad_line_near_the_end_is_found_by_the_first_pass(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    with src.open("w", encoding="utf-8") as fh:
        for i in range(1, 50_001):
            fh.write('{"prompt": "x", "priority": "urgent"}\n' if i == 45_000
                     else json.dumps({"prompt": f"line {i}"}) + "\n")
    found = scan(src)
    assert (found.valid, found.invalid, found.last_line) == (49_999, 1, 50_000)
    assert found.errors[0].line == 45_000 and found.errors[0].fields == ["priority"]


def test_the_spool_writes_rows_in_line_order_whatever_order_they_came(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "run")
    for line in (5, 1, 3, 2, 4):
        spool.put(line, {"line": line})
    out = tmp_path / "out.jsonl"
    assert spool.write(out, 5) == 5
    assert [json.loads(x)["line"] for x in out.read_text().splitlines()] == [1, 2, 3, 4, 5]
    spool.close()


def test_a_reopened_spool_ignores_slots_whose_rows_never_reached_the_file(
        tmp_path: Path) -> None:
    spool = Spool(tmp_path / "run")
    spool.put(1, {"line": 1})
    spool.put(2, {"line": 2})
    spool.flush()
    spool.close()
    rows = tmp_path / "run" / "spool.jsonl"
    rows.write_bytes(rows.read_bytes()[:-5])  # a crash: the index went out, not the rows
    again = Spool(tmp_path / "run")
    assert again.has(1) and not again.has(2) and not again.has(3)
    again.close()


def test_the_ledger_skips_a_record_cut_short(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    ledger.append([(1, "job-1", 2, "q1"), (2, "job-2", 4, None)])
    with ledger.path.open("a", encoding="utf-8") as fh:
        fh.write("3\tjob-3\t2")  # the process died mid-write
    assert list(ledger.read()) == [(1, "job-1", 2, "q1"), (2, "job-2", 4, None)]
