"""Services: the commands that run promptbatch's long-lived processes. ``up`` starts the
whole service on one machine (embedded Valkey, the job store, a scheduler, a worker, the
HTTP API and Flower); ``scheduler``, ``worker``, ``api`` and ``flower`` run one part each,
for a deployment that spreads them over machines or containers."""

from __future__ import annotations

import atexit
import json
import shutil
import signal
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console

from config import keys
from config.logging import setup_logging
from config.redisaddr import safe_url
from config.settings import Settings
from jobs.errors import PromptBatchError
from promptbatch.cli.common import console, need_redis, refuse, settings_or_exit


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
    settings = settings_or_exit()
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
    out.print(f"  Redis        PROMPTBATCH_REDIS_URL={safe_url(e.redis_url)}", highlight=False)
    out.print(f"  Job store    PROMPTBATCH_DATABASE_URL={_hidden(e.database_url)}",
              highlight=False)
    out.print(f"  Other terminals: source {e.env_file}   (then promptbatch submit / worker / "
              "status join this service; it holds the URLs with their passwords and the API "
              "key, readable by you alone: mode 600)", highlight=False)
    out.print(f'  Try: curl -s {e.api_url}/v1/jobs -H "Authorization: Bearer '
              '$PROMPTBATCH_API_KEY" '
              """-H 'Content-Type: application/json' -d '{"prompt": "Hello"}'""",
              highlight=False)


def _hidden(database_url: str) -> str:
    """A database URL without its password (``***``), for the terminal."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(database_url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a database URL)"


MetricsPort = Annotated[int | None, typer.Option(
    "--metrics-port", min=0, max=65535, help="Serve Prometheus /metrics on this port (0: "
    "none; default PROMPTBATCH_METRICS_PORT).")]


def _serve_metrics(settings: Settings, port: int, registry: Any, what: str) -> None:
    from jobs.telemetry import serve

    try:
        serve(port, settings.metrics_host, registry, what)
    except OSError as exc:
        raise refuse(exc) from None
    console.print(f"{what} metrics on http://{settings.metrics_host}:{port}/metrics",
                  highlight=False)


def scheduler(metrics_port: MetricsPort = None) -> None:
    """Run the scheduler against PROMPTBATCH_REDIS_URL (one is active; others stand by)."""
    settings = settings_or_exit()
    need_redis(settings)
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
        raise refuse(exc) from None


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
        raise refuse(exc) from None
    finally:
        r.close()
        store.close()


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

    settings = settings_or_exit()
    need_redis(settings)
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


def flower(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to listen on (beyond loopback only "
                                         "with a login).")] = "127.0.0.1",
    basic_auth: Annotated[str | None, typer.Option(
        help="Login 'user:password' (default PROMPTBATCH_FLOWER_BASIC_AUTH).")] = None,
) -> None:
    """Run Flower for the workers: batches by class, size and deployment; their results;
    history kept across restarts."""
    settings = settings_or_exit()
    need_redis(settings)
    login = basic_auth or (settings.flower_basic_auth.get_secret_value()
                           if settings.flower_basic_auth else None)
    try:
        argv = flower_argv(settings, port, address, login)
    except ValueError as exc:
        raise refuse(exc) from None
    from workers.factory import create_app

    setup_logging()
    create_app(settings).start(argv=argv)


def api(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="uvicorn worker processes.")] = 1,
) -> None:
    """Serve the HTTP API (and the OpenAI Batch API) with uvicorn; /metrics on its port."""
    import uvicorn

    from jobs import telemetry

    setup_logging()
    settings = settings_or_exit()
    need_redis(settings)
    _ready(settings)
    if workers > 1 and settings.api_metrics:  # /metrics of any process sums them all
        folder = telemetry.use_multiprocess_dir()
        atexit.register(shutil.rmtree, folder, True)
    console.print(f"promptbatch API listening on http://{host}:{port} (docs at "
                  f"http://{host}:{port}/docs), {workers} worker process(es)", soft_wrap=True)
    uvicorn.run("producers.asgi:app", host=host, port=port, workers=workers,
                log_level="info", access_log=True, proxy_headers=False)

