"""Bulk extraction on a real llama.cpp server: one schema, 16 families of documents.

    make bench-llm-extraction    # builds llama-server once, then runs this with --runs 3
    .venv/bin/python bench/llm_extraction.py [--per-family 8] [--runs 3] [--cache-ram 64]

Workload: one long shared instruction (a system prompt of ~420 tokens), one
``json_schema`` response format (strict: six required fields, an enum of the document
kinds, bounded strings, a date, a bounded integer and a currency enum), and documents of
16 families: each family is a source with its own letterhead and standard terms (~560
tokens, the family's shared text, written before the document's own lines), each
document its own number, date, customer, items and total (~80 tokens). All generated
here, deterministically. ``--per-family`` documents of each family, shuffled,
``temperature`` 0, ``max_tokens`` 128. llama-server decodes the answer under the
schema's grammar.

The same Celery worker (``--workers`` processes, the ``openai`` provider, strategy
``auto``) runs both modes against a fresh llama-server (4 slots, ``--cache-ram`` MiB of
host prompt cache) each time, as ``bench/llm.py`` does:

* promptbatch: the scheduler forms the batches (max 32);
* FIFO batches: batches of 32 in arrival order, claimed through the scheduler's claim
  path and sent as one task each.

Reported per run: jobs/s, the answers that validate against the schema (checked here
again with jsonschema, format checker on), those asked again (``schema_retries``), those
FAILED ``invalid_output``, prompt tokens computed and cached (the server's own
``usage``), and the mean number of families in a batch (from the results' batch ids).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jsonschema import Draft202012Validator

from bench.common import table
from bench.llama import MODEL_NAME, LlamaServer
from bench.llm import SIZE, run_jobs
from jobs.models import JobResult

KINDS = ["invoice", "purchase order", "quote", "delivery note", "credit note", "receipt",
         "statement", "pro forma invoice", "order confirmation", "packing list", "bill",
         "estimate", "remittance advice", "debit note", "work order", "rental agreement"]
#: The one schema of every job: what a bulk extraction pipeline keeps of a document.
SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["document_type", "issuer", "number", "date", "total", "currency"],
    "properties": {
        "document_type": {"enum": KINDS},
        "issuer": {"type": "string", "minLength": 2, "maxLength": 48},
        "number": {"type": "string", "minLength": 1, "maxLength": 16},
        "date": {"type": "string", "format": "date"},
        "total": {"type": "integer", "minimum": 0, "maximum": 1_000_000},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
    }}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {
    "name": "document_record", "schema": SCHEMA, "strict": True}}

INSTRUCTION = (
    "You are the extraction step of an accounts-payable pipeline. Each message holds one "
    "business document as a supplier sent it: first the supplier's letterhead and its "
    "standard terms, then the document's own lines. Read the whole document and answer "
    "with one JSON object that follows the schema you are given, and nothing else. "
    "Field by field: document_type is the kind of document as its heading names it, "
    "written in lower case exactly as one of the allowed values; issuer is the name of "
    "the company that issued the document, as its letterhead writes it, without the "
    "legal form when the letterhead adds one; number is the document's own number as "
    "printed after 'No.', without the word 'No.'; date is the document's date in ISO "
    "form, year first, then month and day, each with two digits; total is the amount "
    "due in whole units of its currency, without separators or symbols, rounded down "
    "when the document shows cents; currency is the three-letter code of the currency "
    "of the total. Never take a figure from the standard terms: a rate of interest, a "
    "number of days, a discount or a fee printed there is not the total of the "
    "document. When the document shows several amounts, the total is the last one, the "
    "amount due after taxes and discounts. When the document's heading and its terms "
    "disagree about its kind, the heading wins. Do not guess a field that the document "
    "does not show: every document of this pipeline shows all six, so read again "
    "before you answer. Do not add fields, comments or explanations; do not wrap the "
    "object in a code block. Dates in the terms (their version or their validity) are "
    "never the document's date. The customer named after 'Bill to' is never the issuer. "
    "Keep the issuer's spelling, capital letters and punctuation as printed. "
    "A credit note's total is the amount credited, a positive number. "
    "Amounts in another currency, quoted for information in the terms, are ignored."
)

#: The mode that sends FIFO batches of the jobs sorted by family: the best grouping there
#: is, for comparison (what the server gains when every batch holds whole families).
BY_FAMILY = "batches by family"
#: Where the shared instruction stands: at the start of every prompt, or after a line
#: naming the document's source.
LAYOUTS = ("instruction-first", "source-first")
_FIRMS = ["Acme Tools", "Northwind Traders", "Globex Industrial", "Initech Supplies",
          "Umbrella Logistics", "Hooli Hardware", "Stark Components", "Wayne Freight",
          "Soylent Foods", "Tyrell Devices", "Cyberdyne Metals", "Vandelay Imports",
          "Oceanic Paper", "Gringotts Office", "Monarch Textiles", "Pied Piper Cables"]
_CITIES = ["Lyon", "Leeds", "Porto", "Gdansk", "Ghent", "Bremen", "Turin", "Malmo",
           "Cork", "Brno", "Graz", "Utrecht", "Bilbao", "Tampere", "Aarhus", "Nantes"]
_CURRENCY = ["EUR", "GBP", "EUR", "USD"]
_GOODS = ["hex bolts", "steel cable", "ball valves", "euro pallets", "pressure sensors",
          "rubber gaskets", "air filters", "gear pumps", "copper pipe", "cable ties",
          "safety gloves", "printer paper", "LED panels", "hinges", "drill bits", "fuses"]
_CUSTOMERS = ["Harbor Retail", "Blue Peak Hotels", "Ostara Clinics", "Kestrel Builders",
              "Lumen Schools", "Riverside Bakery", "Nordlys Energy", "Corvid Labs"]


def family_text(f: int) -> str:
    """The shared text of family ``f``: its supplier's letterhead and standard terms
    (~560 tokens), the same on every document of the family."""
    rng = random.Random(1000 + f)
    firm, city, cur = _FIRMS[f], _CITIES[f], _CURRENCY[f % len(_CURRENCY)]
    head = (f"{firm} Ltd, {rng.randrange(2, 200)} {rng.choice(['Quay', 'Mill', 'Station'])} "
            f"Road, {city}. VAT {rng.randrange(10**8, 10**9)}. Bank IBAN "
            f"XX{rng.randrange(10**15, 10**16)}. Telephone +{rng.randrange(30, 49)} "
            f"{rng.randrange(10**8, 10**9)}.\nStandard terms of {firm}, version "
            f"{rng.randrange(1, 9)}.{rng.randrange(0, 10)}:")
    clauses = []
    for n in range(1, 11):
        days, rate = rng.randrange(10, 90), rng.randrange(1, 12)
        clauses.append(
            f"{n}. {rng.choice(['Payment', 'Settlement', 'Remittance'])} of {firm} "
            f"documents is due within {days} days in {cur}; arrears bear {rate}% interest "
            f"a month from day {days + 1}, and claims about {rng.choice(_GOODS)} must "
            f"reach {city} within {rng.randrange(2, 15)} working days.")
    return head + "\n" + "\n".join(clauses)


def document(f: int, k: int) -> tuple[str, dict[str, Any]]:
    """Document ``k`` of family ``f``: its own lines (~80 tokens) after the family's text,
    and the record a perfect extraction would give."""
    rng = random.Random(f * 10_007 + k)
    kind, firm, cur = KINDS[f], _FIRMS[f], _CURRENCY[f % len(_CURRENCY)]
    number = f"{firm[:2].upper()}-{rng.randrange(1000, 99999)}"
    date = f"2026-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}"
    lines, total = [], 0
    for _ in range(rng.randrange(2, 5)):
        qty, price = rng.randrange(1, 40), rng.randrange(3, 400)
        total += qty * price
        lines.append(f"- {qty} x {rng.choice(_GOODS)} at {price} {cur}")
    text = (f"{kind.upper()} No. {number}\nDate: {date}\nBill to: {rng.choice(_CUSTOMERS)}, "
            f"{rng.choice(_CITIES)}\n" + "\n".join(lines) + f"\nTotal due: {total} {cur}")
    return text, {"document_type": kind, "issuer": firm, "number": number, "date": date,
                  "total": total, "currency": cur}


def system_prompt(f: int, layout: str) -> str:
    """The system prompt of family ``f``'s documents: the shared instruction, opened by a
    line naming the documents' source in the ``source-first`` layout."""
    if layout == "source-first":
        return f"Source: {_FIRMS[f]}, {KINDS[f]} documents.\n\n{INSTRUCTION}"
    return INSTRUCTION


def workload(per_family: int, families: int = 16, seed: int = 31,
             layout: str = "instruction-first",
             ) -> tuple[list[dict[str, Any]], list[int], list[dict[str, Any]]]:
    """The jobs, shuffled; each job's family; each job's right record."""
    texts = [family_text(f) for f in range(families)]
    pairs = [(f, k) for f in range(families) for k in range(per_family)]
    random.Random(seed).shuffle(pairs)
    docs = [document(f, k) for f, k in pairs]
    jobs = [{"messages": [{"role": "system", "content": system_prompt(f, layout)},
                          {"role": "user", "content": texts[f] + "\n\n" + text}],
             "provider": "openai", "model": MODEL_NAME, "response_format": RESPONSE_FORMAT,
             "params": {"max_tokens": 128, "temperature": 0}}
            for (f, _), (text, _) in zip(pairs, docs, strict=True)]
    return jobs, [f for f, _ in pairs], [want for _, want in docs]


def check(results: list[JobResult], families: list[int],
          expected: list[dict[str, Any]]) -> dict[str, float]:
    """What the results hold: valid answers (at the first answer, or after being asked
    again), FAILED ``invalid_output``, other failures, fields right, prompt tokens, and
    the mean number of families in a batch."""
    validator = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)
    out: dict[str, float] = defaultdict(float)
    batches: dict[str, set[int]] = defaultdict(set)
    for r, family, want in zip(results, families, expected, strict=True):
        if r.batch_id:
            batches[r.batch_id].add(family)
        if r.usage is not None:
            out["prompt"] += r.usage.prompt_tokens
            out["cached"] += r.usage.cached_tokens
        if r.state.value == "SUCCEEDED" and r.parsed is not None \
                and validator.is_valid(r.parsed) and json.loads(r.text or "") == r.parsed:
            out["valid"] += 1
            out["first"] += not r.schema_retries
            out["fields right"] += sum(r.parsed.get(k) == v for k, v in want.items())
        elif r.error_code == "invalid_output":
            out["invalid_output"] += 1
        else:
            out["other"] += 1
        out["retried"] += bool(r.schema_retries)
    out["batches"] = len(batches)
    out["families per batch"] = statistics.mean(len(f) for f in batches.values()) \
        if batches else 0.0
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_mode(mode: str, jobs: list[dict[str, Any]], args: argparse.Namespace,
             run_dir: Path) -> tuple[dict[str, JobResult], float, float]:
    """One mode against a fresh llama-server: the results (in the order of ``jobs``), the
    wall time and the server's CPU seconds."""
    with LlamaServer(run_dir / "llama.log", slots=args.slots, threads=args.threads,
                     cache_ram_mib=args.cache_ram) as llama:
        sent = "FIFO batches" if mode == BY_FAMILY else mode
        results, wall = run_jobs(sent, jobs, args.workers, run_dir, llama.base_url,
                                 args.timeout)
        assert llama.proc is not None
        return results, wall, cpu_seconds(llama.proc.pid)


def row(k: int, mode: str, n: int, wall: float, cpu: float, got: dict[str, float],
        load: tuple[float, float]) -> list[object]:
    """A line of the table."""
    prompt, cached = got["prompt"], got["cached"]
    return [str(k), mode, f"{n / wall:.3f}", f"{cpu / n:.1f}",
            f"{got['valid']:.0f}/{n}", f"{got['first']:.0f}", f"{got['retried']:.0f}",
            f"{got['invalid_output']:.0f}", f"{got['other']:.0f}", f"{prompt - cached:,.0f}",
            f"{100 * cached / max(prompt, 1):.0f}%",
            f"{got['batches']:.0f} / {got['families per batch']:.1f}",
            f"{100 * got['fields right'] / max(6 * n, 1):.0f}%",
            f"{load[0]:.1f}-{load[1]:.1f}"]


COLUMNS = ["run", "mode", "jobs/s", "server CPU s/job", "valid", "valid at 1st answer",
           "asked again", "invalid_output", "other failed", "prompt tokens computed",
           "cached", "batches / families each", "fields right", "load avg"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-family", type=int, default=8,
                        help="documents of each of the 16 families")
    parser.add_argument("--runs", type=int, default=3, help="runs of every mode")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--modes", default=f"promptbatch,FIFO batches,{BY_FAMILY}",
                        help="comma-separated modes to run, in order")
    parser.add_argument("--layout", choices=LAYOUTS, default=LAYOUTS[0],
                        help="instruction-first: the shared instruction opens every prompt; "
                        "source-first: a line naming the document's source opens it")
    parser.add_argument("--cache-ram", type=int, default=64,
                        help="llama-server --cache-ram in MiB (0: each slot keeps only its "
                        "own prompt; llama.cpp's default is 8 GiB)")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="llama-server threads (2 cores shared with the worker, the "
                        "scheduler and Redis)")
    parser.add_argument("--timeout", type=float, default=3600,
                        help="seconds each mode may take before the benchmark stops")
    args = parser.parse_args()
    jobs, families, expected = workload(args.per_family, layout=args.layout)
    # The best grouping there is: FIFO batches of the jobs sorted by family.
    order = sorted(range(len(jobs)), key=families.__getitem__)
    sorted_in = ([jobs[i] for i in order], [families[i] for i in order],
                 [expected[i] for i in order])
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows: list[list[object]] = []
    rates: dict[str, list[float]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="pb-llm-extract-") as d:
        for k in range(1, args.runs + 1):
            for mode in modes:  # alternating, so that all see the same machine
                run_dir = Path(d) / f"{k}-{mode.replace(' ', '-')}"
                run_dir.mkdir(parents=True)
                these, fams, want = sorted_in if mode == BY_FAMILY else (jobs, families,
                                                                        expected)
                before = os.getloadavg()[0]
                results, wall, cpu = run_mode(mode, these, args, run_dir)
                got = check(list(results.values()), fams, want)
                rates[mode].append(len(jobs) / wall)
                rows.append(row(k, mode, len(jobs), wall, cpu, got,
                                (before, os.getloadavg()[0])))
                print(rows[-1], flush=True)
    table(f"llama-server (SmolLM2-135M, {args.slots} slots, {args.threads} thread(s), "
          f"--cache-ram {args.cache_ram} MiB), {len(jobs)} documents of 16 families "
          f"({args.layout}), one json_schema, batches of {SIZE}, {args.workers} worker "
          "processes", COLUMNS, rows)
    ours = statistics.median(rates[modes[0]])
    for mode in modes:
        ratios = [a / b for a, b in zip(rates[modes[0]], rates[mode], strict=True)]
        print(f"{mode}: median {statistics.median(rates[mode]):.3f} jobs/s; {modes[0]} "
              f"{ours / statistics.median(rates[mode]):.2f}x (per run: "
              f"{', '.join(f'{r:.2f}x' for r in ratios)})")


if __name__ == "__main__":
    main()
