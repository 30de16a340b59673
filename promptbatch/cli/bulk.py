"""Bulk work: the commands that take a JSONL file of prompts through promptbatch. ``run``
starts a local stack of its own (embedded server, SQLite, scheduler, workers) for the file
and reports; ``submit`` sends the file to a running service (its Redis, or its HTTP API)
and prints the job ids or waits for the results. Both read a file of any size in bounded
memory and resume where an interrupted run stopped."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from config.logging import setup_logging
from config.settings import Settings
from jobs.errors import PromptBatchError
from promptbatch.cli.common import (
    Provider,
    console,
    need_redis,
    refuse,
    report_invalid,
    settings_or_exit,
)
from promptbatch.summary import Summary, summary_table


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
    from promptbatch.runs import RunFolders
    from promptbatch.stack import StackError

    setup_logging("WARNING")
    if not file.is_file():
        console.print(f"[red]{file} is not a file[/red]")
        raise typer.Exit(2)
    base = settings_or_exit()
    digest = _work_digest(file, provider=provider)
    runs = RunFolders(base.data_dir / "run")
    run_dir = runs.folder(digest)
    checked = not (run_dir / "scanned").exists()
    total = None
    if checked:  # before anything is written: a refused file leaves nothing behind
        total = _scan_or_refuse(file, skip_invalid, provider or base.default_provider,
                                base.max_image_bytes)
    try:
        runs.take(file)  # one run at a time on a data folder: a second one refuses
    except StackError as exc:
        raise refuse(exc) from None
    try:
        if not (run_dir / "scanned").exists():  # a new run: earlier runs are forgotten
            if not checked:
                total = _scan_or_refuse(file, skip_invalid,
                                        provider or base.default_provider,
                                        base.max_image_bytes)
            runs.clear()
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            total = _scanned(run_dir)
        job, summary = _run_on_stack(file, run_dir, base, digest, provider=provider,
                                     workers=workers, skip_invalid=skip_invalid,
                                     timeout=timeout, window=window, total=total)
        written = job.spool.write(out, job.last_line) if out is not None else 0
        job.spool.close()
        if out is not None:
            console.print(f"wrote {written} lines to {out}")
        shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        runs.release()
    Console().print(summary_table(summary))


def _run_on_stack(file: Path, run_dir: Path, base: Settings, digest: str, *,
                  provider: str | None, workers: int, skip_invalid: bool, timeout: float,
                  window: int, total: int | None) -> tuple[Any, Summary]:
    """Start the run's stack, submit the file and collect every result (or exit with one
    line that says what happened); the stack is stopped in every case."""
    from redis import RedisError
    from sqlalchemy.exc import SQLAlchemyError

    from producers.client import Client
    from promptbatch.bulk import BulkRun, LocalBackend
    from promptbatch.embedded import EmbeddedServerError
    from promptbatch.stack import LocalStack, StackError

    env = {"PROMPTBATCH_DATABASE_URL": f"sqlite:///{(run_dir / 'promptbatch.db').resolve()}"}
    if "PROMPTBATCH_DATABASE_URL" in _explicit_env():
        env.pop("PROMPTBATCH_DATABASE_URL")
    if not base.redis_url:  # its own server: results leave Redis once read (the store
        # keeps them), so Redis holds the work in flight whatever the file's size
        env.update(PROMPTBATCH_RECONCILE_WRITE_BACK="0", PROMPTBATCH_RESULT_TTL_S="3600")
    if provider:
        env["PROMPTBATCH_DEFAULT_PROVIDER"] = provider
    stack = LocalStack(run_dir, workers=workers, env=env, redis_url=base.redis_url or None,
                       file=str(file.resolve()))
    _install_sigterm()
    try:
        with console.status("starting the local stack..."):
            _migrate_quietly(env.get("PROMPTBATCH_DATABASE_URL", base.database_url))
            stack.start()
        _mark_scanned(run_dir, total)
        settings = settings_or_exit(redis_url=stack.redis_url,
                                    database_url=env.get("PROMPTBATCH_DATABASE_URL"),
                                    default_provider=provider)
        with Client(settings) as client:
            job = BulkRun(LocalBackend(client, forget=not base.redis_url), file,
                          run_dir / "output", digest, window=window,
                          skip_invalid=skip_invalid, provider=provider,
                          prices=client.submitter.prices,
                          max_image_bytes=base.max_image_bytes)
            before = job.resume()
            if before:
                console.print(f"resuming: {before} lines were submitted before, "
                              f"{job.progress.finished} of them have finished")
            return job, _run_with_progress(job, timeout, total)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping the local stack (run the same command "
                      "again to resume)[/yellow]")
        raise typer.Exit(130) from None
    except (PromptBatchError, TimeoutError, StackError, EmbeddedServerError) as exc:
        console.print(f"[red]{exc}[/red]{_hint(exc)}", soft_wrap=True)
        raise typer.Exit(1) from None
    except (RedisError, SQLAlchemyError) as exc:  # a server of the stack is gone: a warm
        stack.cold()  # stop would wait on workers that cannot store what they finish
        console.print(f"[red]lost the local stack's {_server(exc)}: "
                      f"{type(exc).__name__}: {_first_line(exc)}[/red] (its logs are in "
                      f"{run_dir}; run the same command again to resume)", soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        stack.stop(grace_s=base.shutdown_grace_s)


def _hint(exc: Exception) -> str:
    """What to do after an error that ended a bulk run: run it again, unless the error
    says a job is refused as it is (running it again would be refused the same way)."""
    from jobs.errors import InvalidJob

    return "" if isinstance(exc, InvalidJob) else " (run the same command again to resume)"


def _server(exc: Exception) -> str:
    from redis import RedisError

    return "Redis server" if isinstance(exc, RedisError) else "job store"


def _first_line(exc: Exception) -> str:
    """An error's message without what a driver appends on further lines."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _scan_or_refuse(file: Path, skip_invalid: bool, provider: str | None = None,
                    max_image_bytes: int | None = None) -> int:
    """The first pass over a file: every line validated, one at a time (also for what
    ``provider``, the lines' provider unless they name one, cannot serve, and for inline
    images over ``max_image_bytes``, the setting, when known); invalid lines
    reported (and, without --skip-invalid, nothing submitted). Returns how many lines
    are valid (the jobs the run will submit)."""
    from promptbatch.bulk import scan

    with console.status(f"checking {file}..."):
        found = scan(file, provider, max_image_bytes)
    if found.invalid:
        report_invalid(found.errors)
        if found.invalid > len(found.errors):
            console.print(f"... and {found.invalid - len(found.errors)} more invalid lines")
        if not skip_invalid:
            console.print(f"[red]{found.invalid} invalid line(s): nothing was submitted.[/red] "
                          "Fix them, or pass --skip-invalid to submit the valid lines.")
            raise typer.Exit(2)
    return found.valid


def _mark_scanned(folder: Path, total: int | None) -> None:
    """Note in a run's folder that its file was checked, and how many jobs it makes."""
    (folder / "scanned").write_text("" if total is None else f"{total}\n")


def _scanned(folder: Path) -> int | None:
    """How many jobs a checked file makes, as ``_mark_scanned`` noted (None: not noted)."""
    text = (folder / "scanned").read_text().strip()
    return int(text) if text.isdigit() else None


def _run_with_progress(job: Any, timeout: float, total: int | None) -> Summary:
    """Run the bulk job with two bars, submitted and finished, out of the jobs the file
    makes (``total``, counted by the first pass; unknown: out of those submitted)."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        sent = bar.add_task("submitted", total=total)
        done = bar.add_task("finished", total=total)

        def show(progress: Any) -> None:
            bar.update(sent, completed=progress.submitted)
            bar.update(done, completed=progress.finished, total=total or progress.submitted)

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
    from promptbatch.bulk import BulkRun

    setup_logging("WARNING")
    if not file.is_file():
        console.print(f"[red]{file} is not a file[/red]")
        raise typer.Exit(2)
    waiting = wait or out is not None
    digest = _work_digest(file, provider=provider)
    folder = Path(f"{out or file}.promptbatch-state")
    # Lines are checked against this machine's image bound unless they go to an API,
    # which checks them against its own.
    images = None if url else settings_or_exit().max_image_bytes
    total = _prepare_state(folder, file, digest, skip_invalid, provider, images)
    backend, closing = _backend(url, api_key)
    from redis import RedisError
    from sqlalchemy.exc import SQLAlchemyError

    from promptbatch.remote import RemoteError

    try:
        job = BulkRun(backend, file, folder, digest,
                      window=window if waiting else 2**62, chunk=chunk,
                      skip_invalid=skip_invalid, provider=provider,
                      max_image_bytes=images, count_earlier=False)  # no summary shown
        job.resume()
        if not waiting:
            _submit_only(job)
        else:
            _run_with_progress(job, 24 * 3600.0, total)
            if out is not None:
                console.print(f"wrote {job.spool.write(out, job.last_line)} lines to {out}")
            else:
                job.spool.copy_to(sys.stdout.buffer, job.last_line)
    except RemoteError as exc:
        hint = " (run the same command again to resume)" if exc.retryable else ""
        console.print(f"[red]{exc}[/red]{hint}", soft_wrap=True)
        raise typer.Exit(1) from exc
    except PromptBatchError as exc:
        console.print(f"[red]{exc}[/red]{_hint(exc)}", soft_wrap=True)
        raise typer.Exit(1) from exc
    except (RedisError, SQLAlchemyError) as exc:  # the service's Redis or store is gone
        console.print(f"[red]lost the service's {_server(exc)}: {type(exc).__name__}: "
                      f"{_first_line(exc)}[/red] (check PROMPTBATCH_REDIS_URL and "
                      "PROMPTBATCH_DATABASE_URL, then run the same command again to resume)",
                      soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        closing()
    job.spool.close()
    shutil.rmtree(folder, ignore_errors=True)


def _prepare_state(folder: Path, file: Path, digest: str, skip_invalid: bool,
                   provider: str | None = None,
                   max_image_bytes: int | None = None) -> int | None:
    """The state folder of a submit: kept if it is of the same work (resumed), else made
    afresh after the file is checked (a state of other work, the same file with other
    options or another file at the same path, is dropped: its jobs stay in the service).
    Returns how many jobs the file makes, if known."""
    from promptbatch.bulk import file_digest

    if (folder / "scanned").exists():
        mark = folder / "digest"  # absent: a state kept before options counted
        kept = mark.read_text().strip() if mark.exists() else file_digest(file)
        if kept == digest:
            return _scanned(folder)
        console.print(f"{folder} holds an unfinished submit of other work (another file or "
                      "other options): starting this one afresh", soft_wrap=True)
    total = _scan_or_refuse(file, skip_invalid, provider, max_image_bytes)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "digest").write_text(digest + "\n")
    _mark_scanned(folder, total)
    return total


def _work_digest(file: Path, *, provider: str | None) -> str:
    """The digest of a bulk run's work: the file and every option that changes a job (an
    option of that kind belongs here: a run with other options is a new run)."""
    from promptbatch.bulk import work_digest

    return work_digest(file, {"provider": provider})


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

    settings = settings_or_exit()
    need_redis(settings)
    client = Client(settings)
    try:
        client.check()
    except PromptBatchError as exc:
        client.close()
        raise refuse(exc) from None
    return LocalBackend(client), client.close


def _submit_only(job: Any) -> None:
    """Submit every line not yet submitted; print every line's job id in order."""
    from promptbatch.spool import Ledger

    with console.status("submitting..."):
        while job.submit_next():
            pass
    for _, job_id, _, _ in Ledger(job.ledger.path.parent).read():
        print(job_id)

