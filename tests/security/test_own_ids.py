"""Your own id across tenants: an id that several tenants use is never answered with one
of theirs silently (a real uvicorn server, real Redis and SQLite; the CLI as a process)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from config.settings import Settings
from tests.conftest import settings_env
from tests.integration.test_api import Api

pytestmark = pytest.mark.integration

ADMIN = "ops-key"


@pytest.fixture
def api(settings: Settings) -> Iterator[Api]:
    server = Api(settings, api_admin_keys={ADMIN: "ops"}).start()
    yield server
    server.stop()


def test_an_id_two_tenants_use_is_a_409_for_an_admin_until_it_names_the_tenant(
        api: Api, settings: Settings) -> None:
    a = api.a.post("/v1/jobs", json={"prompt": "a's ticket", "id": "support-14"})
    b = api.b.post("/v1/jobs", json={"prompt": "b's ticket", "client_id": "support-14"})
    assert a.status_code == b.status_code == 201, (a.text, b.text)
    # Each tenant finds its own by its own id ("id" and "client_id" are one name).
    assert api.a.get("/v1/jobs/support-14").json()["id"] == a.json()["id"]
    assert api.b.get("/v1/jobs/support-14").json()["id"] == b.json()["id"]
    assert api.a.get("/v1/jobs/support-14", params={"tenant": "tenant-b"}).status_code == 403
    admin = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {ADMIN}"},
                         timeout=30)
    both = admin.get("/v1/jobs/support-14")
    assert both.status_code == 409, both.text
    assert both.json()["error"]["tenants"] == ["tenant-a", "tenant-b"]
    assert admin.get("/v1/jobs/support-14/result").status_code == 409
    chosen = admin.get("/v1/jobs/support-14", params={"tenant": "tenant-b"})
    assert chosen.status_code == 200 and chosen.json()["id"] == b.json()["id"]
    assert admin.get(f"/v1/jobs/{a.json()['id']}").status_code == 200  # a job id is unique
    admin.close()
    both_ids = api.a.post("/v1/jobs", json={"prompt": "x", "id": "1", "client_id": "2"})
    assert both_ids.status_code == 422
    # The CLI, as an operator (no tenant scope) runs it.
    env = settings_env(settings)
    out = subprocess.run([sys.executable, "-m", "promptbatch", "status", "support-14"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0
    assert "tenant-a, tenant-b" in out.stderr and "--tenant" in out.stderr, out.stderr
    out = subprocess.run([sys.executable, "-m", "promptbatch", "status", "support-14",
                          "--tenant", "tenant-a"], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert json.loads(out.stdout)["id"] == a.json()["id"]
