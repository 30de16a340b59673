"""Administration: the commands an operator runs against the service's stores. ``migrate``
brings the job store's schema up to date; ``keys`` manages the HTTP API's keys; ``purge``
deletes what is past retention; ``cache`` empties the result cache; ``health`` is the
container's health check. Commands about accounts and money belong here too."""

from __future__ import annotations

import json
import os
import time
from typing import Annotated, Any

import typer
from rich.console import Console

from config import keys
from config.logging import setup_logging
from jobs.errors import PromptBatchError
from promptbatch.cli.common import console, need_redis, refuse, settings_or_exit


def migrate() -> None:
    """Bring the job store's schema up to date (run it once before the services start)."""
    from sqlalchemy.exc import OperationalError

    from jobs.migrate import current_revision
    from jobs.store import JobStore

    setup_logging("WARNING")
    store = JobStore(settings_or_exit().database_url)
    try:
        before = current_revision(store.engine)
        store.migrate()
        after = current_revision(store.engine)
        print(f"job store {store.where}: schema {before or 'empty'} -> {after}; "
              f"store id {store.store_id()}")
    except OperationalError as exc:  # the server is not there, or refuses us
        reason = str(exc.orig or exc).strip().splitlines()[0]
        raise refuse(RuntimeError(
            f"cannot reach the job store at {store.where} (PROMPTBATCH_DATABASE_URL): "
            f"{reason}. Check that its server is up and that the URL, user and password "
            "are right")) from None
    except Exception as exc:
        raise refuse(exc) from None
    finally:
        store.close()


keys_app = typer.Typer(help="API keys of the HTTP API.", rich_markup_mode="markdown")


def _accounts() -> Any:
    from jobs.store import JobStore
    from producers.accounts import Accounts

    store = JobStore(settings_or_exit().database_url)
    try:
        store.check_schema()
    except PromptBatchError as exc:
        raise refuse(exc) from None
    return Accounts(store)


ExpiresIn = Annotated[float | None, typer.Option(
    "--expires-in", min=0, help="Days until the key stops working (default: never).")]


Period = Annotated[str, typer.Option(
    "--period", help="day or month (UTC), or none: the budget never resets.")]


@keys_app.command("add")
def keys_add(tenant: Annotated[str, typer.Argument(help="The key's tenant.")],
             key: Annotated[str | None, typer.Option(help="The key (default: a new random "
                                                     "one, printed once).")] = None,
             admin: Annotated[bool, typer.Option(help="An admin key: it may submit for any "
                                                 "tenant and read every tenant's jobs.")]
             = False,
             expires_in: ExpiresIn = None,
             budget: Annotated[float | None, typer.Option(
                 min=0, help="Most US dollars the key's jobs may cost per --budget-period "
                 "(default: no budget of its own).")] = None,
             budget_period: Annotated[str, typer.Option(
                 help="day or month (UTC), or none (never resets).")] = "month") -> None:
    """Add an API key for TENANT to the SQL store (only its SHA-256 is stored)."""
    import secrets

    from jobs import budgets
    from producers.accounts import PREFIX_CHARS

    if budget_period not in budgets.PERIODS:
        raise refuse(PromptBatchError(f"--budget-period must be day, month or none, not "
                                      f"{budget_period!r}"))
    new = key or f"pb-{secrets.token_urlsafe(24)}"
    until = None if expires_in is None else time.time() + expires_in * 86400
    accounts = _accounts()
    accounts.add_key(new, tenant, admin=admin, expires_at=until)
    if budget is not None:
        b = budgets.set_budget(accounts.engine, "key", new[:PREFIX_CHARS], budget,
                               budget_period)
        console.print(f"key {b.name}: {_budget_words(b)}", soft_wrap=True)
    print(new)


@keys_app.command("budget")
def keys_budget(key: Annotated[str, typer.Argument(
                    metavar="KEY_OR_PREFIX", help="The key, or its prefix as `keys list` "
                    "shows it.")],
                usd: Annotated[float | None, typer.Argument(
                    min=0, help="Most US dollars per period (leave out with --remove).",
                    show_default=False)] = None,
                period: Period = "month",
                remove: Annotated[bool, typer.Option(help="Remove the key's budget.")]
                = False) -> None:
    """Set (or --remove) the budget of one API key."""
    accounts = _accounts()
    prefix = accounts.prefix_of(key)
    if prefix is None:
        raise refuse(PromptBatchError(f"no stored key is {key!r} or has it as its prefix "
                                      "(`promptbatch keys list` shows them)"))
    _set_budget(accounts.engine, "key", prefix, usd, period, remove)


def _when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(at))


@keys_app.command("list")
def keys_list(tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")]
              = None) -> None:
    """The stored keys: prefix, state, tenant, admin, created, last used, expiry (never
    the keys themselves). Keys set in PROMPTBATCH_API_KEYS are not listed."""
    from rich.table import Table

    now = time.time()
    rows = []
    for k in _accounts().list_keys(tenant):
        state = ("revoked" if k.revoked_at is not None
                 else "expired" if not k.active(now) else "active")
        rows.append((k.prefix, state, k.tenant, "yes" if k.admin else "no",
                     _when(k.created_at), _when(k.last_used_at), _when(k.expires_at)))
    # What a user types back (the prefix, to revoke) and reads first (the state) is never
    # cut: on a narrow terminal a date wraps into its day and its time, a tenant or a
    # header folds, and what still does not fit is at the end of the line.
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0))
    whole = ("prefix", "admin", "state")
    for n, name in enumerate(("prefix", "state", "tenant", "admin", "created (UTC)",
                              "last used", "expires")):
        longest = max((len(row[n]) for row in rows), default=0)
        widest_word = max(len(w) for w in name.split())
        least = (max(longest, len(name)) if name in whole else min(longest, 24)
                 if name == "tenant" else min(longest, len("YYYY-MM-DD")))
        table.add_column(name, no_wrap=name in whole, overflow="fold",
                         min_width=max(least, widest_word))
    for row in rows:
        table.add_row(*row)
    out = Console()
    if not out.is_terminal and "COLUMNS" not in os.environ:  # a pipe or a file: each row
        out = Console(width=100_000)  # on one line, however long
    out.print(table)


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


def purge(
    older_than: Annotated[float, typer.Option(
        "--older-than", min=0, help="Delete final jobs (their results and idempotency keys), "
        "Batch API records and files older than this many days, and the records of provider "
        "batches closed longer ago.")],
) -> None:
    """Delete what the job store holds past a retention period, in bounded pages (the
    active scheduler does the same with PROMPTBATCH_RETENTION_DAYS, 30 by default)."""
    from jobs.retention import purge_older_than
    from jobs.store import JobStore

    store = JobStore(settings_or_exit().database_url)
    try:
        store.check_schema()
        done = purge_older_than(store, older_than)
    except PromptBatchError as exc:
        raise refuse(exc) from None
    finally:
        store.close()
    print(f"deleted {done.jobs} jobs, {done.batches} batch records, {done.files} files and "
          f"{done.provider_batches} provider batch records older than {older_than:g} days")


cache_app = typer.Typer(help="The result cache.", rich_markup_mode="markdown")


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
        raise refuse(PromptBatchError("say what to purge: --tenant, --model, --key, or --all"))
    settings = settings_or_exit()
    r = connect(need_redis(settings), fail_fast=True)
    try:
        print(f"purged {purge(RedisQueue(r), tenant=tenant, model=model, key=key)} entries")
    finally:
        r.close()


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

    settings = settings_or_exit()
    r = connect(need_redis(settings), socket_timeout=3, connect_timeout=3, fail_fast=True)
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


def _budget_words(b: Any) -> str:
    from jobs.money import usd

    per = {"day": " a day (UTC)", "month": " a month (UTC)"}.get(b.period, ", never reset")
    return (f"budget {usd(b.limit_usd)}{per}; {usd(b.spent_usd)} spent and "
            f"{usd(b.reserved_usd)} reserved in this period")


def _set_budget(engine: Any, scope: str, name: str, amount: float | None, period: str,
                remove: bool) -> None:
    from jobs import budgets

    if remove:
        gone = budgets.remove_budget(engine, scope, name)
        print(f"{scope} {name}: " + ("budget removed" if gone else "had no budget"))
        return
    if amount is None:
        raise refuse(PromptBatchError("give the budget in US dollars (or --remove)"))
    try:
        b = budgets.set_budget(engine, scope, name, amount, period)
    except ValueError as exc:
        raise refuse(exc) from None
    print(f"{scope} {b.name}: {_budget_words(b)}")


tenants_app = typer.Typer(help="Tenants: their budgets.", rich_markup_mode="markdown")


@tenants_app.command("budget")
def tenants_budget(tenant: Annotated[str, typer.Argument(help="The tenant.")],
                   usd: Annotated[float | None, typer.Argument(
                       min=0, help="Most US dollars its jobs may cost per period (leave "
                       "out with --remove).", show_default=False)] = None,
                   period: Period = "month",
                   remove: Annotated[bool, typer.Option(help="Remove its budget.")] = False,
                   ) -> None:
    """Set (or --remove) a tenant's budget: a submit whose estimated cost would pass it
    is refused (HTTP 402); jobs already accepted always run."""
    _set_budget(_accounts().engine, "tenant", tenant, usd, period, remove)


def spend(tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
          since: Annotated[str | None, typer.Option(
              help="From this day (UTC, YYYY-MM-DD; default: every day).")] = None,
          by: Annotated[str, typer.Option(help="Group by day, deployment, key or tenant.")]
          = "day",
          as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
          ) -> None:
    """What was spent and saved, per day, deployment, key or tenant (from the SQL store's
    daily rows), and the budgets."""
    import re

    from rich.table import Table

    from jobs import budgets, ledger
    from jobs.money import usd

    if since is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", since):
        raise refuse(PromptBatchError(f"--since must be a day as YYYY-MM-DD, not {since!r}"))
    engine = _accounts().engine
    try:
        rows = ledger.totals(engine, by=by, tenant=tenant, since=since)
    except ValueError as exc:
        raise refuse(exc) from None
    found = [b for b in budgets.get_budgets(engine)
             if tenant is None or b.scope == "key" or b.name == tenant]
    if as_json:
        from producers.money_routes import budget_view, total_view

        print(json.dumps({"data": [total_view(t) for t in rows],
                          "budgets": [budget_view(b) for b in found]}, indent=1))
        return
    table = Table(box=None, pad_edge=False, padding=(0, 2, 0, 0))
    for name in (by, "jobs", "cost", "saved", "saved by"):
        table.add_column(name, justify="left" if name in (by, "saved by") else "right")
    for t in rows:
        reasons = ", ".join(f"{k} {usd(v)}" for k, v in sorted(t.saved_usd.items()) if v)
        unpriced = f" ({t.unpriced} unpriced)" if t.unpriced else ""
        table.add_row(t.group, f"{t.jobs}{unpriced}", usd(t.cost_usd), usd(t.saved_total),
                      reasons or "-")
    table.add_row("total", str(sum(t.jobs for t in rows)),
                  usd(sum(t.cost_usd for t in rows)), usd(sum(t.saved_total for t in rows)),
                  "", style="bold")
    out = Console()
    out.print(table)
    for b in found:
        out.print(f"{b.scope} {b.name}: {_budget_words(b)}", soft_wrap=True)
