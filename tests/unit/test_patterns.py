"""Strings a JSON Schema ``pattern`` finds (``workers.providers.patterns``), as ``echo`` and
``simulated`` write them: the patterns pydantic models and extraction schemas carry
(codes, ISO dates, e-mail addresses, ids), within ``minLength``/``maxLength`` where the
pattern allows; checked with ``re.search`` and with ``jsonschema`` through ``instance``;
the same draws give the same string."""

from __future__ import annotations

import hashlib
import re
from typing import Annotated, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field, StringConstraints, constr

from jobs.answers import validate
from workers.providers.instances import instance
from workers.providers.patterns import matching

PROMPT = "Invoice 2026-11 from Acme Corp to Ada Lovelace, London."


def draw(seed: str) -> Any:
    def pick(label: str, n: int) -> int:
        digest = hashlib.blake2b(f"{seed}\x00{label}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % n
    return pick


PATTERNS = [
    r"^[A-Z]{3}-\d{4}$",  # a code
    r"^\d{4}-\d{2}-\d{2}$",  # an ISO date
    r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$",  # a stricter ISO date
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$",
    r"^[\w.+-]+@[\w-]+\.[\w.-]+$",  # an e-mail address, as extraction schemas write it
    r"^[^@\s]+@[^@\s]+\.[a-zA-Z]{2,}$",
    r"^[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{12}$",  # a uuid
    r"^\+?[1-9]\d{1,14}$",  # E.164 phone
    r"^(\([0-9]{3}\))?[0-9]{3}-[0-9]{4}$",
    r"^#[0-9a-fA-F]{6}$",
    r"^[a-z0-9_-]{3,16}$",
    r"INV-\d+",  # unanchored
    r"^(?:foo|bar|baz)+$",
    r"^(\w)\w*\1$",  # a back-reference
    r"^(?P<x>ab)(?P=x)$",
    r"^(?!test)[a-z]{4}$",  # a lookahead (the text drawn does not start with it)
    r"^\S+\s\S+$",
    r"^[A-Z][a-z]+(?: [A-Z][a-z]+)*$",
    r"^\d{5}(?:-\d{4})?$",
    r"^[^,;]{1,5}$",
    r"^.{3}$",
    r"(?i)^sku_[a-z]{2}\d$",
    r"^[\u4e00-\u9fff]{2}$",
    r"^\$\d+\.\d{2}$",
    r"\bUSD\b",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_string_the_pattern_finds_the_same_for_the_same_draws(pattern: str) -> None:
    text = matching(pattern, draw("a"))
    assert text is not None and re.search(pattern, text), (pattern, text)
    assert matching(pattern, draw("a")) == text


@pytest.mark.parametrize(("pattern", "least", "most"), [
    (r"^[a-z0-9_-]{3,16}$", 10, 12),
    (r"^[A-Z]+$", 20, 20),
    (r"^\d+$", 0, 2),
    (r"INV-\d+", 15, 30),  # unanchored: padded after the match
    (r"^(?:ab)+$", 7, 9),
    (r"^\w+@\w+\.com$", 30, 40),
])
def test_length_bounds_are_honoured_with_the_pattern(pattern: str, least: int,
                                                     most: int) -> None:
    text = matching(pattern, draw("b"), least, most)
    assert text is not None and re.search(pattern, text)
    assert least <= len(text) <= most, text


@pytest.mark.parametrize(("pattern", "least", "most"), [
    (r"^[A-Z]{3}$", 5, 9),  # no string of three letters has five
    (r"^(", 0, None),  # not a regular expression
    (r"^[^\s\S]$", 0, None),  # a class with no character
])
def test_none_when_no_string_fits(pattern: str, least: int, most: int | None) -> None:
    assert matching(pattern, draw("c"), least, most) is None


class Invoice(BaseModel):
    """What an extraction with pydantic and instructor asks for."""

    number: Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}-\d{4}$")]
    issued: str = Field(pattern=r"^\d{4}-\d{2}-\d{2}$")
    contact: str = Field(json_schema_extra={"format": "email"})  # EmailStr's schema
    backup: str = Field(pattern=r"^[\w.+-]+@[\w-]+\.[\w.-]+$", max_length=40)
    sku: constr(pattern=r"^SKU-[0-9]{6}$")  # type: ignore[valid-type]
    ref: str = Field(pattern=r"^[a-z]{2,4}_\d+$", min_length=8, max_length=10)
    maybe_code: str | None = Field(default=None, pattern=r"^[A-Z]{2}\d{2}$")
    codes: list[Annotated[str, StringConstraints(pattern=r"^\d{3}$")]] = []


def test_a_pydantic_model_with_patterns_gets_an_instance_it_accepts() -> None:
    schema = Invoice.model_json_schema()
    value = instance(schema, PROMPT)
    assert validate(value, schema, "content") is None, value
    invoice = Invoice.model_validate(value)
    assert re.fullmatch(r"[A-Z]{3}-\d{4}", invoice.number)
    assert 8 <= len(invoice.ref) <= 10 and invoice.maybe_code is not None
    assert instance(schema, PROMPT) == value
    assert instance(schema, "Another document, Bergen 1999.") != value


@st.composite
def patterns(draw_: st.DrawFn) -> str:
    """Patterns of the constructs written: classes, repeats, alternation, groups,
    anchors."""
    atom = st.sampled_from([r"\d", r"\w", r"\s", "[A-Z]", "[a-f0-9]", "[^,]", "x", r"\.",
                            "-", ".", "(?:ab|c)", "(q|rs)"])
    quant = st.sampled_from(["", "?", "*", "+", "{2}", "{1,3}", "{2,}"])
    parts = draw_(st.lists(st.tuples(atom, quant), min_size=1, max_size=6))
    body = "".join(a + q for a, q in parts)
    return ("^" if draw_(st.booleans()) else "") + body + ("$" if draw_(st.booleans()) else "")


@settings(max_examples=200, deadline=None)
@given(patterns(), st.text(max_size=20), st.integers(0, 12), st.integers(0, 30))
def test_random_patterns_get_strings_they_find(pattern: str, seed: str, least: int,
                                               span: int) -> None:
    text = matching(pattern, draw(seed))
    assert text is not None and re.search(pattern, text), (pattern, text)
    bounded = matching(pattern, draw(seed), least, least + span)
    if bounded is not None:  # bounds that contradict the pattern give None
        assert re.search(pattern, bounded) and least <= len(bounded) <= least + span
    schema = {"type": "string", "pattern": pattern, "minLength": least,
              "maxLength": least + span}
    if bounded is not None:
        assert validate(instance(schema, seed), schema, "content") is None
