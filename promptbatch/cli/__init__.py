"""The ``promptbatch`` command line: one module per group of commands.

- ``bulk``: a JSONL file through promptbatch (``run``, ``submit``);
- ``services``: the long-lived processes (``up``, ``scheduler``, ``worker``, ``api``,
  ``flower``);
- ``admin``: the operator's commands on the stores (``migrate``, ``keys``, ``purge``,
  ``cache``, ``health``) and on money (``spend``, ``tenants budget``, ``keys budget``);
- ``watching``: what the service is doing (``status``).

Commands are registered here, in the order ``promptbatch --help`` lists them; a new command
goes into the module of its group and gets its line below.
"""

from __future__ import annotations

import typer

from promptbatch.cli import admin, bulk, services, watching

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="promptbatch: a task queue for LLM prompts with similarity batching.")

app.command()(bulk.run)
app.command()(services.up)
app.command()(services.scheduler)
app.command()(admin.health)
app.command()(admin.migrate)
app.command()(services.worker)
app.command()(services.flower)
app.command()(bulk.submit)
app.command()(services.api)
app.command()(admin.purge)
app.command()(watching.status)
app.command()(admin.spend)
app.add_typer(admin.keys_app, name="keys")
app.add_typer(admin.tenants_app, name="tenants")
app.add_typer(admin.cache_app, name="cache")


def main() -> None:
    """Entry point of the ``promptbatch`` command."""
    app()


__all__ = ["app", "main"]
