"""The overview ``promptbatch status`` prints: what the active scheduler last reported,
with what finished in the last minute (``jobs.stats``)."""

from __future__ import annotations

import json
from typing import Any

import redis
from rich import box
from rich.console import Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from config import keys
from jobs.money import usd
from jobs.stats import read_recent
from scheduler.anomalies import Anomaly

#: The window of "last minute" figures, in seconds.
WINDOW_S = 60
#: Cleared anomalies shown.
RECENT_SHOWN = 5


def read_overview(r: redis.Redis, now: float) -> dict[str, Any] | None:
    """The active scheduler's overview (None if none reported lately), with per class
    ``finished``, ``missed`` and ``submitted`` in the last minute, and ``throughput``."""
    raw = r.get(keys.OVERVIEW)
    if raw is None:
        return None
    data: dict[str, Any] = json.loads(raw)
    recent = read_recent(r, now, WINDOW_S)
    for row in data["classes"]:
        row["submitted_last_min"] = recent.submitted.get(row["class"], 0)
        row["finished_last_min"] = recent.finished_in(row["class"])
        row["missed_last_min"] = recent.missed.get(row["class"], 0)
    data["throughput"] = round(recent.throughput, 3)
    data["age_s"] = round(max(0.0, now - float(data["at"])), 3)
    data.setdefault("anomalies", [])
    cleared: list[str] = r.zrevrange(keys.ANOMALIES_RECENT, 0,  # type: ignore[assignment]
                                     RECENT_SHOWN - 1)
    data["recent_anomalies"] = [json.loads(raw) for raw in cleared]
    return data


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _count(n: int, one: str, many: str = "") -> str:
    """``1 slot``, ``2 slots`` (``many``: a plural not made with an s)."""
    return f"{n} {one}" if n == 1 else f"{n} {many or one + 's'}"


def spend_line(money: dict[str, Any]) -> str:
    """Today's spend: the total, what was saved, and the three dearest tenants."""
    top = ", ".join(f"{t['tenant']} {usd(t['spent_usd'])}" for t in money["tenants"][:3])
    more = len(money["tenants"]) - 3
    return (f"spent today ({money['day']} UTC) {usd(money['spent_usd'])}, saved "
            f"{usd(money['saved_usd'])}" + (f": {top}" if top else "")
            + (f" and {more} more" if more > 0 else ""))


def _lane(lanes: dict[str, Any] | None) -> Table | Text | None:
    """The half-price lane: jobs waiting to join a provider batch, and the provider
    batches open (their age, jobs, and the provider's status and counts)."""
    if not lanes or not (lanes["open"] or lanes["waiting"]):
        return None
    head = (f"provider batches (half-price lane): {lanes['open']} open with "
            f"{_count(lanes['jobs'], 'job')}; {_count(lanes['waiting'], 'job')} waiting to "
            f"join one" + (f" (oldest {_duration(lanes['waiting_oldest_s'])})"
                           if lanes["waiting"] else ""))
    if not lanes["batches"]:
        return Text(head)
    table = Table(title=head, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("batch", "deployment", "state", "age", "jobs", "provider", "polls"):
        table.add_column(name, justify="right" if name in ("age", "jobs", "polls")
                         else "left", no_wrap=True)
    for row in lanes["batches"]:
        counts = row.get("counts") or {}
        status = row.get("provider_status") or "-"
        if counts:
            status += " " + " ".join(f"{k} {v}" for k, v in sorted(counts.items()) if v)
        table.add_row(row["id"][:8], row["deployment"], row["state"], _duration(row["age_s"]),
                      str(row["jobs"]), status, str(row["polls"]))
    return table


def render(data: dict[str, Any]) -> Group:
    """The overview as a table and a few lines."""
    table = Table(title="promptbatch (last minute: in, done, missed)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("class", "pending", "oldest", "slack", "in flight", "in", "done", "missed"):
        table.add_column(name, justify="left" if name == "class" else "right", no_wrap=True)
    for row in data["classes"]:
        missed = row["missed_last_min"]
        table.add_row(row["class"], str(row["pending"]),
                      _duration(row["oldest_wait_s"]) if row["pending"] else "-",
                      _duration(row["slack_s"]), str(row["inflight"]),
                      str(row["submitted_last_min"]), str(row["finished_last_min"]),
                      Text(str(missed), style="red" if missed else ""))
    cooling = ", ".join(data["cooling"]) or "none"
    lines: list[Table | Text | Padding] = [
        Text(f"throughput {data['throughput']:.1f} jobs/s over the last minute; "
             f"{_count(data['inflight'], 'batch', 'batches')} in flight (one takes about "
             f"{_duration(data['batch_seconds'])})"),
        Text(f"workers {data['workers']} with {_count(data['slots'], 'slot')}; the work "
             f"needs {_count(data['desired_slots'], 'slot')} ({data['scale_reason']})",
             style="yellow" if data["desired_slots"] > data["slots"] else ""),
        Text(f"deployments cooling down: {cooling}", style="red" if data["cooling"] else ""),
    ]
    money = data.get("spend_today")
    if money is not None:
        lines.append(Text(spend_line(money)))
    replicas = data.get("replicas") or []
    if replicas:
        table_r = Table(title="replicas (cache-aware routing)", title_justify="left",
                        box=box.SIMPLE_HEAD, pad_edge=False)
        for name in ("deployment", "replica", "in flight", "work", "latency", "affinity",
                     "health"):
            table_r.add_column(name, justify="left" if name in ("deployment", "replica")
                               else "right", no_wrap=True)
        for row in replicas:
            hits, misses = row["affinity_hits"], row["affinity_misses"]
            table_r.add_row(row["deployment"], row["replica"].split("://", 1)[-1],
                            str(row["outstanding"]), _duration(row["outstanding_s"]),
                            f"{row['latency_ratio']:.2f}x",
                            f"{hits}/{hits + misses}" if hits + misses else "-",
                            Text("cooling", style="red") if row["cooling"] else Text("ok"))
        lines.insert(0, table_r)
    lane = _lane(data.get("lanes"))
    if lane is not None:
        lines.insert(0, lane)
    lines += _anomalies(data)
    if data.get("catching_up"):
        lines.append(Text("the scheduler is still reading intake: pending counts will grow",
                          style="yellow"))
    lines.append(Text(f"as of {_duration(data['age_s'])} ago, from scheduler "
                      f"{data['scheduler']}", style="dim"))
    return Group(table, *lines)


def _anomalies(data: dict[str, Any]) -> list[Text | Padding]:
    """The anomalies section: the active ones, then the last few that cleared, a line each
    that wraps (a table of eight columns cut them short in an 80-column terminal, and left
    the action out); or that the active scheduler watches nothing, and which kinds act on
    nothing."""
    if data.get("anomaly_detection") is False:
        return [Text("anomalies: off (PROMPTBATCH_ANOMALY_DETECTION=false on the active "
                     "scheduler): nothing is learned, raised or acted on")]
    active = [Anomaly.load(json.dumps(a)) for a in data.get("anomalies") or []]
    recent = [Anomaly.load(json.dumps(a)) for a in data.get("recent_anomalies") or []]
    off = data.get("anomaly_actions_off") or []
    off_words = f"; actions off: {', '.join(off)}" if off else ""
    if not active and not recent:
        return [Text(f"anomalies: none (signals inside their learned baselines){off_words}")]
    at = float(data["at"])
    lines: list[Text | Padding] = [Text(f"anomalies (against learned baselines){off_words}:")]
    for a in active:
        actions = "; ".join(a.actions) or "no action"
        lines.append(_indented(f"{a.describe()}; for {_duration(max(0.0, at - a.raised_at))}"
                               f"; {actions}",
                               "red" if a.severity == "critical" else "yellow"))
    for a in recent:
        took = (a.cleared_at or a.raised_at) - a.raised_at
        lines.append(_indented(f"cleared {_duration(max(0.0, at - (a.cleared_at or at)))} "
                               f"ago: {a.describe()}; lasted {_duration(took)}, "
                               f"{a.cleared_why}", "dim"))
    return lines


def _indented(line: str, style: str) -> Padding:
    """A line of the anomalies section, wrapped two columns in."""
    return Padding(Text(line, style=style), (0, 0, 0, 2))
