"""Logging set-up shared by every promptbatch process."""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once, at ``level`` or ``PROMPTBATCH_LOG_LEVEL`` (INFO)."""
    chosen = (level or os.environ.get("PROMPTBATCH_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=chosen, format=_FORMAT)
    else:
        root.setLevel(chosen)
    for noisy in ("httpx", "httpcore", "alembic.runtime.migration", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
