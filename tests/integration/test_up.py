"""`promptbatch up`: the whole service from one command, as a newcomer uses it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import psutil
import pytest

from promptbatch.embedded import free_port
from tests.helpers import poll

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def start_up(tmp_path: Path, api_port: int, flower_port: int, name: str, *args: str,
             **extra: str) -> tuple[subprocess.Popen[bytes], Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env["PROMPTBATCH_DATA_DIR"] = str(tmp_path / "data")
    env["PROMPTBATCH_UP_SCHEDULER_METRICS_PORT"] = str(free_port())
    env["PROMPTBATCH_UP_WORKER_METRICS_PORT"] = str(free_port())
    env.update(extra)
    out = tmp_path / f"{name}.out"
    with out.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "promptbatch", "up", "--workers", "1",
                                 "--port", str(api_port), "--flower-port", str(flower_port),
                                 *args],
                                cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT)
    poll(lambda: "Other terminals" in out.read_text(errors="replace"), timeout=120,
         what="promptbatch up to print its endpoints", proc=proc)
    return proc, out


def stop(proc: subprocess.Popen[bytes]) -> None:
    family = psutil.Process(proc.pid).children(recursive=True)
    assert len(family) >= 5, "fewer processes than server, scheduler, worker, API, Flower"
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)  # a second signal (Ctrl-C twice): at once, nothing left
    assert proc.wait(60) == 0
    _, alive = psutil.wait_procs(family, timeout=30)
    assert alive == [], f"still running after Ctrl-C: {[p.cmdline()[:4] for p in alive]}"


@pytest.mark.timeout(300)
def test_up_serves_a_job_sent_with_curl_shows_it_in_flower_and_keeps_it(tmp_path: Path) -> None:
    api_port, flower_port = free_port(), free_port()
    proc, out = start_up(tmp_path, api_port, flower_port, "first")
    try:
        text = out.read_text()
        key = re.search(r"API key\s+(pb-\S+)", text)
        flower = re.search(r"user (\S+), password (\S+)", text)
        assert key and flower, text
        api = f"http://127.0.0.1:{api_port}"
        assert httpx.get(f"{api}/readyz", timeout=5).status_code == 200
        health = subprocess.run([sys.executable, "-m", "promptbatch", "health", "--role", "api",
                                 "--port", str(api_port)], timeout=60, check=False)
        assert health.returncode == 0  # the image's HEALTHCHECK
        body = json.dumps({"prompt": "Hello from curl"})
        if shutil.which("curl"):
            sent = subprocess.run(["curl", "-s", f"{api}/v1/jobs", "-H",
                                   f"Authorization: Bearer {key.group(1)}", "-H",
                                   "Content-Type: application/json", "-d", body],
                                  capture_output=True, text=True, check=True).stdout
        else:
            sent = httpx.post(f"{api}/v1/jobs", content=body, headers={
                "Authorization": f"Bearer {key.group(1)}",
                "Content-Type": "application/json"}).text
        job_id = json.loads(sent)["id"]
        auth = {"Authorization": f"Bearer {key.group(1)}"}
        res = httpx.get(f"{api}/v1/jobs/{job_id}/result", params={"wait": 30}, headers=auth,
                        timeout=40).json()
        assert res["state"] == "SUCCEEDED" and res["text"] == "echo: Hello from curl"
        flower_url = f"http://127.0.0.1:{flower_port}"
        assert httpx.get(flower_url, timeout=10).status_code == 401  # basic auth on
        creds = (flower.group(1), flower.group(2))
        poll(lambda: job_id in httpx.get(f"{flower_url}/api/tasks", auth=creds,
                                         timeout=10).text,
             timeout=60, interval=0.5, what="Flower to list the job's batch")
        env_file = (tmp_path / "data" / "up" / "up.env").read_text()
        assert "PROMPTBATCH_REDIS_URL=" in env_file
        # The README's commands use the key and the URL from up.env.
        exported = dict(re.findall(r"export (\w+)='([^']*)'", env_file))
        assert exported["PROMPTBATCH_API_KEY"] == key.group(1)
        assert exported["PROMPTBATCH_URL"] == api
    finally:
        if proc.poll() is None:
            stop(proc)
    proc, out = start_up(tmp_path, api_port, flower_port, "second")  # the same data
    try:
        assert "created on the first start" in out.read_text()
        res = httpx.get(f"http://127.0.0.1:{api_port}/v1/jobs/{job_id}", headers=auth,
                        timeout=10).json()
        assert res["state"] == "SUCCEEDED", res
    finally:
        stop(proc)


@pytest.mark.timeout(300)
def test_up_prints_no_password_and_keeps_them_in_a_file_only_its_user_reads(
        tmp_path: Path, pg_url: str) -> None:
    from sqlalchemy.engine import make_url

    secret = f"pw-{os.urandom(8).hex()}"  # the server trusts loopback: any password works
    database = make_url(pg_url).set(password=secret).render_as_string(hide_password=False)
    proc, out = start_up(tmp_path, free_port(), free_port(), "up", "--no-flower",
                         PROMPTBATCH_DATABASE_URL=database)
    try:
        printed = out.read_text()
        home = tmp_path / "data" / "up"
        redis_password = json.loads((home / "up.json").read_text())["redis_password"]
        assert secret not in printed and redis_password not in printed, printed
        assert f"PROMPTBATCH_DATABASE_URL={make_url(database).render_as_string()}" in printed
        assert "mode 600" in printed
        exported = dict(re.findall(r"export (\w+)='([^']*)'", (home / "up.env").read_text()))
        assert exported["PROMPTBATCH_DATABASE_URL"] == database  # for `source`, whole
        assert redis_password in exported["PROMPTBATCH_REDIS_URL"]
        for private in ("up.env", "up.json"):
            assert (home / private).stat().st_mode & 0o777 == 0o600, private
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
