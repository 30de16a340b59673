"""The README's quick start: its two commands exist and the demo they run works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_start_is_make_demo_and_make_test() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert re.findall(r"^make \w+", quick, flags=re.M) == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in ci


@pytest.mark.slow
@pytest.mark.integration
def test_the_demo_command_writes_one_result_per_example_prompt(tmp_path: Path) -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    demo = re.search(r"^demo:.*\n\t\$\(BIN\)/(promptbatch .*)$", makefile, flags=re.M)
    assert demo, "the demo target does not run promptbatch"
    args = demo.group(1).split()[1:]
    args[args.index("--out") + 1] = str(tmp_path / "demo.jsonl")
    args = [str(ROOT / a) if a.startswith("examples/") else a for a in args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env["PROMPTBATCH_SIMULATED_TIME_SCALE"] = "0.05"  # the same run, modelled time shortened
    env["PROMPTBATCH_DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run([sys.executable, "-m", "promptbatch", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    inputs = (ROOT / "examples" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()
    rows = [json.loads(x) for x in (tmp_path / "demo.jsonl").read_text().splitlines()]
    assert len(rows) == len(inputs) >= 200
    assert {r["state"] for r in rows} <= {"SUCCEEDED", "EXPIRED"}
    assert sum(r["state"] == "SUCCEEDED" for r in rows) >= 0.95 * len(rows)
    assert "mean batch size" in done.stdout


def _readme_commands() -> list[str]:
    """Every ``promptbatch`` and ``celery`` command of the README: the lines of its shell
    code blocks, and its inline code spans."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if re.match(r"^(\.venv/bin/)?(promptbatch|celery) ", line):
                found.append(line)
    found += re.findall(r"`((?:\.venv/bin/)?promptbatch [^`]+)`", readme)
    return found


def _parse(words: list[str]) -> None:
    """Parse ``promptbatch`` arguments as the command line would, without running them
    (raises the command line's usage error)."""
    import typer.main

    from promptbatch.cli import app

    command: Any = typer.main.get_command(app)
    ctx = command.make_context("promptbatch", list(words))
    while hasattr(command, "resolve_command"):  # a group: on to its subcommand
        rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
        name, command, rest = command.resolve_command(ctx, rest)
        ctx = command.make_context(name, rest, parent=ctx)


def test_every_command_in_the_readme_parses() -> None:
    import shlex

    commands = _readme_commands()
    assert len(commands) >= 8, commands
    for line in commands:
        words = shlex.split(line)
        program = words[0].rsplit("/", 1)[-1]
        if program == "promptbatch":
            _parse(words[1:])
            continue
        env = {**os.environ, "PROMPTBATCH_REDIS_URL": "redis://127.0.0.1:1/0"}
        done = subprocess.run([sys.executable, "-m", program, *words[1:], "--help"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 0, f"{line}: {done.stderr[-2000:]}"
