"""Keys an operator can manage: list, revoke (by prefix), rotate with a grace period,
expiry; from the CLI and through the API's admin routes. A revoked key is refused by
every API process within a second."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import httpx
import pytest

from config.settings import Settings
from jobs.store import JobStore
from producers.accounts import Accounts, KeyError_
from promptbatch.embedded import free_port
from tests.conftest import BOTH_STORES, Procs, settings_env
from tests.helpers import poll

pytestmark = pytest.mark.integration


def cli(settings: Settings, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "promptbatch", "keys", *argv],
                          env=settings_env(settings), capture_output=True, text=True,
                          timeout=60, check=False)


def status(api: str, key: str) -> int:
    return httpx.get(f"{api}/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                     timeout=10).status_code


@pytest.mark.slow
def test_a_revoked_key_is_refused_by_every_api_process_within_a_second(
        settings: Settings, procs: Procs) -> None:
    key = cli(settings, "add", "acme").stdout.strip()
    port = free_port()
    api = procs.spawn("api", "--port", str(port), "--workers", "2")
    base = f"http://127.0.0.1:{port}"
    poll(lambda: _ready(base), timeout=60, interval=0.1, what="the API", proc=api)
    assert all(status(base, key) == 200 for _ in range(10))
    listed = cli(settings, "list").stdout
    assert key[:11] in listed and "acme" in listed and key not in listed
    revoked = cli(settings, "revoke", key[:11])
    assert revoked.returncode == 0, revoked.stderr
    # Keys are read from SQL on every request: the very next requests, over both
    # processes, are all refused (well within the second the issue allows), none accepted.
    assert [status(base, key) for _ in range(10)] == [401] * 10
    assert "revoked" in cli(settings, "list").stdout
    again = cli(settings, "revoke", key[:11])  # nothing left to revoke under that prefix
    assert again.returncode == 1 and "no key" in again.stderr


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_rotation_keeps_the_old_key_for_its_grace_and_expiry_ends_a_key(
        settings: Settings) -> None:
    store = JobStore(settings.database_url)
    accounts = Accounts(store)
    accounts.add_key("pb-old-key-000000", "acme")
    now = time.time()
    assert accounts.rotate("acme", "pb-new-key-000000", grace_s=3600, now=now) == 1
    assert accounts.tenant_of("pb-old-key-000000", now=now + 3599) == ("acme", False)
    assert accounts.tenant_of("pb-old-key-000000", now=now + 3601) is None
    assert accounts.tenant_of("pb-new-key-000000", now=now + 10**6) == ("acme", False)
    accounts.add_key("pb-short-lived-00", "acme", expires_at=now + 5)
    assert accounts.tenant_of("pb-short-lived-00", now=now + 4) is not None
    assert accounts.tenant_of("pb-short-lived-00", now=now + 6) is None
    used = {k.prefix: k.last_used_at for k in accounts.list_keys("acme")}
    assert used["pb-new-key-"] is not None  # its use was recorded
    store.close()


def test_admin_keys_manage_keys_through_the_api(settings: Settings) -> None:
    from tests.integration.test_api import Api

    api = Api(settings, api_admin_keys={"admin-key": "ops"}).start()
    try:
        admin = httpx.Client(base_url=api.url, headers={"Authorization": "Bearer admin-key"})
        assert api.a.get("/v1/admin/keys").status_code == 403  # a tenant key may not
        made = admin.post("/v1/admin/keys", json={"tenant": "acme", "expires_in_days": 1})
        assert made.status_code == 201, made.text
        key = made.json()["key"]
        assert status(api.url, key) == 200
        listed = admin.get("/v1/admin/keys", params={"tenant": "acme"}).json()["data"]
        assert [k["prefix"] for k in listed] == [key[:11]] and listed[0]["active"]
        rotated = admin.post("/v1/admin/keys/rotate",
                             json={"tenant": "acme", "grace_hours": 0}).json()
        assert rotated["old_keys"] == 1
        assert status(api.url, key) == 401 and status(api.url, rotated["key"]) == 200
        gone = admin.delete(f"/v1/admin/keys/{rotated['key'][:11]}")
        assert gone.status_code == 200 and gone.json()["revoked_at"] is not None
        assert status(api.url, rotated["key"]) == 401
        assert admin.delete("/v1/admin/keys/pb-nothing").status_code == 404
        assert api.a.get("/v1/jobs").status_code == 200  # other tenants' keys unharmed
        admin.close()
    finally:
        api.stop()


#: A key whose prefix holds an underscore (token_urlsafe's alphabet has '-' and '_').
WILD = "pb-Xy7_kQ2mAbCdEfGhIjKlMnOpQrStUv"


@BOTH_STORES
def test_a_prefix_revokes_only_the_keys_it_begins_exactly(settings: Settings) -> None:
    store = JobStore(settings.database_url)
    accounts = Accounts(store)
    try:
        accounts.add_key(WILD, "acme")
        # '_' and '%' are characters, not wildcards; case counts (SQLite's LIKE ignores it).
        for other in ("pb-____", "pb-%", "pb-Xy7%", "pb-xy7_", "PB-XY7_KQ2M", "pb-Xy7_kQ2mA",
                      "pb-Xy7_kQ2mAbCdEfGhIjKlMnOpQrStUX"):
            with pytest.raises(KeyError_, match="no key"):
                accounts.revoke(other)
        assert accounts.tenant_of(WILD) == ("acme", False)  # none of them revoked it
        assert accounts.revoke("pb-Xy7_").tenant == "acme"
        assert accounts.tenant_of(WILD) is None
    finally:
        store.close()


def test_the_cli_revokes_a_key_by_its_prefix_or_by_the_whole_key(settings: Settings) -> None:
    store = JobStore(settings.database_url)
    first, second = WILD, "pb-a-whole-key-given-to-the-cli"
    for key in (first, second):
        Accounts(store).add_key(key, "acme")
    by_prefix = cli(settings, "revoke", first[:11])
    assert by_prefix.returncode == 0, by_prefix.stderr
    by_key = cli(settings, "revoke", second)
    assert by_key.returncode == 0, by_key.stderr
    assert f"revoked {second[:11]}" in by_key.stdout
    assert [k.revoked_at is not None for k in Accounts(store).list_keys("acme")] == [True, True]
    store.close()


def test_the_api_refuses_a_whole_key_in_the_revoking_url_and_revokes_nothing(
        settings: Settings) -> None:
    from tests.integration.test_api import Api

    api = Api(settings, api_admin_keys={"admin-key": "ops"}).start()
    try:
        admin = httpx.Client(base_url=api.url, headers={"Authorization": "Bearer admin-key"})
        key = admin.post("/v1/admin/keys", json={"tenant": "acme"}).json()["key"]
        whole = admin.delete(f"/v1/admin/keys/{key}")
        assert whole.status_code == 422, whole.text
        message = whole.json()["error"]["message"]
        assert "never a whole key" in message and f"/v1/admin/keys/{key[:11]}" in message
        assert key not in message
        assert status(api.url, key) == 200  # nothing was revoked
        assert admin.delete(f"/v1/admin/keys/{key[:11]}").status_code == 200
        assert status(api.url, key) == 401
        admin.close()
    finally:
        api.stop()


def test_a_refused_key_is_told_what_is_wrong(settings: Settings) -> None:
    from tests.integration.test_api import KEY_A, Api

    store = JobStore(settings.database_url)
    accounts = Accounts(store)
    now = time.time()
    accounts.add_key("pb-revoked-000000", "acme")
    revoked_at = accounts.revoke("pb-revoked-000000", now=now - 3600).revoked_at
    accounts.add_key("pb-expired-000000", "acme", expires_at=now - 60)
    store.close()
    api = Api(settings).start()

    def refusal(**headers: str) -> str:
        got = httpx.get(f"{api.url}/v1/jobs", headers=headers, timeout=10)
        assert got.status_code == 401, got.text
        return str(got.json()["error"]["message"])

    try:
        assert "missing API key" in refusal()
        no_scheme = refusal(Authorization=KEY_A)
        assert "no scheme" in no_scheme and "Bearer" in no_scheme and KEY_A not in no_scheme
        assert "scheme 'Basic' is not Bearer" in refusal(Authorization="Basic dXNlcjpwYXNz")
        assert "no key" in refusal(Authorization="Bearer")
        assert time.strftime("revoked on %Y-%m-%d %H:%M:%S UTC", time.gmtime(revoked_at)) in \
            refusal(Authorization="Bearer pb-revoked-000000")
        assert time.strftime("expired on %Y-%m-%d %H:%M:%S UTC", time.gmtime(now - 60)) in \
            refusal(**{"X-API-Key": "pb-expired-000000"})
        assert "unknown API key" in refusal(Authorization="Bearer pb-never-made-0000")
    finally:
        api.stop()


@pytest.mark.slow
def test_a_whole_key_sent_to_the_revoking_url_stays_out_of_the_access_log(
        settings: Settings, procs: Procs) -> None:
    key = "pb-Xy7_kQ2mAbCdEfGhIjKlMnOpQrStUv"
    store = JobStore(settings.database_url)
    Accounts(store).add_key(key, "acme")
    store.close()
    port = free_port()
    api = procs.spawn("api", "--port", str(port),
                      PROMPTBATCH_API_ADMIN_KEYS='{"admin-key": "ops"}')
    base = f"http://127.0.0.1:{port}"
    poll(lambda: _ready(base), timeout=60, interval=0.1, what="the API", proc=api)
    admin = {"Authorization": "Bearer admin-key"}
    assert httpx.delete(f"{base}/v1/admin/keys/{key}", headers=admin).status_code == 422
    assert httpx.delete(f"{base}/v1/admin/keys/{key[:11]}", headers=admin).status_code == 200

    def logged() -> str:
        return "".join(p.read_text(errors="replace") for p in procs.log_dir.glob("api-*.log"))

    poll(lambda: logged().count("/v1/admin/keys/pb-Xy7_kQ2m") >= 2, timeout=10,
         interval=0.1, what="the access log to show both requests")
    text = logged()
    assert f"DELETE /v1/admin/keys/{key[:11]}... HTTP/1.1\" 422" in text, text[-2000:]
    assert key[11:] not in text


@pytest.mark.parametrize("columns", ["80", None], ids=["terminal-80", "pipe"])
def test_keys_list_shows_every_prefix_state_and_tenant_whole(settings: Settings,
                                                              columns: str | None) -> None:
    """At 80 columns (a terminal) the table fits and cuts nothing a user reads or types
    back; through a pipe each key is one line, for grep."""
    tenant = "acme-research-team"
    first, second = "pb-Qw3rTy7uIoPaSdFgHjKlZxCvBnM1", "pb-Zx9cVbNm2LkJhGfDsA4qWeRtYuI0"
    store = JobStore(settings.database_url)
    accounts = Accounts(store)
    accounts.add_key(first, tenant, expires_at=time.time() + 30 * 86400)
    accounts.add_key(second, "default", admin=True)
    accounts.revoke(first[:11])
    store.close()
    env = settings_env(settings, **({"COLUMNS": columns} if columns else {}))
    if columns is None:
        env.pop("COLUMNS", None)
    done = subprocess.run([sys.executable, "-m", "promptbatch", "keys", "list"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "…" not in done.stdout, done.stdout
    if columns:
        assert max(len(line) for line in lines) <= 80, done.stdout
    row = {key: next(line for line in lines if key[:11] in line) for key in (first, second)}
    assert "revoked" in row[first] and tenant in row[first], done.stdout
    assert "active" in row[second] and "default" in row[second], done.stdout
    if columns is None:  # nothing wrapped: the created date and time on the key's line
        assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", row[first]), done.stdout


def test_the_cli_sets_a_keys_budget_by_the_whole_key_as_keys_add_printed_it(
        settings: Settings) -> None:
    from jobs import budgets

    added = cli(settings, "add", "acme")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    done = cli(settings, "budget", key, "50", "--period", "day")
    assert done.returncode == 0, done.stderr
    assert f"key {key[:11]}: budget $50.00 a day (UTC)" in done.stdout
    assert key not in done.stdout + done.stderr  # the key itself is never printed back
    store = JobStore(settings.database_url)
    assert [(b.scope, b.name, b.limit_usd, b.period) for b in budgets.get_budgets(
        store.engine)] == [("key", key[:11], 50.0, "day")]
    store.close()
    wrong = cli(settings, "budget", key + "x", "50")
    assert wrong.returncode == 2 and "keys list" in wrong.stderr
