"""The files a bulk run keeps: the first pass over the input, the spool of output rows,
and the ledger of submitted lines (real files in a temporary folder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptbatch.bulk import scan
from promptbatch.spool import Ledger, Spool


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


def _write_then_die(folder: Path, first: int, last: int, kill_after: int) -> None:
    """A process (forked) spools lines ``first..last`` and is SIGKILLed after
    ``kill_after`` of them: no flush, no close, as a crash leaves the files."""
    import os
    import signal
    import warnings

    with warnings.catch_warnings():  # (a forked child of a threaded process: it only
        warnings.simplefilter("ignore", DeprecationWarning)  # writes files, then dies)
        pid = os.fork()
    if pid == 0:  # the child: never returns into the test
        try:
            spool = Spool(folder)
            for n, line in enumerate(range(first, last + 1), start=1):
                spool.put(line, {"line": line, "text": "x" * (line % 7 * 40)})
                if n == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def _copied(spool: Spool, last: int) -> list[int]:
    """The lines the spool copies out: every one a whole JSON row."""
    import io

    buffer = io.BytesIO()
    spool.copy_to(buffer, last)
    return [json.loads(row)["line"] for row in buffer.getvalue().decode().splitlines()]


@pytest.mark.parametrize("kill_after", [1, 9, 30, 61, 150])
def test_a_spool_killed_at_any_point_copies_exactly_the_rows_it_says_it_has(
        tmp_path: Path, kill_after: int) -> None:
    """SIGKILLed while putting lines 1..200 (rows buffered, slots written at once), then
    again while putting the lines it did not have and some new ones; after each crash,
    ``has`` and ``copy_to`` agree and every row copied is whole; completed, the output
    has each line once, in order."""
    folder = tmp_path / "run"
    _write_then_die(folder, 1, 200, kill_after)
    spool = Spool(folder)
    have = [n for n in range(1, 201) if spool.has(n)]
    assert _copied(spool, 200) == have
    missing = [n for n in range(1, 201) if not spool.has(n)]
    spool.close()
    # The resumed process spools new lines over the bytes the lost rows had claimed, and
    # dies too (the lost lines are not spooled again yet).
    _write_then_die(folder, 201, 400, kill_after)
    spool = Spool(folder)
    have = [n for n in range(1, 401) if spool.has(n)]
    assert _copied(spool, 400) == have
    assert not set(missing) & set(have), "a slot of a lost row points into later rows"
    for n in range(1, 401):
        if not spool.has(n):
            spool.put(n, {"line": n})
    assert _copied(spool, 400) == list(range(1, 401))
    spool.close()
