"""What every group of commands shares: the error console, settings read once per command,
and the one-line refusals (exit 2) that tell a user what to set or fix."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from config.problems import settings_problem
from config.settings import Settings
from jobs.errors import InvalidJob

#: Messages, progress and errors go to stderr; a command's output (ids, results, tables)
#: goes to stdout.
console = Console(stderr=True)

Provider = Annotated[str | None, typer.Option(help="Provider of jobs that name none: echo, "
                                              "simulated, openai or anthropic (default: "
                                              "PROMPTBATCH_DEFAULT_PROVIDER).")]

#: What to do when no Redis URL is set (one line, for every command that needs it).
NO_REDIS = ("PROMPTBATCH_REDIS_URL is not set: point it at the service's Redis (`promptbatch "
            "up` prints it and writes it to {env}; `source` that file in another terminal)")


def need_redis(settings: Settings) -> str:
    """The Redis URL, or exit 2 with one line that says what to set."""
    if not settings.redis_url:
        console.print(f"[red]{NO_REDIS.format(env=settings.data_dir / 'up' / 'up.env')}[/red]",
                      soft_wrap=True)
        raise typer.Exit(2)
    return settings.redis_url


def refuse(exc: Exception) -> typer.Exit:
    """Print an error as one line; the caller raises the returned exit (code 2)."""
    console.print(f"[red]{exc}[/red]", soft_wrap=True)
    return typer.Exit(2)


def settings_or_exit(**overrides: Any) -> Settings:
    """The settings (environment, ``.env``, then ``overrides`` that are not None), or exit 2
    with what is wrong in them."""
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        problem = settings_problem(exc, Settings, Settings.model_config.get("env_prefix", ""))
        console.print(f"[red]invalid settings:[/red] {escape(problem)}", soft_wrap=True)
        raise typer.Exit(2) from exc


def report_invalid(errors: list[InvalidJob], limit: int = 20) -> None:
    """Print invalid input lines, each with its number and the fields at fault."""
    for err in errors[:limit]:
        console.print(f"[red]line {err.line}[/red]: " + "; ".join(
            f"[bold]{field}[/bold]: {msg}" for field, msg in err.errors))
    if len(errors) > limit:
        console.print(f"... and {len(errors) - limit} more invalid lines")
