"""The deterministic JSON Schema instances ``echo`` and ``simulated`` answer with: they
validate (jsonschema, the format checker on) against the schemas pydantic writes and
against random combinations of the keywords served; same prompt, same instance."""

from __future__ import annotations

import datetime
import enum
import ipaddress
import uuid
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import (
    AnyUrl,
    BaseModel,
    Field,
    IPvAnyAddress,
    IPvAnyInterface,
    IPvAnyNetwork,
)

from jobs.answers import validate
from workers.providers.instances import instance

PROMPT = "Ada Lovelace, born 1815 in London, wrote the first program."


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    street: str
    city: str = Field(min_length=2, max_length=8)
    zip: str | None = None


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=130)
    score: float = Field(gt=0, lt=1)
    even: int = Field(multiple_of=2, ge=3)
    email: str = Field(json_schema_extra={"format": "email"})
    site: AnyUrl
    born: datetime.date
    seen: datetime.datetime
    at: datetime.time
    id: uuid.UUID
    tags: list[str] = Field(min_length=1, max_length=3)
    unique: set[int]
    color: Color
    kind: Literal["a", "b"]
    fixed: Literal["x"]
    address: Address
    maybe: Address | None = None
    friends: list[Person] = []
    extra: dict[str, int]
    pair: tuple[int, str]
    either: int | str


@pytest.mark.parametrize("model", [Person, Address])
def test_pydantic_schemas_get_instances_the_model_accepts(model: type[BaseModel]) -> None:
    schema = model.model_json_schema()
    value = instance(schema, PROMPT)
    assert validate(value, schema, "content") is None, value
    model.model_validate(value)
    assert instance(schema, PROMPT) == value  # deterministic
    assert instance(schema, "Grace Hopper of Arlington") != value  # drawn from the prompt


class Network(BaseModel):
    v6: ipaddress.IPv6Address
    any_ip: IPvAnyAddress
    every: datetime.timedelta
    net4: ipaddress.IPv4Network
    net6: ipaddress.IPv6Network
    if4: ipaddress.IPv4Interface
    if6: ipaddress.IPv6Interface
    any_net: IPvAnyNetwork
    any_if: IPvAnyInterface


@pytest.mark.parametrize("fmt", ["ipv6", "duration", "idn-email", "idn-hostname",
                                 "json-pointer", "relative-json-pointer", "regex"])
def test_every_format_the_checker_knows_gets_a_value_of_it(fmt: str) -> None:
    schema = {"type": "object", "properties": {"v": {"type": "string", "format": fmt}},
              "required": ["v"]}
    value = instance(schema, PROMPT)
    assert validate(value, schema, "content") is None, value


def test_addresses_and_durations_are_what_pydantic_reads() -> None:
    value = instance(Network.model_json_schema(), PROMPT)
    Network.model_validate(value)  # a timedelta's "duration" is not checked by jsonschema


def test_an_object_with_no_properties_is_empty_but_an_open_one_is_filled() -> None:
    """A tool without arguments (LangChain's ``@tool def now()``, ``properties: {}``) is
    called with ``{}``, as a model would (a function called with the arguments as keywords
    refuses any); a free-form object (a map, ``json_object``) gets an entry."""
    assert instance({"type": "object", "properties": {}}, PROMPT) == {}
    assert len(instance({"type": "object", "properties": {}, "minProperties": 1}, PROMPT)) == 1
    assert len(instance({"type": "object"}, PROMPT)) == 1
    assert len(instance({"type": "object", "additionalProperties": {"type": "integer"}},
                        PROMPT)) == 1


def test_text_is_drawn_from_the_prompts_words() -> None:
    value = instance({"type": "object", "properties": {"name": {"type": "string"}}}, PROMPT)
    assert all(word in PROMPT for word in value["name"].split())


@pytest.mark.parametrize(("schema", "expected"), [
    ({"const": 3}, 3),
    ({"enum": ["only"]}, "only"),
    ({"type": "null"}, None),
    ({"type": ["null", "boolean"]}, bool),
    ({"type": "string", "nullable": True}, str),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 0}, []),
    ({"type": "object", "properties": {}, "additionalProperties": False}, {}),
    ({"allOf": [{"$ref": "#/$defs/a"}, {"properties": {"b": {"const": 2}}}],
      "$defs": {"a": {"type": "object", "properties": {"a": {"const": 1}}}}},
     {"a": 1, "b": 2}),
    ({"oneOf": [{"type": "integer", "minimum": 5, "maximum": 5}, {"type": "string"}]}, 5),
])
def test_keywords(schema: dict[str, Any], expected: Any) -> None:
    value = instance(schema, PROMPT)
    if isinstance(expected, type):
        assert isinstance(value, expected)
    else:
        assert value == expected
    assert validate(value, schema, "content") is None


def test_a_recursive_model_ends() -> None:
    class Node(BaseModel):
        label: str
        children: list[Node] = []
        parent: Node | None = None

    schema = Node.model_json_schema()
    value = instance(schema, PROMPT)
    Node.model_validate(value)
    assert len(str(value)) < 20_000


def _leaf() -> st.SearchStrategy[dict[str, Any]]:
    bounds = st.integers(-1000, 1000)
    strings = st.builds(lambda lo, extra: {"type": "string", "minLength": lo,
                                           "maxLength": lo + extra},
                        st.integers(0, 30), st.integers(0, 30))
    formats = st.sampled_from(["date", "date-time", "time", "email", "uuid", "ipv4", "uri",
                               "hostname"]).map(lambda f: {"type": "string", "format": f})
    integers = st.builds(lambda lo, span: {"type": "integer", "minimum": lo,
                                           "maximum": lo + span}, bounds, st.integers(0, 50))
    numbers = st.builds(lambda lo, span: {"type": "number", "exclusiveMinimum": lo,
                                          "exclusiveMaximum": lo + span},
                        bounds, st.floats(0.01, 100))
    enums = st.lists(st.one_of(st.integers(), st.text(max_size=5)), min_size=1,
                     max_size=4, unique=True).map(lambda v: {"enum": v})
    return st.one_of(strings, formats, integers, numbers, enums, st.just({"type": "boolean"}),
                     st.just({"type": "null"}))


def _extend(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    arrays = st.builds(lambda item, lo, extra: {"type": "array", "items": item,
                                                "minItems": lo, "maxItems": lo + extra},
                       children, st.integers(0, 3), st.integers(0, 3))
    objects = st.builds(
        lambda props, closed: {"type": "object", "properties": props,
                               "required": sorted(props), "additionalProperties": not closed},
        st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True), children, max_size=4),
        st.booleans())
    unions = st.lists(children, min_size=1, max_size=3).map(lambda bs: {"anyOf": bs})
    nullable = children.map(lambda c: {"anyOf": [c, {"type": "null"}]})
    return st.one_of(arrays, objects, unions, nullable)


@settings(max_examples=150, deadline=None)
@given(st.recursive(_leaf(), _extend, max_leaves=12), st.text(max_size=80))
def test_random_schemas_of_the_keywords_served_get_valid_instances(
        schema: dict[str, Any], prompt: str) -> None:
    value = instance(schema, prompt)
    assert validate(value, schema, "content") is None, (schema, value)
