"""Reading prompt files (JSONL) with errors that name the line and the field."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from jobs import jsonbody
from jobs.capabilities import unserved
from jobs.errors import InvalidJob
from jobs.models import JobRequest
from jobs.validation import parse_request

#: Keys of an input line besides the JobRequest fields.
LINE_ID = "id"
#: Deepest nesting of arrays and objects a line may have (a job needs five or so).
MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class InputLine:
    """One valid line: its number, the caller's own id (if any) and the request."""

    number: int
    custom_id: str | None
    request: JobRequest


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Non-blank lines of a file with their 1-based numbers."""
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidJob([("(line)", f"not UTF-8: {exc.reason}")], line=number) from exc
            if text.strip():
                yield number, text


def parse_line(number: int, text: str, provider: str | None = None,
               max_image_bytes: int | None = None) -> InputLine:
    """Validate one JSONL line. With ``provider`` (the one its jobs go to unless a line
    names its own), a line is also refused for what that provider cannot serve
    (``jobs.capabilities``), and with ``max_image_bytes`` (the setting) for an inline
    image over it, as a submit would refuse it."""
    try:
        data = jsonbody.parse(text, MAX_DEPTH)
    except jsonbody.JsonRefused as exc:
        raise InvalidJob([(exc.field if exc.kind == "constant" else "(line)",
                           f"not valid JSON: {exc.message}")], line=number) from exc
    if not isinstance(data, dict):
        raise InvalidJob([("(line)", "must be a JSON object")], line=number)
    custom = data.pop(LINE_ID, None)
    if custom is not None and (isinstance(custom, bool) or not isinstance(custom, str | int)):
        raise InvalidJob([(LINE_ID, "must be a string or an integer")], line=number)
    if custom is not None:  # the caller's own id: the job can be found by it
        data.setdefault("client_id", str(custom))
    request = parse_request(data, line=number)
    target = request.provider or provider
    errors = unserved(target or "", request.params, request.messages, max_image_bytes) \
        if target or max_image_bytes is not None else []
    if errors:
        raise InvalidJob(errors, line=number)
    return InputLine(number, None if custom is None else str(custom), request)


def load_file(path: Path, provider: str | None = None, max_image_bytes: int | None = None,
              ) -> tuple[list[InputLine], list[InvalidJob]]:
    """Every line of the file, validated (``parse_line``). Errors are collected, not
    raised."""
    good: list[InputLine] = []
    bad: list[InvalidJob] = []
    try:
        for number, text in read_lines(path):
            try:
                good.append(parse_line(number, text, provider, max_image_bytes))
            except InvalidJob as exc:
                bad.append(exc)
    except InvalidJob as exc:
        bad.append(exc)
    return good, bad
