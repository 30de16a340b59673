"""The README's "As a service" commands, run as written, in a fresh environment (a new
HOME, no PROMPTBATCH_ variables): `up`, then in another shell `source` the file it
names, the curl, `submit --url`, `status`, `status --json` and the OpenAI SDK snippet.
Any command that fails or prints a traceback fails the test. Run alone (the `load`
group): the commands use the README's fixed ports (8000, 5555, 9464, 9465)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.load]

ROOT = Path(__file__).resolve().parents[2]


def _section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    return readme.split("### As a service", 1)[1].split("\nFor a real deployment", 1)[0]


@pytest.mark.timeout(600)
def test_the_readmes_service_commands_run_as_written(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("the README's curl line needs curl (apt-get install curl)")
    section = _section()
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    up_line = blocks[0].strip()
    lines = [x.split("  #", 1)[0].strip() for x in blocks[1].splitlines() if x.strip()]
    source, commands = lines[0], lines[1:]
    assert source.startswith("source ")
    commands = [c for c in commands if "--watch" not in c]  # it never ends: --json instead
    commands.append(".venv/bin/promptbatch status --json")
    snippet = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PROMPTBATCH_") and k != "XDG_DATA_HOME"}
    env["HOME"] = str(tmp_path / "home")  # a new user: ~/.local/share/promptbatch is empty
    out = tmp_path / "up.out"
    with out.open("wb") as fh:
        up = subprocess.Popen(["bash", "-c", up_line], cwd=ROOT, env=env, stdout=fh,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        poll(lambda: "Other terminals" in out.read_text(errors="replace"), timeout=180,
             interval=0.2, what="up to print its endpoints", proc=up)
        for command in [*commands, "__snippet__"]:
            script = (f".venv/bin/python -c {_quote(snippet)}" if command == "__snippet__"
                      else command)
            done = subprocess.run(["bash", "-c", f"set -e\n{source}\n{script}"], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=300,
                                  check=False)
            shown = (done.stdout + done.stderr)[-3000:]
            assert done.returncode == 0, f"{command!r} failed:\n{shown}"
            assert "Traceback" not in shown, f"{command!r} printed a traceback:\n{shown}"
            if command.startswith("curl"):
                assert '"id"' in done.stdout, done.stdout  # accepted, not a 401
            if command == "__snippet__":
                assert "Hello" in done.stdout and "echo|echo-1" in done.stdout
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
    assert "Traceback" not in out.read_text(errors="replace")


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"
