"""A deterministic instance of a JSON Schema, its text drawn from a prompt: what ``echo``
and ``simulated`` answer to a ``json_schema`` response format or a tool's parameters.

It knows the keywords pydantic, instructor and LangChain write: ``type`` (one or a list),
``properties``, ``required``, ``additionalProperties``, ``minProperties``, ``enum``,
``const``, ``items`` / ``prefixItems``, ``minItems`` / ``maxItems`` / ``uniqueItems``,
``anyOf`` / ``oneOf`` / ``allOf``, ``$ref`` into ``$defs`` (or ``definitions``),
OpenAPI's ``nullable``, ``minimum`` / ``maximum`` (and their exclusive forms),
``multipleOf``, ``minLength`` / ``maxLength``, and ``format`` ``date``, ``date-time``,
``time``, ``duration``, ``email``, ``idn-email``, ``uri``, ``uuid``, ``ipv4``, ``ipv6``,
``hostname``, ``idn-hostname``, ``json-pointer``, ``relative-json-pointer`` and
pydantic's address, network and interface formats (``ipvanyaddress``, ...), and
``pattern`` (a string the regular expression finds, within ``minLength`` and
``maxLength`` where the pattern allows: ``workers.providers.patterns``). Every property
is filled (an optional one with its non-null branch), so an extraction gets whole records.

The same schema and prompt give the same instance; another prompt gives other words and
numbers. A schema beyond these keywords (``not``, conditionals, a pattern beyond the
constructs ``patterns`` knows) may get an instance that does not validate: ``instance``
tries a few seeds and returns the first that validates, else the last one tried (the
worker's check then asks again, and the job ends ``invalid_output``). Pure: no I/O, no
clock.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator
from typing import Any

from jobs.answers import validate
from workers.providers.patterns import matching

#: Deepest nesting filled; below it optional parts stay out and arrays hold what they
#: must (recursive models end).
MAX_DEPTH = 4
#: Seeds tried before giving up on an instance that validates.
TRIES = 4
_WORDS = re.compile(r"[A-Za-z][A-Za-z0-9'-]*")
_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


def prompt_words(text: str) -> list[str]:
    """The words an instance's text is drawn from (``answer`` for a prompt without)."""
    return _WORDS.findall(text)[:512] or ["answer"]


class _Gen:
    """One instance: the schema's root (for ``$ref``), the words, the seed."""

    def __init__(self, root: dict[str, Any], words: list[str], seed: str) -> None:
        self.root = root
        self.words = words
        self.seed = seed

    def number(self, path: str, span: int) -> int:
        """A number in ``[0, span)`` drawn from the seed and the path."""
        digest = hashlib.blake2b(f"{self.seed}\x00{path}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") % max(1, span)

    def resolve(self, schema: dict[str, Any]) -> dict[str, Any]:
        """The schema a ``$ref`` points to (local references only), merged with its
        siblings."""
        seen = 0
        while isinstance(schema.get("$ref"), str) and schema["$ref"].startswith("#") and seen < 32:
            target: Any = self.root
            for part in schema["$ref"][1:].split("/")[1:]:
                part = part.replace("~1", "/").replace("~0", "~")
                target = target[int(part)] if isinstance(target, list) else target.get(part, {})
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = {**target, **rest} if isinstance(target, dict) else rest
            seen += 1
        return schema

    def value(self, schema: Any, path: str, depth: int) -> Any:
        if schema is True or not isinstance(schema, dict):
            return self.text({}, path)
        schema = self.resolve(schema)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            options = schema["enum"]
            return options[self.number(path, len(options))]
        if isinstance(schema.get("allOf"), list):
            parts = [self.resolve(p) for p in schema["allOf"] if isinstance(p, dict)]
            return self.value(_merge(schema, parts), path, depth)
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key]:
                return self.value(self._branch(schema, key, depth), path, depth)
        return self.typed(schema, _type_of(schema), path, depth)

    def _branch(self, schema: dict[str, Any], key: str, depth: int) -> dict[str, Any]:
        """The branch of ``anyOf``/``oneOf`` to fill: the first that is not null (null
        itself deep down, to end recursion), with the parent's other keywords."""
        branches = [self.resolve(b) if isinstance(b, dict) else {} for b in schema[key]]
        nulls = [b for b in branches if _type_of(b) == "null"]
        others = [b for b in branches if _type_of(b) != "null"]
        pick = nulls[0] if (depth >= MAX_DEPTH and nulls) or not others else others[0]
        rest = {k: v for k, v in schema.items() if k not in (key, "type")}
        return {**rest, **pick}

    def typed(self, schema: dict[str, Any], kind: str, path: str, depth: int) -> Any:
        if kind == "object":
            return self.obj(schema, path, depth)
        if kind == "array":
            return self.array(schema, path, depth)
        if kind in ("integer", "number"):
            return self.num(schema, kind, path)
        if kind == "boolean":
            return self.number(path, 2) == 1
        if kind == "null":
            return None
        return self.text(schema, path)

    def obj(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        found = schema.get("properties")
        props: dict[str, Any] = found if isinstance(found, dict) else {}
        required = set(schema.get("required") or ())
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if depth < MAX_DEPTH or name in required:
                out[name] = self.value(sub, f"{path}.{name}", depth + 1)
        extra = schema.get("additionalProperties", True)
        least = int(schema.get("minProperties") or 0)
        # A free-form object (no ``properties`` at all: a map, ``json_object``) gets an
        # entry; ``properties: {}`` is an object without fields (a tool without
        # arguments), left empty unless ``minProperties`` asks for more.
        free = found is None and depth < MAX_DEPTH
        if extra is not False and (free or len(out) < least):
            sub = extra if isinstance(extra, dict) else {}
            for i in range(max(1 if free else 0, least - len(out))):
                key = self.pick_words(f"{path}#key{i}", 1)[0].lower()
                while key in out:
                    key += "_"
                out[key] = self.value(sub, f"{path}.{key}", depth + 1)
        return out

    def array(self, schema: dict[str, Any], path: str, depth: int) -> list[Any]:
        found = schema.get("prefixItems")
        prefix: list[Any] = found if isinstance(found, list) else []
        items = schema.get("items", {})
        if isinstance(items, list):  # draft 4-7 tuples
            prefix, items = items, schema.get("additionalItems", {})
        least = int(schema.get("minItems") or 0)
        most = schema.get("maxItems")
        count = max(least, len(prefix), 0 if depth >= MAX_DEPTH else 2 if depth < 2 else 1)
        if isinstance(most, int):
            count = min(count, most)
        if items is False:
            count = min(count, len(prefix))
        out: list[Any] = []
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else items
            value = self.value(sub, f"{path}[{i}]", depth + 1)
            tries = 0
            while schema.get("uniqueItems") and value in out and tries < 8:
                tries += 1
                value = self.value(sub, f"{path}[{i}]~{tries}", depth + 1)
            out.append(value)
        return out

    def num(self, schema: dict[str, Any], kind: str, path: str) -> int | float:
        low, low_open = _bound(schema, "minimum", "exclusiveMinimum", max)
        high, high_open = _bound(schema, "maximum", "exclusiveMaximum", min)
        step = schema.get("multipleOf")
        if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
            first = -(-(low if low is not None else 0) // step) * step
            if low_open and first == low:
                first += step
            return int(first) if kind == "integer" else first
        if kind == "integer":
            lo = 0 if low is None else int(-(-low // 1)) + (1 if low_open and low % 1 == 0 else 0)
            hi = lo + 100 if high is None else int(high // 1) - (
                1 if high_open and high % 1 == 0 else 0)
            return lo + self.number(path, hi - lo + 1) if hi >= lo else lo
        lo_f = 0.0 if low is None else float(low)
        hi_f = lo_f + 100.0 if high is None else float(high)
        value = lo_f + (hi_f - lo_f) * (self.number(path, 1000) + 1) / 1002
        short = round(value, 2)
        return short if lo_f < short < hi_f or (lo_f <= short <= hi_f and not (
            low_open or high_open)) else value

    def pick_words(self, path: str, n: int) -> list[str]:
        start = self.number(path, len(self.words))
        return [self.words[(start + i) % len(self.words)] for i in range(n)]

    def text(self, schema: dict[str, Any], path: str) -> str:
        fmt = schema.get("format")
        word = self.pick_words(path, 1)[0].lower()
        n = self.number(path + "#n", 10_000)
        formatted = {
            "date": f"2026-{n % 12 + 1:02d}-{n % 28 + 1:02d}",
            "date-time": f"2026-{n % 12 + 1:02d}-{n % 28 + 1:02d}T{n % 24:02d}:{n % 60:02d}:00Z",
            "time": f"{n % 24:02d}:{n % 60:02d}:00Z",
            "email": f"{word}@example.com",
            "uri": f"https://example.com/{word}",
            "url": f"https://example.com/{word}",
            "uuid": str(uuid.UUID(int=self.number(path + "#uuid", 2 ** 62))),
            "ipv4": f"192.0.2.{n % 254 + 1}",
            "ipv6": f"2001:db8::{n % 65535 + 1:x}",
            "hostname": f"{word}.example.com",
            "idn-email": f"{word}@example.com",
            "idn-hostname": f"{word}.example.com",
            "duration": f"P{n % 30 + 1}DT{n % 24}H",
            "json-pointer": f"/{word}/{n % 10}",
            "relative-json-pointer": f"{n % 3}/{word}",
            # pydantic's own: IPvAnyAddress, and the network and interface types
            "ipvanyaddress": f"192.0.2.{n % 254 + 1}",
            "ipv4network": "192.0.2.0/24",
            "ipv6network": "2001:db8::/32",
            "ipvanynetwork": "192.0.2.0/24",
            "ipv4interface": f"192.0.2.{n % 254 + 1}/24",
            "ipv6interface": f"2001:db8::{n % 65535 + 1:x}/64",
            "ipvanyinterface": f"192.0.2.{n % 254 + 1}/24",
        }.get(str(fmt))
        least = int(schema.get("minLength") or 0)
        most = schema.get("maxLength")
        if formatted is not None:
            text = formatted
        else:
            text = " ".join(self.pick_words(path, 3))
            while len(text) < least:
                text += " " + " ".join(self.pick_words(f"{path}+{len(text)}", 3))
        if isinstance(most, int) and len(text) > most:
            text = text[:most].rstrip() if most > 0 else ""
            text = text + "x" * (least - len(text)) if len(text) < least else text
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and not _finds(pattern, text):
            found = matching(pattern, lambda label, n: self.number(f"{path}#{label}", n),
                             least, most if isinstance(most, int) else None)
            text = found if found is not None else text
        return text


def _finds(pattern: str, text: str) -> bool:
    """Whether ``pattern`` finds a match in ``text`` (as JSON Schema's ``pattern``
    checks); False for a pattern Python cannot compile."""
    try:
        return re.search(pattern, text) is not None
    except re.error:
        return False


def _bound(schema: dict[str, Any], inclusive: str, exclusive: str,
           tighter: Any) -> tuple[float | None, bool]:
    """A bound of a number and whether it is open (draft 4's boolean exclusive forms
    too)."""
    value = schema.get(inclusive)
    value = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    other = schema.get(exclusive)
    if other is True:
        return value, value is not None
    if (isinstance(other, int | float) and not isinstance(other, bool)
            and (value is None or tighter(value, other) == other)):
        return other, True
    return value, False


def _type_of(schema: dict[str, Any]) -> str:
    """The type to fill: the schema's (the first not null of a list), else what its
    keywords imply."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k in _TYPES]
        kind = next((k for k in kinds if k != "null"), kinds[0] if kinds else None)
    if isinstance(kind, str) and kind in _TYPES:
        return kind
    if "properties" in schema or "additionalProperties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    if "minimum" in schema or "maximum" in schema:
        return "number"
    return "string"


def _merge(schema: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """``allOf`` (its ``parts``) as one schema: properties and required joined, the rest
    the last part's."""
    out: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
    for part in parts:
        for key, value in part.items():
            if key == "properties" and isinstance(value, dict):
                out["properties"] = {**out.get("properties", {}), **value}
            elif key == "required" and isinstance(value, list):
                out["required"] = [*out.get("required", []), *value]
            else:
                out[key] = value
    return out


def _seeds(seed: str) -> Iterator[str]:
    yield seed
    for i in range(1, TRIES):
        yield f"{seed}#{i}"


def instance(schema: dict[str, Any] | None, text: str, seed: str | None = None) -> Any:
    """A value for ``schema`` (None: any JSON object) drawn from the words of ``text``
    (choices seeded by ``seed``, else the text): the first of a few seeds that validates
    (see the module docstring)."""
    schema = schema if schema is not None else {"type": "object"}
    words = prompt_words(text)
    value: Any = None
    for each in _seeds(text if seed is None else seed):
        value = _Gen(schema, words, each).value(schema, "$", 0)
        if validate(value, schema, "content") is None:
            return value
    return value
