"""Embedding throughput of the default ``hashed`` embedder (target: 20,000 prompts/s).

    .venv/bin/python bench/embedder.py [--prompts 20000]

Prompts come from ``examples/prompts.jsonl`` (templates with long shared system prompts)
repeated with varied suffixes. The baseline, in the same process, is the same embedder
called one prompt at a time, as a scheduler that does not vectorise would.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import table
from jobs.models import JobRequest
from scheduler.embedders import HashedEmbedder

ROOT = Path(__file__).resolve().parents[1]
TARGET = 20_000.0


def workload(n: int) -> list[str]:
    rows = [json.loads(x) for x in (ROOT / "examples" / "prompts.jsonl").read_text().splitlines()]
    texts = []
    for row in rows:
        row.pop("id", None)
        req = JobRequest.model_validate(row)
        texts.append(req.prompt if req.prompt is not None else "\n".join(
            f"{m.role}: {m.content}" for m in req.messages or ()))
    return [f"{texts[i % len(texts)]} (request {i})" for i in range(n)]


def rate(emb: HashedEmbedder, texts: list[str], batch: int, repeat: int = 3) -> float:
    best = 0.0
    for _ in range(repeat):
        t0 = time.perf_counter()
        for start in range(0, len(texts), batch):
            emb.embed(texts[start:start + batch])
        best = max(best, len(texts) / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=20_000)
    args = parser.parse_args()
    texts = workload(args.prompts)
    emb = HashedEmbedder(dim=256)
    emb.embed(texts[:100])  # warm up
    mean_chars = sum(map(len, texts)) / len(texts)
    one = rate(emb, texts[:2000], 1)
    rows = [("one prompt per call (baseline)", 1, one, "1.00x", f"{one / TARGET:.2f}")]
    for batch in (32, 1000, 5000):
        r = rate(emb, texts, batch)
        rows.append((f"vectorised, {batch} per call", batch, r, f"{r / one:.1f}x",
                     f"{r / TARGET:.2f}"))
    table(f"hashed embedder, dim 256, {len(texts)} prompts of {mean_chars:.0f} characters "
          "on average", ["run", "batch", "prompts/s", "vs baseline", "vs 20k/s target"], rows)


if __name__ == "__main__":
    main()
