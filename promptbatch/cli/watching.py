"""Watching: the commands that show what the service is doing, read-only. ``status`` gives
one job's state (and result), or the overview of the whole service (per class pending,
waits, in flight, finished; workers and slots), once, refreshed, or as JSON. Other views of
a running service (spending, anomalies) belong here too."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.console import Console

from config.settings import Settings
from jobs.errors import PromptBatchError
from promptbatch.cli.common import console, need_redis, refuse, settings_or_exit


def status(
    job_id: Annotated[str | None, typer.Argument(
        help="A job's id (or the id its input line gave it); without one, the overview of "
        "the whole service.")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh the overview until "
                                        "Ctrl-C.")] = False,
    every: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes of "
                                         "--watch.")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the overview as JSON (for "
                                          "scripts).")] = False,
    tenant: Annotated[str | None, typer.Option(help="The tenant whose job is meant, when "
                                               "several tenants use the same id of their "
                                               "own.")] = None,
) -> None:
    """Print a job's state (and its result once final), or the service's overview: per
    class pending, oldest wait, in flight, finished and missed in the last minute;
    workers, slots and the slots the work needs; deployments cooling down."""
    settings = settings_or_exit()
    need_redis(settings)
    if job_id is None:
        _overview(settings, watch=watch, every=every, as_json=as_json)
        return
    from producers.client import Client

    try:
        with Client(settings) as client:
            client.check()
            stored = client.store.find(job_id, tenant)  # its id, or its line's own id
            if stored is None:
                raise refuse(PromptBatchError(f"no job with id or client_id {job_id!r} in "
                                               f"the job store {client.store.where}"))
            state = client.status(stored.spec.id)
            if state.final:
                print(json.dumps(client.result(stored.spec.id, timeout=1).public()))
            else:
                print(json.dumps({"id": stored.spec.id, "client_id": stored.spec.client_id,
                                  "state": state.value}))
    except PromptBatchError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc


def _overview(settings: Settings, *, watch: bool, every: float, as_json: bool) -> None:
    from redis import RedisError
    from rich.live import Live

    from jobs.queue import connect
    from promptbatch.overview import read_overview, render

    r = connect(settings.redis_url, socket_timeout=5, connect_timeout=5, fail_fast=True)
    try:
        data = read_overview(r, time.time())
        if data is None:
            raise refuse(PromptBatchError(
                "no active scheduler has reported in the last 15 s on this Redis: start "
                "`promptbatch scheduler` (or `promptbatch up`), or check "
                "PROMPTBATCH_REDIS_URL"))
        if as_json:
            print(json.dumps(data))
            return
        out = Console()  # the overview is the command's output: stdout
        if not watch:
            out.print(render(data))
            return
        with Live(render(data), console=out, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(every)
                    data = read_overview(r, time.time()) or data
                    live.update(render(data), refresh=True)
            except KeyboardInterrupt:
                pass
    except RedisError as exc:
        raise refuse(PromptBatchError(f"cannot reach Redis at PROMPTBATCH_REDIS_URL: {exc}")) \
            from None
    finally:
        r.close()

