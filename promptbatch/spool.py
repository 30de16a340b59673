"""The files a bulk run keeps in its folder, so that it can be resumed after any crash:
the spool of output rows (``Spool``: rows in the order results come, an index of slots by
line number, the output written in line order from them) and the ledger of the lines
submitted (``Ledger``: each accepted line's number and job id)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

_SLOT = struct.Struct("<QI")  # offset, length of a line's row in the spool


class Spool:
    """Output rows in the order they come, and where each line's row is: ``put`` appends
    the row and writes its slot (offset, length) at ``line * 12`` of the index; ``write``
    copies the rows to the output in line order.

    A process killed at any point leaves it consistent for the next one: the index may
    have reached the disk before the rows (a slot is written at once, rows are buffered),
    so opening clears every slot that points past the rows the file holds. Those lines
    count as not spooled (``has``), are spooled again, and no slot points into the rows
    appended after them."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.rows: BinaryIO = (folder / "spool.jsonl").open("a+b")
        self.index: BinaryIO = (folder / "spool.index").open("a+b")
        self.index.close()
        self.index = (folder / "spool.index").open("r+b")
        self.rows.seek(0, os.SEEK_END)
        self._clear_lost(self.rows.tell())

    def _clear_lost(self, kept: int) -> None:
        """Zero every slot whose row does not lie whole within the first ``kept`` bytes of
        the rows (a run died before its rows reached the file), reading the index once."""
        block_size = _SLOT.size * 8192
        at = 0
        while True:
            self.index.seek(at)
            block = self.index.read(block_size)
            whole = len(block) - len(block) % _SLOT.size
            if not whole:
                break
            lost = [n for n, (offset, length) in enumerate(_SLOT.iter_unpack(block[:whole]))
                    if length and offset + length > kept]
            for n in lost:
                self.index.seek(at + n * _SLOT.size)
                self.index.write(bytes(_SLOT.size))
            at += whole
        self.index.flush()

    def put(self, line: int, row: dict[str, Any]) -> None:
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        offset = self.rows.tell()
        self.rows.write(data)
        self.index.seek(line * _SLOT.size)
        self.index.write(_SLOT.pack(offset, len(data)))

    def has(self, line: int) -> bool:
        self.index.seek(line * _SLOT.size)
        raw = self.index.read(_SLOT.size)
        if len(raw) < _SLOT.size:
            return False
        return bool(_SLOT.unpack(raw)[1])

    def flush(self) -> None:
        self.rows.flush()
        self.index.flush()

    def write(self, out: Path, last_line: int) -> int:
        """Write every spooled row to ``out`` in line order (through a temporary file, so
        ``out`` is whole or absent); return how many."""
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        with tmp.open("wb") as fh:
            written = self.copy_to(fh, last_line)
        tmp.replace(out)
        return written

    def copy_to(self, fh: BinaryIO, last_line: int) -> int:
        """Copy every spooled row up to ``last_line`` to ``fh`` in line order."""
        self.flush()
        written = 0
        self.index.seek(0)
        with open(self.rows.name, "rb") as rows:
            for _ in range(last_line + 1):
                raw = self.index.read(_SLOT.size)
                if len(raw) < _SLOT.size:
                    break
                offset, length = _SLOT.unpack(raw)
                if length:
                    rows.seek(offset)
                    fh.write(rows.read(length))
                    written += 1
        fh.flush()
        return written

    def close(self) -> None:
        self.rows.close()
        self.index.close()


class Ledger:
    """``submitted.tsv``: each accepted line's number and job id, appended per chunk."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "submitted.tsv"

    def read(self) -> Iterator[tuple[int, str, int, str | None]]:
        """``(line, job id, class, the line's own id)`` of every line recorded."""
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as fh:
            for raw in fh:
                if not raw.endswith("\n"):
                    return  # a record cut short by a crash: its chunk is submitted again
                number, job_id, cls, custom = raw[:-1].split("\t", 3)
                yield int(number), job_id, int(cls), json.loads(custom)

    def append(self, rows: list[tuple[int, str, int, str | None]]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(f"{n}\t{j}\t{c}\t{json.dumps(o)}\n" for n, j, c, o in rows))
