"""Bulk extraction with one schema: `promptbatch run` on generated lines, each a document
behind one long shared instruction and a ``json_schema`` response format, with the
``simulated`` provider, in one command.

Rows: the same documents as plain prompts (no schema: the baseline), with the schema,
and with the schema while ``simulated`` cuts a share of its JSON answers in half
(``--invalid-rate``, as a model without constrained decoding may answer; each such
answer is asked again once, ``schema_retries``). For each: wall time, jobs/s and its
ratio to the baseline; the output lines whose ``parsed`` value validates against the
schema (checked here with jsonschema, the format checker on) and those FAILED
``invalid_output`` with their raw answer kept; and the run's own summary line (valid at
first answer / repaired / failed). Target: every SUCCEEDED line holds a parsed value that
validates, and the summary agrees with the lines.

    .venv/bin/python bench/extraction.py [--lines 10000] [--workers 2] [--invalid-rate 0.05]
        [--time-scale 0]

``--time-scale 0`` (the default) reports simulated's usage without sleeping its modelled
durations: the figures are then the pipeline's own cost of a schema (instances, checks,
re-asks), not a model's decoding time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jsonschema import Draft202012Validator

from bench.common import table

#: The one schema of every line: a record of a business document.
SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["company", "contact", "email", "date", "total", "currency", "items",
                 "category"],
    "properties": {
        "company": {"type": "string", "minLength": 2, "maxLength": 60},
        "contact": {"type": "string"},
        "email": {"type": "string", "format": "email"},
        "date": {"type": "string", "format": "date"},
        "total": {"type": "number", "minimum": 0},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "items": {"type": "array", "minItems": 1, "maxItems": 5, "items": {
            "type": "object", "additionalProperties": False,
            "required": ["name", "quantity"],
            "properties": {"name": {"type": "string"},
                           "quantity": {"type": "integer", "minimum": 1}}}},
        "category": {"anyOf": [{"enum": ["invoice", "order", "quote"]}, {"type": "null"}]},
    }}
INSTRUCTION = ("You extract records from business documents. Read the document and "
               "answer with one JSON object that follows the schema: the company that "
               "issued it, the contact person, their email, the document's date, the total "
               "amount and its currency, each line item with its quantity, and the kind of "
               "document. Leave nothing out; use null for a kind you cannot tell. ") * 3
FAMILIES = ["invoice", "purchase order", "quote", "delivery note", "credit note", "receipt",
            "statement", "pro forma", "order confirmation", "packing list", "bill",
            "estimate", "remittance advice", "debit note", "work order", "contract"]
COMPANIES = ["Acme Tools", "Northwind Traders", "Globex", "Initech", "Umbrella Supplies",
             "Hooli", "Stark Parts", "Wayne Freight", "Soylent Foods", "Tyrell Devices"]
GOODS = ["bolts", "cables", "valves", "pallets", "sensors", "gaskets", "filters", "pumps"]
_SUMMARY = re.compile(r"valid at first answer / repaired / failed\s*[│|]\s*(\d+) / (\d+) / "
                      r"(\d+)")


def generate(path: Path, lines: int, *, schema: bool, seed: int = 11) -> None:
    """``lines`` extraction jobs (documents of 16 families) for simulated."""
    rng = random.Random(seed)
    fmt = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA,
                                                  "strict": True}}
    with path.open("w", encoding="utf-8") as fh:
        for i in range(lines):
            family = FAMILIES[i % len(FAMILIES)]
            company = rng.choice(COMPANIES)
            items = ", ".join(f"{rng.randrange(1, 90)} {rng.choice(GOODS)}"
                              for _ in range(rng.randrange(1, 4)))
            doc = (f"{family.title()} {i} from {company}, contact Dana {rng.choice(GOODS)}"
                   f"man, billing@{company.split()[0].lower()}.example: {items}; total "
                   f"{rng.randrange(50, 9000)} EUR, dated 2026-{rng.randrange(1, 13):02d}-"
                   f"{rng.randrange(1, 29):02d}.")
            line: dict[str, Any] = {
                "id": f"doc-{i}", "provider": "simulated", "model": "sim-1",
                "priority": "bulk", "messages": [{"role": "system", "content": INSTRUCTION},
                                                 {"role": "user", "content": doc}]}
            if schema:
                line["response_format"] = fmt
            fh.write(json.dumps(line) + "\n")


def run(src: Path, workers: int, env_extra: dict[str, str]) -> tuple[float, str, Path]:
    """(wall seconds, stdout, output file) of one `promptbatch run` in a fresh folder."""
    data = Path(tempfile.mkdtemp(prefix="pb-extract-"))
    out = data / "out.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTBATCH_")}
    env.update(PROMPTBATCH_DATA_DIR=str(data / "var"), COLUMNS="200", **env_extra)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "promptbatch", "run", str(src), "--out",
                           str(out), "--provider", "simulated", "--workers", str(workers)],
                          env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"promptbatch run failed:\n{done.stderr[-3000:]}")
    return wall, done.stdout, out


def check(out: Path, shaped: bool) -> dict[str, int]:
    """What the output lines hold: valid parsed values (``shaped``: else answers), invalid_output
    failures (raw answer kept), other states, and the lines asked again."""
    validator = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)
    counts = {"lines": 0, "valid": 0, "invalid_output": 0, "other": 0, "repaired": 0,
              "bad": 0}
    for raw in out.open(encoding="utf-8"):
        row = json.loads(raw)
        counts["lines"] += 1
        if row["state"] == "SUCCEEDED" and not shaped:
            counts["valid" if row["text"] else "bad"] += 1
        elif row["state"] == "SUCCEEDED":
            good = row["parsed"] is not None and validator.is_valid(row["parsed"]) and (
                json.loads(row["text"]) == row["parsed"])
            counts["valid" if good else "bad"] += 1
            counts["repaired"] += bool(row["schema_retries"])
        elif row["error_code"] == "invalid_output" and row["text"]:
            counts["invalid_output"] += 1
        else:
            counts["other"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--invalid-rate", type=float, default=0.05)
    parser.add_argument("--time-scale", type=float, default=0.0)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="pb-extract-in-"))
    plain, shaped = folder / "plain.jsonl", folder / "schema.jsonl"
    generate(plain, args.lines, schema=False)
    generate(shaped, args.lines, schema=True)
    base_env = {"PROMPTBATCH_SIMULATED_TIME_SCALE": str(args.time_scale)}
    configs = [("plain prompts (baseline)", plain, base_env),
               ("json_schema", shaped, base_env),
               (f"json_schema, {args.invalid_rate:.0%} of answers cut",
                shaped, {**base_env,
                         "PROMPTBATCH_SIMULATED_INVALID_RATE": str(args.invalid_rate)})]
    rows: list[list[object]] = []
    baseline = 0.0
    for name, src, env in configs:
        wall, stdout, out = run(src, args.workers, env)
        counts = check(out, src is shaped)
        rate = counts["lines"] / wall
        baseline = baseline or rate
        m = _SUMMARY.search(stdout)
        summary = "/".join(m.groups()) if m else "-"
        rows.append([name, counts["lines"], round(wall, 1), round(rate, 1),
                     f"{rate / baseline:.2f}x", counts["valid"] if src is shaped else "-",
                     counts["repaired"] if src is shaped else "-",
                     counts["invalid_output"] if src is shaped else "-",
                     counts["bad"] + counts["other"], summary])
    table(f"promptbatch run, {args.lines:,} extraction lines, simulated (time scale "
          f"{args.time_scale:g}), {args.workers} workers",
          ["run", "lines", "wall s", "jobs/s", "vs baseline", "parsed valid",
           "of them repaired", "failed invalid_output", "other/bad",
           "summary: first/repaired/failed"], rows)


if __name__ == "__main__":
    main()
