"""The ``promptbatch`` command line."""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from config import keys
from config.logging import setup_logging
from config.settings import PRIORITY_NAMES, Settings
from jobs.errors import InvalidJob, PromptBatchError
from promptbatch.summary import Summary

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="promptbatch: a task queue for LLM prompts with similarity batching.")
console = Console(stderr=True)

Provider = Annotated[str | None, typer.Option(help="Provider of jobs that name none: echo, "
                                              "simulated, openai or anthropic (default: "
                                              "PROMPTBATCH_DEFAULT_PROVIDER).")]


#: What to do when no Redis URL is set (one line, for every command that needs it).
NO_REDIS = ("PROMPTBATCH_REDIS_URL is not set: point it at the service's Redis (`promptbatch "
            "up` prints it and writes it to {env}; `source` that file in another terminal)")


def _need_redis(settings: Settings) -> str:
    """The Redis URL, or exit 2 with one line that says what to set."""
    if not settings.redis_url:
        console.print(f"[red]{NO_REDIS.format(env=settings.data_dir / 'up' / 'up.env')}[/red]",
                      soft_wrap=True)
        raise typer.Exit(2)
    return settings.redis_url


def _refuse(exc: Exception) -> typer.Exit:
    """Print an error as one line; the caller raises the returned exit (code 2)."""
    console.print(f"[red]{exc}[/red]", soft_wrap=True)
    return typer.Exit(2)


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        console.print(f"[red]invalid settings:[/red] {exc}{cause}", soft_wrap=True)
        raise typer.Exit(2) from exc


def _report_invalid(errors: list[InvalidJob], limit: int = 20) -> None:
    for err in errors[:limit]:
        console.print(f"[red]line {err.line}[/red]: " + "; ".join(
            f"[bold]{field}[/bold]: {msg}" for field, msg in err.errors))
    if len(errors) > limit:
        console.print(f"... and {len(errors) - limit} more invalid lines")


@app.command()
def run(
    file: Annotated[Path, typer.Argument(help="JSONL file, one prompt per line.")],
    out: Annotated[Path | None, typer.Option(help="Where to write one result per line.")] = None,
    provider: Provider = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker pool processes.")] = 2,
    skip_invalid: Annotated[bool, typer.Option(help="Submit the valid lines of a file with "
                                               "invalid ones.")] = False,
    timeout: Annotated[float, typer.Option(help="Give up when no job has finished for this "
                                           "many seconds.")] = 600.0,
    window: Annotated[int, typer.Option(min=1, help="Most jobs pending at once (the memory "
                                        "of the run and of the services is bounded by it, "
                                        "not by the file).")] = 40_000,
) -> None:
    """Run FILE on a local stack (embedded server, SQLite, scheduler, workers) and report.

    Any size of file: it is read twice (validated, then submitted in chunks while at most
    --window jobs are pending), never held in memory. Interrupted, the same command again
    resumes: it submits only the lines not yet submitted and completes the output."""
    from producers.client import Client
    from promptbatch.bulk import BulkRun, LocalBackend, file_digest
    from promptbatch.stack import LocalStack

    setup_logging("WARNING")
    if not file.is_file():
        console.print(f"[red]{file} is not a file[/red]")
        raise typer.Exit(2)
    base = _settings()
    digest = file_digest(file)
    key = hashlib.sha256(f"{digest}|{provider or ''}".encode()).hexdigest()[:16]
    run_dir = base.data_dir / "run" / key
    resuming = (run_dir / "scanned").exists()
    if not resuming:
        _scan_or_refuse(file, skip_invalid, provider or base.default_provider)
        _clear_runs(base.data_dir / "run")
        run_dir.mkdir(parents=True)
    env = {"PROMPTBATCH_DATABASE_URL": f"sqlite:///{(run_dir / 'promptbatch.db').resolve()}"}
    if "PROMPTBATCH_DATABASE_URL" in _explicit_env():
        env.pop("PROMPTBATCH_DATABASE_URL")
    if not base.redis_url:  # its own server: results leave Redis once read (the store
        # keeps them), so Redis holds the work in flight whatever the file's size
        env.update(PROMPTBATCH_RECONCILE_WRITE_BACK="0", PROMPTBATCH_RESULT_TTL_S="3600")
    if provider:
        env["PROMPTBATCH_DEFAULT_PROVIDER"] = provider
    stack = LocalStack(run_dir, workers=workers, env=env, redis_url=base.redis_url or None)
    _install_sigterm()
    try:
        with console.status("starting the local stack..."):
            _migrate_quietly(env.get("PROMPTBATCH_DATABASE_URL", base.database_url))
            stack.start()
        (run_dir / "scanned").touch()
        settings = _settings(redis_url=stack.redis_url,
                             database_url=env.get("PROMPTBATCH_DATABASE_URL"),
                             default_provider=provider)
        with Client(settings) as client:
            job = BulkRun(LocalBackend(client, forget=not base.redis_url), file,
                          run_dir / "output", digest, window=window,
                          skip_invalid=skip_invalid, provider=provider)
            before = job.resume()
            if before:
                console.print(f"resuming: {before} lines were submitted before, "
                              f"{job.progress.finished} of them have finished")
            summary = _run_with_progress(job, timeout)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping the local stack (run the same command "
                      "again to resume)[/yellow]")
        raise typer.Exit(130) from None
    except (PromptBatchError, TimeoutError) as exc:
        console.print(f"[red]{exc}[/red] (run the same command again to resume)")
        raise typer.Exit(1) from exc
    finally:
        stack.stop(grace_s=base.shutdown_grace_s)
    written = job.spool.write(out, job.last_line) if out is not None else 0
    job.spool.close()
    if out is not None:
        console.print(f"wrote {written} lines to {out}")
    shutil.rmtree(run_dir, ignore_errors=True)
    _print_summary(summary)


def _scan_or_refuse(file: Path, skip_invalid: bool, provider: str | None = None) -> None:
    """The first pass over a file: every line validated, one at a time (also for what
    ``provider``, the lines' provider unless they name one, cannot serve); invalid lines
    reported (and, without --skip-invalid, nothing submitted)."""
    from promptbatch.bulk import scan

    with console.status(f"checking {file}..."):
        found = scan(file, provider)
    if found.invalid:
        _report_invalid(found.errors)
        if found.invalid > len(found.errors):
            console.print(f"... and {found.invalid - len(found.errors)} more invalid lines")
        if not skip_invalid:
            console.print(f"[red]{found.invalid} invalid line(s): nothing was submitted.[/red] "
                          "Fix them, or pass --skip-invalid to submit the valid lines.")
            raise typer.Exit(2)


def _clear_runs(runs: Path) -> None:
    """Forget earlier runs' folders (of other files: one run is resumable at a time)."""
    if runs.is_dir():
        for old in runs.iterdir():
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)


def _run_with_progress(job: Any, timeout: float) -> Summary:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        sent = bar.add_task("submitted", total=None)
        done = bar.add_task("finished", total=None)

        def show(progress: Any) -> None:
            bar.update(sent, completed=progress.submitted)
            bar.update(done, completed=progress.finished, total=progress.submitted)

        summary: Summary = job.run(show, timeout)
        show(job.progress)
        return summary


def _migrate_quietly(database_url: str) -> None:
    """Bring a store this command owns up to date."""
    from jobs.store import JobStore

    store = JobStore(database_url)
    try:
        store.migrate()
    finally:
        store.close()


def _explicit_env() -> set[str]:
    import os

    return {k for k in os.environ if k.startswith("PROMPTBATCH_")}


def _install_sigterm() -> None:
    """Ctrl-C and SIGTERM both stop the run. SIGINT's handler is installed explicitly: a
    process started with SIGINT ignored (a background job of a non-interactive shell)
    has none."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _print_summary(s: Summary) -> None:
    table = Table(title="promptbatch run", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("jobs", str(s.jobs))
    table.add_row("batches", str(s.batches))
    table.add_row("mean batch size", f"{s.mean_batch_size:.1f}")
    table.add_row("mean similarity inside batches",
                  "-" if s.mean_similarity is None else f"{s.mean_similarity:.3f}")
    table.add_row("jobs/s", f"{s.jobs_per_s:.1f}")
    table.add_row("wall time", f"{s.wall_s:.2f} s")
    table.add_row("succeeded / failed / expired / cancelled",
                  f"{s.succeeded} / {s.failed} / {s.expired} / {s.cancelled}")
    if s.with_deadline:
        table.add_row("deadline misses (expired or late)",
                      f"{s.missed_deadline} of {s.with_deadline}")
    if s.prompt_tokens:
        table.add_row("prompt tokens cached",
                      f"{s.cached_tokens} of {s.prompt_tokens} "
                      f"({100.0 * s.cached_tokens / s.prompt_tokens:.0f}%)")
    if s.from_cache:
        table.add_row("answered without a provider call of their own",
                      ", ".join(f"{kind} {n}" for kind, n in s.from_cache.items()))
    if (checked := s.schema_row()) is not None:
        table.add_row(*checked)
    for c in s.classes:
        table.add_row(f"latency {c.name} ({c.jobs} jobs) p50 / p99",
                      f"{c.p50_ms or 0:.0f} / {c.p99_ms or 0:.0f} ms")
    Console().print(table)


@app.command()
def up(
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker pool processes.")] = 2,
    port: Annotated[int, typer.Option(help="Port of the HTTP API.")] = 8000,
    flower_port: Annotated[int, typer.Option(help="Port of Flower.")] = 5555,
    no_flower: Annotated[bool, typer.Option("--no-flower", help="Do not start Flower.")]
    = False,
    scheduler_metrics_port: Annotated[int, typer.Option(
        min=1, max=65535, envvar="PROMPTBATCH_UP_SCHEDULER_METRICS_PORT",
        help="Port of the scheduler's Prometheus /metrics (stable, for a scrape target).")]
    = 9464,
    worker_metrics_port: Annotated[int, typer.Option(
        min=1, max=65535, envvar="PROMPTBATCH_UP_WORKER_METRICS_PORT",
        help="Port of the worker's Prometheus /metrics.")] = 9465,
    providers: Annotated[str | None, typer.Option(
        help="Providers the service offers, comma-separated, the first the default (for "
        "example echo,simulated). Default: PROMPTBATCH_DEFAULT_PROVIDER and "
        "PROMPTBATCH_TENANT_PROVIDERS.")] = None,
) -> None:
    """Start the whole service on this machine: embedded Valkey (AOF, a password), the
    job store, a scheduler, a worker, the HTTP API and Flower. Ctrl-C stops it all; the
    next `up` finds the same jobs, keys and results."""
    from promptbatch.stack import StackError
    from promptbatch.up import Service

    setup_logging("WARNING")
    settings = _settings()
    env: dict[str, str] = {}
    if providers:
        names = [p.strip() for p in providers.split(",") if p.strip()]
        env["PROMPTBATCH_DEFAULT_PROVIDER"] = names[0]
        env["PROMPTBATCH_TENANT_PROVIDERS"] = json.dumps({"*": names})
    service = Service(settings, workers=workers, port=port, flower=not no_flower,
                      flower_port=flower_port, env=env,
                      metrics_ports={"scheduler": scheduler_metrics_port,
                                     "worker": worker_metrics_port})

    def first_signal(signum: int, frame: FrameType | None) -> None:
        _hold_signals(service)  # at once: a second signal is the cold stop
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, first_signal)
    signal.signal(signal.SIGINT, first_signal)
    grace = settings.shutdown_grace_s
    try:
        with console.status("starting promptbatch..."):
            service.start()
        _print_endpoints(service)
        service.watch()
    except KeyboardInterrupt:
        _hold_signals(service)
        console.print(f"stopping promptbatch: no new batch starts, running batches finish "
                      f"(up to {grace:g} s); Ctrl-C again stops at once")
    except (StackError, PromptBatchError) as exc:
        _hold_signals(service)
        console.print(f"[red]{exc}[/red]", soft_wrap=True)
        service.stop(grace_s=grace)
        raise typer.Exit(1) from None
    service.stop(grace_s=grace)
    console.print("stopped; the data stays in " + str(settings.data_dir))


def _hold_signals(stack: Any = None) -> None:
    """While stopping: a second Ctrl-C or SIGTERM is the cold stop (every process killed
    at once; running batches run again later), which still leaves nothing running."""
    def handler(signum: int, frame: FrameType | None) -> None:
        if stack is None:
            console.print("still stopping (waiting for the processes to finish)...")
            return
        console.print("stopping at once: running batches will run again")
        stack.cold()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _print_endpoints(service: Any) -> None:
    e = service.endpoints()
    out = Console(soft_wrap=True)
    out.print("[bold]promptbatch is up[/bold] (Ctrl-C stops it)", highlight=False)
    out.print(f"  API          {e.api_url}   docs: {e.api_url}/docs", highlight=False)
    if e.new_key:
        out.print(f"  API key      {e.new_key}   (admin key of tenant 'default', shown once: "
                  "keep it; send it as 'Authorization: Bearer <key>')", highlight=False)
    else:
        out.print("  API key      created on the first start: PROMPTBATCH_API_KEY in the file "
                  "below (another: `promptbatch keys add default --admin`)", highlight=False)
    if e.flower_url:
        out.print(f"  Flower       {e.flower_url}   user {e.flower_user}, password "
                  f"{e.flower_password}", highlight=False)
    out.print("  Metrics      " + "   ".join(f"{role}: {url}" for role, url in e.metrics.items()),
              highlight=False)
    out.print("  Status       promptbatch status --watch   (after sourcing the file below)",
              highlight=False)
    out.print(f"  Redis        PROMPTBATCH_REDIS_URL={e.redis_url}", highlight=False)
    out.print(f"  Job store    PROMPTBATCH_DATABASE_URL={e.database_url}", highlight=False)
    out.print(f"  Other terminals: source {e.env_file}   (then promptbatch submit / worker / "
              "status join this service)", highlight=False)
    out.print(f'  Try: curl -s {e.api_url}/v1/jobs -H "Authorization: Bearer '
              '$PROMPTBATCH_API_KEY" '
              """-H 'Content-Type: application/json' -d '{"prompt": "Hello"}'""",
              highlight=False)


MetricsPort = Annotated[int | None, typer.Option(
    "--metrics-port", min=0, max=65535, help="Serve Prometheus /metrics on this port (0: "
    "none; default PROMPTBATCH_METRICS_PORT).")]


def _serve_metrics(settings: Settings, port: int, registry: Any, what: str) -> None:
    from jobs.telemetry import serve

    try:
        serve(port, settings.metrics_host, registry, what)
    except OSError as exc:
        raise _refuse(exc) from None
    console.print(f"{what} metrics on http://{settings.metrics_host}:{port}/metrics",
                  highlight=False)


@app.command()
def scheduler(metrics_port: MetricsPort = None) -> None:
    """Run the scheduler against PROMPTBATCH_REDIS_URL (one is active; others stand by)."""
    settings = _settings()
    _need_redis(settings)
    from jobs import gcpause
    from scheduler.service import Scheduler

    setup_logging()
    service = Scheduler(settings)
    port = settings.metrics_port if metrics_port is None else metrics_port
    if port:
        _serve_metrics(settings, port, service.metrics.registry, "scheduler")

    def handler(signum: int, frame: FrameType | None) -> None:
        service.stop()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    gcpause.tune_for_service()
    try:
        service.run()
    except PromptBatchError as exc:  # schema behind, or another store
        raise _refuse(exc) from None


def _ready(settings: Settings) -> None:
    """Wait for Redis and the store, then check the schema and the store's identity (one
    line and exit 2 if this service must not start)."""
    from jobs.queue import RedisQueue, connect
    from jobs.readiness import wait_until_ready
    from jobs.store import JobStore

    store = JobStore(settings.database_url)
    r = connect(settings.redis_url)
    try:
        wait_until_ready(RedisQueue(r), store, settings.redis_url)
    except PromptBatchError as exc:
        raise _refuse(exc) from None
    finally:
        r.close()
        store.close()


@app.command()
def health(
    which: Annotated[str | None, typer.Argument(
        metavar="ROLE", help="api, scheduler, worker or flower (default: --role, else "
        "PROMPTBATCH_ROLE, else api).", show_default=False)] = None,
    role: Annotated[str, typer.Option(envvar="PROMPTBATCH_ROLE", help="The same as ROLE "
                                      "(the container's role).")] = "api",
    port: Annotated[int, typer.Option(envvar="PROMPTBATCH_PORT", help="Port of the API (or "
                                      "of Flower).")] = 8000,
) -> None:
    """Exit 0 if this machine's service of ROLE is healthy (the image's HEALTHCHECK)."""
    import socket

    import httpx

    role = which or role
    if role not in ("api", "scheduler", "worker", "flower"):
        console.print(f"[red]unknown role {role!r}: api, scheduler, worker or flower[/red]")
        raise typer.Exit(2)

    if role in ("api", "flower"):
        path = "/readyz" if role == "api" else "/healthcheck"
        try:
            ok = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=3).status_code == 200
        except httpx.HTTPError:
            ok = False
        raise typer.Exit(0 if ok else 1)
    from jobs.queue import connect

    settings = _settings()
    r = connect(_need_redis(settings), socket_timeout=3, connect_timeout=3, fail_fast=True)
    try:
        r.ping()
        if role == "worker":  # this host's worker reports its pool
            beats: dict[str, str] = r.hgetall(keys.WORKERS)  # type: ignore[assignment]
            host = socket.gethostname()
            ok = any(str(name).split("@", 1)[-1] == host
                     and time.time() - json.loads(v)["ts"] < 15 for name, v in beats.items())
            raise typer.Exit(0 if ok else 1)
    except Exception as exc:
        if isinstance(exc, typer.Exit):
            raise
        raise typer.Exit(1) from exc
    finally:
        r.close()


@app.command()
def migrate() -> None:
    """Bring the job store's schema up to date (run it once before the services start)."""
    from jobs.migrate import current_revision
    from jobs.store import JobStore

    setup_logging("WARNING")
    store = JobStore(_settings().database_url)
    try:
        before = current_revision(store.engine)
        store.migrate()
        after = current_revision(store.engine)
        print(f"job store {store.where}: schema {before or 'empty'} -> {after}; "
              f"store id {store.store_id()}")
    except Exception as exc:
        raise _refuse(exc) from None
    finally:
        store.close()


@app.command()
def worker(
    concurrency: Annotated[int | None, typer.Option(
        "--concurrency", "-c", min=1, help="Pool processes, as Celery's -c (default: "
        "PROMPTBATCH_WORKER_CONCURRENCY).")] = None,
    name: Annotated[str, typer.Option(help="Worker name (its host is appended).")] = "worker",
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "info",
    pool: Annotated[str, typer.Option(help="Celery pool: prefork, threads or solo.")] = "prefork",
    metrics_port: MetricsPort = None,
) -> None:
    """Run a Celery worker on our queues, consumed in priority order."""
    from jobs import telemetry

    settings = _settings()
    _need_redis(settings)
    port = settings.metrics_port if metrics_port is None else metrics_port
    if port and pool == "prefork":  # before any metric is defined: the pool's children
        folder = telemetry.use_multiprocess_dir()  # write their values to files
        atexit.register(shutil.rmtree, folder, True)
    from workers.factory import create_app

    setup_logging()
    _ready(settings)
    celery_app = create_app(settings)
    if port:
        _serve_metrics(settings, port, telemetry.registry_for_process(), "worker")
    pool_size = concurrency or settings.worker_concurrency
    celery_app.worker_main(argv=[
        "worker", "-Q", ",".join(keys.QUEUES), "-c", str(pool_size),
        "-l", loglevel, "-n", f"{name}@%h", "-P", pool, "--without-mingle", "--without-gossip"])


#: Flower's tasks page: a batch's description (class, size, deployment, similarity, first
#: job ids) and its result (succeeded, failed, expired, tokens cached) next to the times.
FLOWER_COLUMNS = "name,uuid,state,kwargs,result,received,runtime,worker"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def flower_argv(settings: Settings, port: int, address: str, basic_auth: str | None) -> list[str]:
    """Flower's command line: loopback unless a login is set, batches readable on the tasks
    page, task history kept in ``data_dir`` across restarts."""
    if not basic_auth and address not in LOOPBACK:
        raise ValueError(f"Flower on {address} would be open to anyone who can reach it: "
                         "set --basic-auth user:password (PROMPTBATCH_FLOWER_BASIC_AUTH, or "
                         "PROMPTBATCH_FLOWER_BASIC_AUTH_FILE), or listen on 127.0.0.1")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    argv = ["flower", f"--port={port}", f"--address={address}",
            f"--tasks_columns={FLOWER_COLUMNS}", "--persistent=True",
            f"--db={settings.data_dir / 'flower'}", "--state_save_interval=30000"]
    if basic_auth:
        argv.append(f"--basic_auth={basic_auth}")
    return argv


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to listen on (beyond loopback only "
                                         "with a login).")] = "127.0.0.1",
    basic_auth: Annotated[str | None, typer.Option(
        help="Login 'user:password' (default PROMPTBATCH_FLOWER_BASIC_AUTH).")] = None,
) -> None:
    """Run Flower for the workers: batches by class, size and deployment; their results;
    history kept across restarts."""
    settings = _settings()
    _need_redis(settings)
    login = basic_auth or (settings.flower_basic_auth.get_secret_value()
                           if settings.flower_basic_auth else None)
    try:
        argv = flower_argv(settings, port, address, login)
    except ValueError as exc:
        raise _refuse(exc) from None
    from workers.factory import create_app

    setup_logging()
    create_app(settings).start(argv=argv)


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="JSONL file, one prompt per line.")],
    url: Annotated[str | None, typer.Option(help="Base URL of a promptbatch API; without "
                                            "it, jobs go to PROMPTBATCH_REDIS_URL.")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="PROMPTBATCH_API_KEY",
                                                help="API key (or PROMPTBATCH_API_KEY).")]
    = None,
    wait: Annotated[bool, typer.Option(help="Wait for the results.")] = False,
    out: Annotated[Path | None, typer.Option(help="Where to write one result per line, in "
                                             "input order (implies --wait).")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Submit only the valid lines.")] = False,
    chunk: Annotated[int, typer.Option(min=1, max=10_000, help="Lines per request.")] = 1000,
    window: Annotated[int, typer.Option(min=1, help="With --wait: most jobs pending at "
                                        "once.")] = 40_000,
    provider: Provider = None,
) -> None:
    """Submit FILE; print the job ids, or wait and write the results (without --out, the
    same lines as --out would write, on standard output).

    Any size of file, in bounded memory. The same command run again after an interruption
    submits only the lines not yet acknowledged and completes the output (its state is
    kept in OUT.promptbatch-state, or FILE.promptbatch-state, until it ends).
    """
    from promptbatch.bulk import BulkRun, file_digest

    setup_logging("WARNING")
    if not file.is_file():
        console.print(f"[red]{file} is not a file[/red]")
        raise typer.Exit(2)
    waiting = wait or out is not None
    backend, closing = _backend(url, api_key)
    folder = Path(f"{out or file}.promptbatch-state")
    resumable = (folder / "scanned").exists()
    if not resumable:
        _scan_or_refuse(file, skip_invalid, provider)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scanned").touch()
    from promptbatch.remote import RemoteError

    try:
        job = BulkRun(backend, file, folder, file_digest(file),
                      window=window if waiting else 2**62, chunk=chunk,
                      skip_invalid=skip_invalid, provider=provider)
        job.resume()
        if not waiting:
            _submit_only(job)
        else:
            _run_with_progress(job, 24 * 3600.0)
            if out is not None:
                console.print(f"wrote {job.spool.write(out, job.last_line)} lines to {out}")
            else:
                job.spool.copy_to(sys.stdout.buffer, job.last_line)
    except RemoteError as exc:
        hint = " (run the same command again to resume)" if exc.retryable else ""
        console.print(f"[red]{exc}[/red]{hint}", soft_wrap=True)
        raise typer.Exit(1) from exc
    except PromptBatchError as exc:
        console.print(f"[red]{exc}[/red] (run the same command again to resume)")
        raise typer.Exit(1) from exc
    finally:
        closing()
    job.spool.close()
    shutil.rmtree(folder, ignore_errors=True)


def _backend(url: str | None, api_key: str | None) -> tuple[Any, Any]:
    """Where ``submit`` sends jobs (the API at ``url``, else Redis and the store), and
    what closes it."""
    from promptbatch.bulk import LocalBackend

    if url:
        from promptbatch.remote import RemoteBackend, RemoteClient

        if not api_key:
            console.print("[red]give --api-key or set PROMPTBATCH_API_KEY[/red]")
            raise typer.Exit(2)
        remote = RemoteClient(url, api_key)
        return RemoteBackend(remote), remote.close
    from producers.client import Client

    settings = _settings()
    _need_redis(settings)
    client = Client(settings)
    try:
        client.check()
    except PromptBatchError as exc:
        client.close()
        raise _refuse(exc) from None
    return LocalBackend(client), client.close


def _submit_only(job: Any) -> None:
    """Submit every line not yet submitted; print every line's job id in order."""
    from promptbatch.bulk import Ledger

    with console.status("submitting..."):
        while job.submit_next():
            pass
    for _, job_id, _, _ in Ledger(job.ledger.path.parent).read():
        print(job_id)


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve the HTTP API (and the OpenAI Batch API) with uvicorn; /metrics on its port."""
    import uvicorn

    from jobs import telemetry

    setup_logging()
    settings = _settings()
    _need_redis(settings)
    _ready(settings)
    if workers > 1 and settings.api_metrics:  # /metrics of any process sums them all
        folder = telemetry.use_multiprocess_dir()
        atexit.register(shutil.rmtree, folder, True)
    console.print(f"promptbatch API listening on http://{host}:{port} (docs at "
                  f"http://{host}:{port}/docs), {workers} worker process(es)", soft_wrap=True)
    uvicorn.run("producers.asgi:app", host=host, port=port, workers=workers,
                log_level="info", access_log=True, proxy_headers=False)


keys_app = typer.Typer(help="API keys of the HTTP API.", rich_markup_mode="markdown")
app.add_typer(keys_app, name="keys")


def _accounts() -> Any:
    from jobs.store import JobStore
    from producers.accounts import Accounts

    store = JobStore(_settings().database_url)
    try:
        store.check_schema()
    except PromptBatchError as exc:
        raise _refuse(exc) from None
    return Accounts(store)


ExpiresIn = Annotated[float | None, typer.Option(
    "--expires-in", min=0, help="Days until the key stops working (default: never).")]


@keys_app.command("add")
def keys_add(tenant: Annotated[str, typer.Argument(help="The key's tenant.")],
             key: Annotated[str | None, typer.Option(help="The key (default: a new random "
                                                     "one, printed once).")] = None,
             admin: Annotated[bool, typer.Option(help="An admin key: it may submit for any "
                                                 "tenant and read every tenant's jobs.")]
             = False,
             expires_in: ExpiresIn = None) -> None:
    """Add an API key for TENANT to the SQL store (only its SHA-256 is stored)."""
    import secrets

    new = key or f"pb-{secrets.token_urlsafe(24)}"
    until = None if expires_in is None else time.time() + expires_in * 86400
    _accounts().add_key(new, tenant, admin=admin, expires_at=until)
    print(new)


def _when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(at))


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")]
              = None) -> None:
    """The stored keys: prefix, tenant, admin, created, last used, expiry, state (never
    the keys themselves). Keys set in PROMPTBATCH_API_KEYS are not listed."""
    from rich.table import Table

    now = time.time()
    table = Table(box=None, pad_edge=False)
    for name in ("prefix", "tenant", "admin", "created (UTC)", "last used", "expires",
                 "state"):
        table.add_column(name, no_wrap=True)
    for k in _accounts().list_keys(tenant):
        state = ("revoked" if k.revoked_at is not None
                 else "expired" if not k.active(now) else "active")
        table.add_row(k.prefix, k.tenant, "yes" if k.admin else "no", _when(k.created_at),
                      _when(k.last_used_at), _when(k.expires_at), state)
    Console().print(table)


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(
        metavar="KEY_OR_PREFIX", help="The key, or its prefix as `keys list` shows it.")],
) -> None:
    """Revoke a key: every API process refuses it from its next request."""
    from producers.accounts import KeyError_

    try:
        info = _accounts().revoke(key)
    except KeyError_ as exc:
        console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(1) from None
    print(f"revoked {info.prefix} (tenant {info.tenant})")


@keys_app.command("rotate")
def keys_rotate(tenant: Annotated[str, typer.Argument(help="The tenant whose key to rotate.")],
                grace: Annotated[float, typer.Option(
                    "--grace", min=0, help="Hours the old keys keep working.")] = 24.0,
                admin: Annotated[bool, typer.Option(help="Rotate the tenant's admin keys.")]
                = False) -> None:
    """A new key for TENANT (printed once); its old keys keep working for --grace hours."""
    import secrets

    new = f"pb-{secrets.token_urlsafe(24)}"
    old = _accounts().rotate(tenant, new, grace * 3600, admin=admin)
    console.print(f"{old} old key(s) of {tenant!r} stop working in {grace:g} h")
    print(new)


@app.command()
def purge(
    older_than: Annotated[float, typer.Option(
        "--older-than", min=0, help="Delete final jobs (their results and idempotency keys), "
        "Batch API records and files older than this many days.")],
) -> None:
    """Delete what the job store holds past a retention period, in bounded pages (the
    active scheduler does the same with PROMPTBATCH_RETENTION_DAYS, 30 by default)."""
    from jobs.retention import purge_older_than
    from jobs.store import JobStore

    store = JobStore(_settings().database_url)
    try:
        store.check_schema()
        done = purge_older_than(store, older_than)
    except PromptBatchError as exc:
        raise _refuse(exc) from None
    finally:
        store.close()
    print(f"deleted {done.jobs} jobs, {done.batches} batch records and {done.files} files "
          f"older than {older_than:g} days")


cache_app = typer.Typer(help="The result cache.", rich_markup_mode="markdown")
app.add_typer(cache_app, name="cache")


@cache_app.command("purge")
def cache_purge(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's entries ('_shared' "
                                               "for the shared partition).")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model's: 'provider|model', or "
                                              "a model name.")] = None,
    key: Annotated[str | None, typer.Option(help="Only this entry (its key or hash).")] = None,
    everything: Annotated[bool, typer.Option("--all", help="Every entry.")] = False,
) -> None:
    """Delete cached results (by tenant, model or key); prints how many went."""
    from jobs.cache import purge
    from jobs.queue import RedisQueue, connect

    if not (tenant or model or key or everything):
        raise _refuse(PromptBatchError("say what to purge: --tenant, --model, --key, or --all"))
    settings = _settings()
    r = connect(_need_redis(settings), fail_fast=True)
    try:
        print(f"purged {purge(RedisQueue(r), tenant=tenant, model=model, key=key)} entries")
    finally:
        r.close()


@app.command()
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
    settings = _settings()
    _need_redis(settings)
    if job_id is None:
        _overview(settings, watch=watch, every=every, as_json=as_json)
        return
    from producers.client import Client

    try:
        with Client(settings) as client:
            client.check()
            stored = client.store.find(job_id, tenant)  # its id, or its line's own id
            if stored is None:
                raise _refuse(PromptBatchError(f"no job with id or client_id {job_id!r} in "
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
            raise _refuse(PromptBatchError(
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
        raise _refuse(PromptBatchError(f"cannot reach Redis at PROMPTBATCH_REDIS_URL: {exc}")) \
            from None
    finally:
        r.close()


def main() -> None:
    """Entry point of the ``promptbatch`` command."""
    app()


__all__ = ["PRIORITY_NAMES", "app", "main"]

if __name__ == "__main__":  # pragma: no cover
    main()
