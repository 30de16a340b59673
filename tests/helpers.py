"""Test helpers: polling with a deadline instead of sleeping."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def poll(check: Callable[[], T], *, timeout: float = 30.0, interval: float = 0.02,
         what: str = "the condition", proc: subprocess.Popen[bytes] | None = None) -> T:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def provider_calls(call_log: Path | None) -> Counter[str]:
    """How many provider calls each job was part of, from the echo provider's own call
    log (``echo_call_log``): counted where the calls happen, whatever the tasks report."""
    calls: Counter[str] = Counter()
    if call_log is None or not call_log.exists():
        return calls
    for line in call_log.read_text(encoding="utf-8").splitlines():
        calls.update(json.loads(line)["jobs"])
    return calls
