"""JSON from callers, parsed safely: a depth limit, no NaN or Infinity, clear reasons.

Python's ``json`` raises ``RecursionError`` (not a ``ValueError``) on a few thousand nested
arrays, and validation code that walks a parsed value recurses as deep as the value goes:
a hostile body must be refused before either happens. ``parse`` uses orjson (which stops
at 1,024 levels with a decoding error, and refuses NaN and Infinity), then measures the
depth without recursion; the standard library only parses what orjson refuses (integers
beyond 64 bits, NaN, Infinity), to say which it was. Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


class JsonRefused(ValueError):
    """Raised when a JSON text is refused: ``kind`` is ``invalid`` (not JSON, or not
    UTF-8), ``too_deep`` (nested deeper than the limit) or ``constant`` (NaN or
    Infinity, at ``field``)."""

    def __init__(self, kind: str, message: str, field: str = "(body)") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field


class _Constant:
    """A NaN or Infinity found by the standard library's parser."""


def depth(value: Any) -> int:
    """How deeply arrays and objects nest in ``value`` (a scalar is 0), without
    recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in children
                     if isinstance(child, dict | list))
    return deepest


def _find_constant(value: Any) -> str | None:
    """The path of the first NaN or Infinity in a parsed value (no recursion)."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, _Constant):
            return path or "(body)"
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k)) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(item))
    return None


def parse(raw: bytes | str, max_depth: int) -> Any:
    """The value of a JSON text; ``JsonRefused`` if it is not UTF-8 JSON, nests deeper
    than ``max_depth`` levels of arrays and objects, or holds NaN or Infinity."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "recursion" in str(exc).lower():
            raise _too_deep(max_depth) from None
        value = _parse_slowly(raw, exc, max_depth)
    if depth(value) > max_depth:
        raise _too_deep(max_depth)
    return value


def _too_deep(max_depth: int) -> JsonRefused:
    return JsonRefused("too_deep", f"the JSON nests deeper than {max_depth} levels of "
                       "arrays and objects")


def _parse_slowly(raw: bytes | str, first: Exception, max_depth: int) -> Any:
    """What orjson refused: the standard library's reason (or value, for integers beyond
    64 bits), with NaN and Infinity refused by name."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as exc:
        raise JsonRefused("invalid", f"not UTF-8: {exc.reason}") from None
    try:
        value = json.loads(text, parse_constant=lambda _: _Constant())
    except RecursionError:
        raise _too_deep(max_depth) from None
    except json.JSONDecodeError as exc:
        raise JsonRefused("invalid", f"not JSON: {exc}") from None
    except ValueError as exc:  # the standard library's own limits (digits of an integer)
        raise JsonRefused("invalid", f"not JSON: {exc or first}") from None
    where = _find_constant(value)
    if where is not None:
        raise JsonRefused("constant", "NaN and Infinity are not accepted", where)
    return value
