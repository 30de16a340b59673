"""The tuned baseline: one Celery task per prompt, as a Celery user would set it up for
throughput, not as promptbatch's workers are set up.

Celery's defaults (JSON, tasks acknowledged early, a prefetch multiplier of 4, no task
events, no STARTED state) on the same Redis for broker and results:

    celery -A bench.baseline_tuned_app worker -Q tuned --without-mingle --without-gossip

``TUNED_TRANSPORT=promptbatch``: with promptbatch's broker transport (``config.transport``:
kombu's, publishing through one client), for both the producer and the worker.
"""

from __future__ import annotations

import os

from celery import Celery

_url = os.environ.get("PROMPTBATCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("tuned", broker=_url, backend=_url)
app.conf.update(
    task_default_queue="tuned",
    worker_prefetch_multiplier=4,
    worker_send_task_events=False,
    task_send_sent_event=False,
    task_track_started=False,
    broker_connection_retry_on_startup=True,
)
if os.environ.get("TUNED_TRANSPORT") == "promptbatch":  # kombu publishing via one client
    app.conf.broker_transport = "config.transport:Transport"


@app.task(name="tuned.echo_one")
def echo_one(prompt: str) -> dict[str, object]:
    """What the echo provider answers, for one prompt."""
    return {"text": f"echo: {prompt}", "prompt_tokens": len(prompt) // 4 + 1}
