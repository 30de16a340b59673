"""The collector's pause around bulk steps, and its set-up for long-running services."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading

from jobs import gcpause


def test_pauses_nest_and_restore_the_collector() -> None:
    assert gc.isenabled()
    with gcpause.paused():
        assert not gc.isenabled()
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer pause still holds
    assert gc.isenabled()


def test_a_pause_in_another_thread_keeps_the_collector_off_until_both_end() -> None:
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with gcpause.paused():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(5)
    with gcpause.paused():
        pass
    assert not gc.isenabled()  # the other thread's pause is still on
    release.set()
    t.join(5)
    assert gc.isenabled()


def test_a_service_freezes_what_it_started_with_and_collects_less_often() -> None:
    # In a fresh interpreter: the settings are the process's own.
    code = ("import gc; from jobs import gcpause; before = gc.get_freeze_count(); "
            "gcpause.tune_for_service(); "
            "print(before, gc.get_freeze_count(), *gc.get_threshold())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    before, frozen, *thresholds = map(int, out)
    assert before == 0 and frozen > 1_000  # the modules' objects, out of the scans
    assert tuple(thresholds) == gcpause.SERVICE_THRESHOLDS
