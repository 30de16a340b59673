"""The baseline: one Celery task per prompt, configured exactly like promptbatch's workers.

``celery -A bench.baseline_app worker -Q baseline`` (settings from PROMPTBATCH_*).
"""

from __future__ import annotations

from config.celery import build_celery
from config.settings import Settings

app = build_celery(Settings(), "baseline")
app.conf.task_queues = None
app.conf.task_default_queue = "baseline"
app.conf.task_default_exchange = "baseline"
app.conf.task_default_routing_key = "baseline"


@app.task(name="baseline.echo_one", acks_late=True)
def echo_one(prompt: str) -> dict[str, object]:
    """What the echo provider answers, for one prompt."""
    return {"text": f"echo: {prompt}", "prompt_tokens": len(prompt) // 4 + 1}
