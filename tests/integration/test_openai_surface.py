"""The OpenAI surface that tools probe, through the official ``openai`` SDK: models,
files (list, retrieve, content, delete), batches (list, cancel), and Batch lines naming a
model the way chat completions do (``provider|model`` or an alias)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import NotFoundError, OpenAI

from config.settings import Settings
from tests.conftest import Procs
from tests.helpers import poll
from tests.integration.test_api import KEY_A, KEY_B, Api

pytestmark = pytest.mark.integration


@pytest.fixture
def surface(settings: Settings) -> Iterator[Api]:
    server = Api(settings, tenant_providers={"*": ["echo"], "tenant-b": ["simulated|sim-1"]},
                 model_aliases={"fast": "echo|echo-1"}).start()
    yield server
    server.stop()


def sdk(api: Api, key: str = KEY_A) -> OpenAI:
    return OpenAI(base_url=f"{api.url}/v1", api_key=key, max_retries=0)


def test_models_lists_what_the_keys_tenant_may_use(surface: Api) -> None:
    a = sdk(surface)
    ids = [m.id for m in a.models.list()]
    assert ids == ["fast", "echo|echo-1"]
    assert a.models.retrieve("echo|echo-1").owned_by == "echo"
    assert a.models.retrieve("fast").id == "fast"
    with pytest.raises(NotFoundError):
        a.models.retrieve("simulated|sim-1")  # tenant-a may not use it
    b = sdk(surface, KEY_B)
    assert [m.id for m in b.models.list()] == ["simulated|sim-1"]


def write_batch(path: Path, model: str, n: int) -> Path:
    path.write_text("".join(json.dumps({
        "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"hi {i}"}]}})
        + "\n" for i in range(n)))
    return path


@pytest.mark.slow
def test_files_and_batches_through_the_sdk(surface: Api, procs: Procs, tmp_path: Path) -> None:
    a = sdk(surface)
    procs.scheduler()
    procs.worker(1)
    src = a.files.create(file=write_batch(tmp_path / "a.jsonl", "echo|echo-1", 3).open("rb"),
                         purpose="batch")
    aliased = a.files.create(file=write_batch(tmp_path / "b.jsonl", "fast", 2).open("rb"),
                             purpose="batch")
    assert [f.id for f in a.files.list()] == [aliased.id, src.id]  # newest first
    assert a.files.retrieve(src.id).filename == "a.jsonl"
    assert a.files.content(src.id).text.count("\n") == 3
    assert [f.id for f in sdk(surface, KEY_B).files.list()] == []  # another tenant's

    first = a.batches.create(input_file_id=src.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    second = a.batches.create(input_file_id=aliased.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    for batch, n in ((first, 3), (second, 2)):
        done = poll(lambda b=batch: (x := a.batches.retrieve(b.id)).status == "completed"
                    and x, timeout=60, interval=0.2, what="the batch to complete")
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (n, 0)
        assert done.output_file_id is not None
        out = [json.loads(x) for x in a.files.content(done.output_file_id).text.splitlines()]
        assert {o["response"]["body"]["model"] for o in out} == {"echo-1"}
    assert [b.id for b in a.batches.list()] == [second.id, first.id]

    deleted = a.files.delete(src.id)
    assert deleted.deleted and deleted.id == src.id
    with pytest.raises(NotFoundError):
        a.files.retrieve(src.id)
    with pytest.raises(NotFoundError):
        sdk(surface, KEY_B).files.delete(aliased.id)  # not theirs to delete


@pytest.mark.slow
def test_a_batch_cancelled_through_the_sdk_runs_none_of_its_waiting_jobs(
        surface: Api, tmp_path: Path) -> None:
    a = sdk(surface)  # no worker: nothing starts
    src = a.files.create(file=write_batch(tmp_path / "c.jsonl", "echo|echo-1", 4).open("rb"),
                         purpose="batch")
    batch = a.batches.create(input_file_id=src.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
    cancelled = a.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled")
    done = poll(lambda: (x := a.batches.retrieve(batch.id)).status == "cancelled" and x,
                timeout=30, interval=0.2, what="the batch to be cancelled")
    assert done.request_counts is not None and done.request_counts.completed == 0
