"""What a chat request carries beyond plain text, in OpenAI's shapes, and what comes back.

A message's ``content`` is a string or a list of parts (``text``; ``image_url`` with an
http(s) or ``data:`` URL and a ``detail``); an assistant message may carry ``tool_calls``
(its content then may be null) and a ``tool`` message answers one of them by
``tool_call_id``. A request may carry ``tools`` (functions with a JSON Schema
``parameters``), ``tool_choice``, ``parallel_tool_calls`` and a ``response_format``
(``text``, ``json_object``, ``json_schema``). Every schema is checked to be a valid JSON
Schema (``jsonschema``'s meta-schema check) when the request is read.

Images count for token estimates by a stated rule, never by their bytes
(``image_tokens``): ``low`` detail 85 tokens, ``high`` or ``auto`` 765 (OpenAI's figure
for a 1024x1024 image: 85 plus 170 for each of four 512-pixel tiles).

Pure: no I/O, no clock.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
from typing import Annotated, Any, Literal

import orjson
from jsonschema import SchemaError
from jsonschema.validators import validator_for
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

#: Names of tools and of response schemas (OpenAI's rule).
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
#: Longest text of one message or part, in characters.
MAX_TEXT_CHARS = 400_000
#: Longest http(s) image URL, in characters.
MAX_IMAGE_URL_CHARS = 8_192
#: Image media types a ``data:`` URL may carry.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
#: Tokens an image counts for, by its ``detail`` (see the module docstring).
IMAGE_TOKENS = {"low": 85, "high": 765, "auto": 765}
#: Largest JSON Schema (a tool's ``parameters`` or a response schema), serialized.
MAX_SCHEMA_BYTES = 64 * 1024
#: Most tools a request may carry.
MAX_TOOLS = 128

_DATA_URL = re.compile(r"^data:(?P<type>[a-z]+/[a-z0-9.+-]+);base64,(?P<data>.*)$", re.S)


def check_schema(schema: Any) -> dict[str, Any]:
    """``schema`` if it is a valid JSON Schema object (by its own ``$schema`` dialect,
    else 2020-12), else ``ValueError`` naming the first problem. The meta-schema check
    (~10 ms) is made once per distinct schema: a job's spec is read many times on its
    way, and a bulk run's jobs share one schema."""
    if not isinstance(schema, dict):
        raise ValueError("must be a JSON Schema object")
    key = schema_key(schema)
    if len(key.encode()) > MAX_SCHEMA_BYTES:
        raise ValueError(f"a schema may have at most {MAX_SCHEMA_BYTES} bytes of JSON")
    problem = _schema_problem(key)
    if problem is not None:
        raise ValueError(problem)
    return schema


def schema_key(schema: dict[str, Any]) -> str:
    """The schema's canonical JSON (sorted keys): what caches of schemas key on."""
    try:
        return orjson.dumps(schema, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # an integer past 64 bits (JSON allows it; orjson does not)
        return json.dumps(schema, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=1024)
def _schema_problem(key: str) -> str | None:
    """What is wrong with the schema (its canonical JSON), or None."""
    schema = json.loads(key)
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"not a valid JSON Schema: {exc.message}" + (f" (at {where})" if where else "")
    return None


Schema = Annotated[dict[str, Any], AfterValidator(check_schema)]


def _name(value: str) -> str:
    if not TOOL_NAME.match(value):
        raise ValueError("must be 1-64 letters, digits, '_' or '-'")
    return value


Name = Annotated[str, AfterValidator(_name)]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- content parts ------------------------------------------------------------------------

class ImageURL(_Frozen):
    """An image: an http(s) URL the provider fetches, or the image inline as a
    ``data:image/...;base64,...`` URL."""

    url: str
    detail: Literal["auto", "low", "high"] = "auto"

    @field_validator("url")
    @classmethod
    def _url_shape(cls, value: str) -> str:
        if value.startswith(("http://", "https://")):
            if len(value) > MAX_IMAGE_URL_CHARS:
                raise ValueError(f"an image URL may have at most {MAX_IMAGE_URL_CHARS} "
                                 "characters (send the image as a data: URL instead)")
            return value
        m = _DATA_URL.match(value)
        if m is None:
            raise ValueError("must be an http(s) URL or a data:image/...;base64,... URL")
        if m.group("type") not in IMAGE_TYPES:
            raise ValueError(f"image type {m.group('type')!r} is not served; use one of "
                             f"{', '.join(IMAGE_TYPES)}")
        try:
            base64.b64decode(m.group("data"), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError("the data: URL is not valid base64") from exc
        return value

    @property
    def size(self) -> int:
        """Decoded bytes of an inline (``data:``) image; 0 for an http(s) URL. Its bound
        is a setting (``max_image_bytes``), checked where a request is resolved
        (``jobs.capabilities.unserved``)."""
        if not self.url.startswith("data:"):
            return 0
        data = self.url.partition(",")[2]
        return len(data) * 3 // 4 - data[-2:].count("=")

    @property
    def digest(self) -> str:
        """A short digest of the image's URL (its bytes, for a ``data:`` URL): what cache
        keys hold instead of the image."""
        return hashlib.sha256(self.url.encode()).hexdigest()[:32]


class ContentPart(_Frozen):
    """A part of a message's content: ``{"type": "text", "text": ...}`` or
    ``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}``."""

    type: Literal["text", "image_url"]
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    image_url: ImageURL | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _served_kinds(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("text", "image_url"):
            raise ValueError(f"only 'text' and 'image_url' parts are served, not {value!r}")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> ContentPart:
        if self.type == "text":
            raise_at("ContentPart", [("text", "required in a text part")]
                     if self.text is None else [])
            raise_at("ContentPart", [("image_url", "only in an image_url part")]
                     if self.image_url is not None else [])
        else:
            raise_at("ContentPart", [("image_url", "required in an image_url part")]
                     if self.image_url is None else [])
            raise_at("ContentPart", [("text", "only in a text part")]
                     if self.text is not None else [])
        return self


def _content_kind(value: Any) -> str | None:
    """Which form a message's content takes (pydantic's discriminator: one form's errors
    only)."""
    if isinstance(value, str):
        return "str"
    return "list" if isinstance(value, list | tuple) else None


Content = Annotated[
    Annotated[str, Tag("str")] | Annotated[list[ContentPart], Tag("list")],
    Discriminator(_content_kind, custom_error_type="content_type",
                  custom_error_message="must be a string or a list of content parts")]


# --- tool calls -----------------------------------------------------------------------------

class FunctionCall(_Frozen):
    """The function a tool call names, and its arguments as a JSON string (as the model
    wrote them)."""

    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(max_length=MAX_TEXT_CHARS)


class ToolCall(_Frozen):
    """One tool call of an assistant message."""

    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


# --- messages -------------------------------------------------------------------------------

class Message(_Frozen):
    """One chat message, in OpenAI's shape.

    ``content`` is a string or a list of parts; it may be null only in an assistant
    message that carries ``tool_calls`` (or a ``refusal``). Images are served in user
    messages only. Fields an SDK sends back with an assistant message it received
    (``refusal``, ``annotations``) are accepted; ``annotations`` are not kept.
    """

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Content | None = Field(default=None)
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=128)
    refusal: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)

    @model_validator(mode="before")
    @classmethod
    def _drop_echoed(cls, data: Any) -> Any:
        """What an SDK echoes of an answer and the provider does not need back."""
        if isinstance(data, dict) and data.get("role") == "assistant":
            extra = {"annotations", "audio", "function_call"}
            if any(data.get(k) not in (None, []) for k in ("audio", "function_call")):
                return data  # refused below by name
            if extra & data.keys():
                data = {k: v for k, v in data.items() if k not in extra}
        return data

    @model_validator(mode="after")
    def _shape(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message may carry tool_calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("only a tool message may carry tool_call_id")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.content is None and not (self.role == "assistant"
                                         and (self.tool_calls or self.refusal)):
            raise ValueError("content is required (it may be null only in an assistant "
                             "message with tool_calls)")
        if self.role != "user" and self.images:
            raise ValueError("images are served in user messages only")
        return self

    @property
    def text(self) -> str:
        """The message's text: the string, or its text parts joined by newlines."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content if p.text is not None)

    @property
    def images(self) -> list[ImageURL]:
        """The message's images, in order."""
        if not isinstance(self.content, list):
            return []
        return [p.image_url for p in self.content if p.image_url is not None]

    def rendered(self) -> str:
        """The message as one line of a prompt's text (similarity, echo, estimates):
        ``role: text``, with an ``[image]`` mark per image and each tool call as
        ``name(arguments)``."""
        body = self.text
        marks = ["[image]"] * len(self.images)
        marks += [f"{c.function.name}({c.function.arguments})" for c in self.tool_calls or ()]
        if marks:
            body = " ".join([body, *marks]) if body else " ".join(marks)
        return f"{self.role}: {body}"

    def payload(self) -> dict[str, Any]:
        """The message as OpenAI's API takes it (unset fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)


def mib(size: int) -> str:
    """A size in MiB as a person writes it (5, 0.5)."""
    return f"{size / (1024 * 1024):g}"


def image_too_large(size: int, limit: int) -> str:
    """Why an inline image of ``size`` bytes is refused under the ``max_image_bytes``
    setting (``limit``), and what to do."""
    return (f"the image has {size} bytes, over the limit of {mib(limit)} MiB an inline "
            "image (max_image_bytes): send a smaller image, or the image by http(s) URL")


def image_tokens(messages: list[Message] | tuple[Message, ...] | None) -> int:
    """Tokens the images of a conversation count for (``IMAGE_TOKENS``)."""
    return sum(IMAGE_TOKENS[img.detail] for m in messages or () for img in m.images)


#: Characters a token counts for in estimates of text (the scheduler's rule).
CHARS_PER_TOKEN = 4


def extra_tokens(messages: list[Message] | tuple[Message, ...] | None,
                 tools: list[Tool] | tuple[Tool, ...] | None,
                 response_format: ResponseFormat | None) -> int:
    """Prompt tokens a request counts for beyond its text (``JobSpec.text``, where an
    image is only an ``[image]`` mark): its images by ``IMAGE_TOKENS``, never by their
    bytes, and the tools' definitions and the response schema as the JSON text a provider
    reads (``CHARS_PER_TOKEN`` characters a token)."""
    chars = len(canonical(list(tools))) if tools else 0
    if response_format is not None and response_format.json_schema is not None:
        chars += len(canonical(response_format.json_schema))
    return image_tokens(messages) + chars // CHARS_PER_TOKEN


def raise_at(title: str, errors: list[tuple[str, str]]) -> None:
    """Raise a pydantic ``ValidationError`` with each ``(dotted field, message)`` at its
    own location (a model validator's checks across fields then name the field)."""
    if not errors:
        return
    details = [InitErrorDetails(
        type=PydanticCustomError("value_error", "{message}", {"message": message}),
        loc=tuple(int(p) if p.isdigit() else p for p in field.split(".")), input=None)
        for field, message in errors]
    raise ValidationError.from_exception_data(title, details)


def check_tool_answers(messages: list[Message]) -> list[tuple[str, str]]:
    """``(field, message)`` for each tool message whose ``tool_call_id`` answers no tool
    call of an earlier assistant message."""
    seen: set[str] = set()
    errors: list[tuple[str, str]] = []
    for i, m in enumerate(messages):
        if m.role == "assistant":
            seen.update(c.id for c in m.tool_calls or ())
        elif m.role == "tool" and m.tool_call_id not in seen:
            errors.append((f"messages.{i}.tool_call_id",
                           f"{m.tool_call_id!r} answers no tool call of an earlier assistant "
                           "message"))
    return errors


# --- tools ------------------------------------------------------------------------------------

class FunctionDef(_Frozen):
    """A function the model may call: its name, what it does, its arguments' schema."""

    name: Name
    description: str | None = Field(default=None, max_length=16_384)
    parameters: Schema | None = None
    strict: bool | None = None


class Tool(_Frozen):
    """A tool of a request (functions are the only kind served)."""

    type: Literal["function"]
    function: FunctionDef

    @field_validator("type", mode="before")
    @classmethod
    def _functions_only(cls, value: Any) -> Any:
        if isinstance(value, str) and value != "function":
            raise ValueError(f"only 'function' tools are served, not {value!r}")
        return value


class NamedFunction(_Frozen):
    """The function a ``tool_choice`` forces."""

    name: Name


class NamedToolChoice(_Frozen):
    """``tool_choice`` forcing one function."""

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["auto", "none", "required"] | NamedToolChoice


# --- response formats ------------------------------------------------------------------------

class JsonSchemaFormat(BaseModel):
    """A ``json_schema`` response format: the answer is JSON that validates."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True,
                              serialize_by_alias=True)

    name: Name
    description: str | None = Field(default=None, max_length=16_384)
    #: ``schema`` in JSON (a pydantic model cannot have a field of that name).
    json_schema: Schema = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Frozen):
    """What shape the answer must have: ``text`` (any), ``json_object`` (a JSON object),
    ``json_schema`` (JSON that validates against ``json_schema.schema``)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs json_schema: {name, schema, strict}")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"json_schema is given only with type 'json_schema', not "
                             f"{self.type!r}")
        return self

    @property
    def wants_json(self) -> bool:
        """Whether the answer must be JSON (its parsed value is kept with the result)."""
        return self.type != "text"

    @property
    def answer_schema(self) -> dict[str, Any] | None:
        """The schema the answer must validate against (None: any JSON, or text)."""
        return self.json_schema.json_schema if self.json_schema is not None else None


#: Why a provider stopped: OpenAI's values.
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


def schema_format(model: type[BaseModel], *, strict: bool | None = None) -> ResponseFormat:
    """A ``json_schema`` response format asking for JSON that validates as ``model`` (a
    pydantic model class), named after it: what the SDKs make of
    ``response_format=Model``."""
    name = re.sub(r"[^a-zA-Z0-9_-]", "_", model.__name__)[:64] or "answer"
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
        name=name, schema=model.model_json_schema(), strict=strict))


def as_response_format(value: Any) -> Any:
    """``value`` as a request's ``response_format``: a pydantic model class becomes its
    ``schema_format``; anything else is left for validation."""
    if isinstance(value, type) and issubclass(value, BaseModel):
        return schema_format(value)
    return value


def canonical(value: BaseModel | list[Any] | str | None) -> str:
    """A stable JSON string of a request field (part of the compatibility and cache
    keys); '' when unset."""
    if value is None:
        return ""
    if isinstance(value, BaseModel):
        data: Any = value.model_dump(mode="json", exclude_none=True)
    elif isinstance(value, list):
        data = [v.model_dump(mode="json", exclude_none=True) if isinstance(v, BaseModel)
                else v for v in value]
    else:
        data = value
    try:
        return orjson.dumps(data, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:  # an integer past 64 bits (JSON allows it; orjson does not)
        return json.dumps(data, sort_keys=True, separators=(",", ":"))
