"""What every component's Prometheus metrics share: buckets, the multiprocess set-up, and
serving ``/metrics``.

A process whose work happens in child processes (the Celery prefork pool, uvicorn with
several workers) uses prometheus-client's multiprocess mode: each child writes its values
to files in ``PROMETHEUS_MULTIPROC_DIR`` and the parent serves their sum. The variable
must be set before ``prometheus_client`` is first imported (the library picks its value
class at import), so ``use_multiprocess_dir`` runs before the components' metric modules
are imported, and nothing here imports the library at module level.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

#: Seconds: from 5 ms to an hour (bulk work waits long).
LATENCY_BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                                      10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Seconds of slack left before a deadline, when a job is sent.
SLACK_BUCKETS: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                                    300.0, 900.0, 3600.0, 14400.0, 86400.0)
#: Jobs per batch.
SIZE_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: Mean cosine similarity of a batch's members to its seed.
SIMILARITY_BUCKETS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9,
                                         0.95, 0.98, 1.0)
#: Seconds a planning step took.
PLAN_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                   0.25, 0.5, 1.0, 2.5)

ENV = "PROMETHEUS_MULTIPROC_DIR"


def use_multiprocess_dir(folder: Path | None = None) -> Path:
    """Turn on multiprocess mode for this process and its children, in an empty folder
    (a fresh temporary one unless given; values left by an earlier run are removed, or
    they would be added to this run's). Call before importing any metric module."""
    path = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="promptbatch-metrics-"))
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ[ENV] = str(path)
    return path


def multiprocess_registry() -> Any:
    """A registry that sums what every process of the multiprocess folder wrote."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def registry_for_process() -> Any:
    """The registry this process should serve: the multiprocess sum in multiprocess mode,
    else the library's default one."""
    if os.environ.get(ENV):
        return multiprocess_registry()
    from prometheus_client import REGISTRY

    return REGISTRY


def serve(port: int, host: str, registry: Any, what: str) -> None:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread. A port in
    use is an error that names the setting (two processes on one machine need two)."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve the {what}'s metrics on {host}:{port} ({exc.strerror}); "
                      "give each process on this machine its own --metrics-port "
                      "(PROMPTBATCH_METRICS_PORT), or 0 to turn them off") from None

