"""The folders of ``promptbatch run`` under ``data_dir/run``: one run at a time.

A run holds ``run.lock`` (an exclusive ``flock`` held by the command alone, with its pid
and its file written in it) from before it looks at any folder until it ends, so a second
``run`` on the same data folder, of the same file or of another, refuses and names the
first. Each run has a folder of its own, held by its stack's processes (``UpLock``). A run
of other work forgets the earlier folders (one run is resumable at a time), but deletes a
folder only when its lock is free: processes an interrupted run left holding one are
stopped first (their command is gone); a folder whose command still runs is left alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from promptbatch.stack import StackError, UpLock, read_holder, running_run


class RunFolders:
    """``data_dir/run``: its lock, and a folder per run."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / "run.lock"
        self.fd: int | None = None

    def folder(self, name: str) -> Path:
        return self.home / name

    def take(self, file: Path) -> RunFolders:
        """Hold the lock for this command (``StackError`` naming the run that has it)."""
        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_holder(fd)
            os.close(fd)
            raise StackError(running_run(self.home.parent, holder.get("pid"),
                                         holder.get("file"))) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "file": str(file.resolve())}).encode(),
                  0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def clear(self) -> list[Path]:
        """Delete every run folder whose lock is free or whose command is gone (stopping
        the processes it left first); return the folders kept (their command runs)."""
        kept: list[Path] = []
        if not self.home.is_dir():
            return kept
        for old in sorted(self.home.iterdir()):
            if old == self.path:
                continue
            if not old.is_dir():
                old.unlink(missing_ok=True)
                continue
            lock = UpLock(old)
            try:
                lock.acquire()
            except StackError:
                try:
                    lock.reclaim()
                except StackError:
                    kept.append(old)
                    continue
                lock.acquire()
            try:
                shutil.rmtree(old, ignore_errors=True)
            finally:
                lock.release()
        return kept
