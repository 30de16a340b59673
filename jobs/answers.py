"""Whether an answer keeps the promise its job asked for, and how to ask again.

A job that asks for a ``json_object`` response format gets a JSON object; one that asks
for ``json_schema`` gets JSON that validates against the schema; every tool call names
one of the job's tools and its arguments are a JSON object that validates against the
tool's ``parameters``; ``tool_choice`` ``required`` (or a named function) gets a call
(of that function), ``none`` gets none. Validation is ``jsonschema``'s, by the schema's
own dialect (``$schema``, else 2020-12) with the format checker on (the formats whose
checkers are installed: date, date-time, time, email, ipv4, ipv6, uuid, ...). A problem
names one error, the one jsonschema ranks most relevant (``best_match``), by the field
it concerns (``content`` or ``tool_calls[i].function.arguments``), its JSON path and
jsonschema's message.

An answer that is a refusal (OpenAI's ``refusal``, no content and no tool call) is the
model's answer and is not checked: it is kept as given, with no parsed value.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

from jobs.chat import Message, ResponseFormat, Tool, ToolCall, ToolChoice, schema_key

#: The error code of a job whose answer never validated.
INVALID_OUTPUT = "invalid_output"
#: Longest message of a problem, in characters (jsonschema repeats the instance).
MAX_MESSAGE = 300


@dataclass(frozen=True, slots=True)
class Problem:
    """Why an answer does not keep the promise: the field, the JSON path inside it (``$``
    for the whole value) and what is wrong."""

    field: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.field} at {self.path}: {self.message}"


@dataclass(frozen=True, slots=True)
class Checked:
    """The outcome of a check: the parsed content (for a JSON response format) or the
    first problem."""

    parsed: Any = None
    problem: Problem | None = None

    @property
    def ok(self) -> bool:
        """Whether the answer keeps the promise."""
        return self.problem is None


def needs_check(response_format: ResponseFormat | None,
                tools: Sequence[Tool] | None) -> bool:
    """Whether answers to such a job are checked (a JSON response format, or tools)."""
    return bool(tools) or (response_format is not None and response_format.wants_json)


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> Validator:
    """A validator of the schema (built once per schema: a bulk run has one)."""
    schema = json.loads(schema_json)
    cls = validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def validate(value: Any, schema: dict[str, Any], field: str) -> Problem | None:
    """The most relevant error of ``value`` against ``schema``, or None."""
    error = best_match(_validator(schema_key(schema)).iter_errors(value))
    if error is None:
        return None
    message = error.message
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + "..."
    return Problem(field, error.json_path, message)


def parse_json(text: str | None, field: str) -> tuple[Any, Problem | None]:
    """The JSON value of ``text``, or the problem with it."""
    if text is None or not text.strip():
        return None, Problem(field, "$", "no JSON: the answer is empty")
    try:
        return orjson.loads(text), None
    except orjson.JSONDecodeError as exc:
        return None, Problem(field, "$", f"not JSON: {exc}")


def check_content(text: str | None, response_format: ResponseFormat) -> Checked:
    """The parsed content of an answer to a JSON response format, or its problem."""
    value, problem = parse_json(text, "content")
    if problem is not None:
        return Checked(problem=problem)
    schema = response_format.answer_schema
    if schema is None:  # json_object
        if not isinstance(value, dict):
            return Checked(problem=Problem("content", "$", "must be a JSON object, not "
                                          f"{type(value).__name__}"))
        return Checked(parsed=value)
    problem = validate(value, schema, "content")
    return Checked(problem=problem) if problem else Checked(parsed=value)


def check_tool_calls(calls: Sequence[ToolCall], tools: Sequence[Tool],
                     tool_choice: ToolChoice | None) -> Problem | None:
    """The first problem of an answer's tool calls, or None."""
    by_name = {t.function.name: t for t in tools}
    forced = tool_choice.function.name if not isinstance(tool_choice, str | None) else None
    if not calls:
        if tool_choice == "required" or forced:
            asked = f"a call of {forced!r}" if forced else "a tool call"
            return Problem("tool_calls", "$", f"tool_choice asks for {asked}; the answer "
                           "has none")
        return None
    if tool_choice == "none":
        return Problem("tool_calls", "$", "tool_choice 'none' allows no tool call")
    for i, call in enumerate(calls):
        name = call.function.name
        if name not in by_name:
            return Problem(f"tool_calls[{i}].function.name", "$", f"{name!r} is not one of "
                           f"the tools ({', '.join(by_name)})")
        if forced and name != forced:
            return Problem(f"tool_calls[{i}].function.name", "$", f"tool_choice asks for "
                           f"{forced!r}, not {name!r}")
        field = f"tool_calls[{i}].function.arguments"
        args, problem = parse_json(call.function.arguments, field)
        if problem is not None:
            return problem
        if not isinstance(args, dict):
            return Problem(field, "$", f"must be a JSON object, not {type(args).__name__}")
        schema = by_name[name].function.parameters
        problem = validate(args, schema, field) if schema is not None else None
        if problem is not None:
            return problem
    return None


def check_answer(text: str | None, tool_calls: Sequence[ToolCall] | None,
                 refusal: str | None, *, response_format: ResponseFormat | None,
                 tools: Sequence[Tool] | None, tool_choice: ToolChoice | None) -> Checked:
    """Check an answer against what its job asked for (see the module docstring).

    The content is checked against a JSON response format unless the answer is only
    tool calls (then the content is null) or a refusal."""
    calls = list(tool_calls or ())
    if refusal and not text and not calls:
        return Checked()
    if tools:
        problem = check_tool_calls(calls, tools, tool_choice)
        if problem is not None:
            return Checked(problem=problem)
    if response_format is None or not response_format.wants_json or (calls and not text):
        return Checked()
    return check_content(text, response_format)


def reask(messages: Sequence[Message] | None, prompt: str | None, text: str | None,
          tool_calls: Sequence[ToolCall] | None, problem: Problem) -> list[Message]:
    """The conversation that asks again: the job's own, the answer that did not validate,
    and what was wrong with it (a user message after content, a tool message answering
    each tool call), as instructor does."""
    history = (list(messages) if messages is not None
               else [Message(role="user", content=prompt or "")])
    calls = list(tool_calls or ())
    if calls:
        history.append(Message(role="assistant", content=text or None, tool_calls=calls))
        history += [Message(role="tool", tool_call_id=c.id, content=(
            f"Validation error: {problem}. Call the function again with arguments that "
            "fit its parameters." if problem.field.startswith(f"tool_calls[{i}]") else
            "Not run: another call of this answer was invalid.")) for i, c in enumerate(calls)]
        if not problem.field.startswith("tool_calls["):  # a missing call, or the content
            history.append(Message(role="user", content=f"Validation error: {problem}."))
        return history
    fix = ("Answer again with only the corrected JSON." if problem.field == "content"
           else "Answer again with the tool call asked for.")
    history.append(Message(role="assistant", content=text or ""))
    history.append(Message(role="user", content=f"Your answer does not validate: {problem}. "
                           + fix))
    return history
