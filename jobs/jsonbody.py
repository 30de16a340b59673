"""JSON from callers, parsed safely: a depth limit, no NaN or Infinity, clear reasons.

Python's ``json`` raises ``RecursionError`` (not a ``ValueError``) on a few thousand nested
arrays, and validation code that walks a parsed value recurses as deep as the value goes:
a hostile body must be refused before either happens. ``parse`` uses orjson (which stops
at 1,024 levels with a decoding error, and refuses NaN and Infinity), then measures the
depth without recursion; the standard library only parses what orjson refuses (integers
beyond 64 bits, numbers beyond a double's range, NaN, Infinity), to say which it was and
where. No number outside what orjson reads (an integer of 64 bits, a finite double)
comes out: nothing downstream converts an unbounded integer. Pure: no I/O.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

#: The integers a JSON text may hold (what orjson reads: signed and unsigned 64 bits).
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
#: Digits an integer literal may have before it is not even converted.
_MAX_DIGITS = 20


class JsonRefused(ValueError):
    """Raised when a JSON text is refused: ``kind`` is ``invalid`` (not JSON, or not
    UTF-8), ``too_deep`` (nested deeper than the limit), ``constant`` (NaN or Infinity)
    or ``number`` (a number out of range), the last two at ``field``."""

    def __init__(self, kind: str, message: str, field: str = "(body)") -> None:
        super().__init__(message if field == "(body)" else f"{field}: {message}")
        self.kind = kind
        self.message = message
        self.field = field


class _Constant:
    """A NaN or Infinity found by the standard library's parser."""


class _OutOfRange:
    """A number beyond what the API reads (an integer past 64 bits, a float past a
    double's range), found by the standard library's parser."""


def _integer(text: str) -> int | _OutOfRange:
    """An integer literal, converted only when it has few enough digits to be in range."""
    if len(text.lstrip("-")) > _MAX_DIGITS:
        return _OutOfRange()
    value = int(text)
    return value if INT_MIN <= value <= INT_MAX else _OutOfRange()


def _real(text: str) -> float | _OutOfRange:
    """A number literal with a fraction or an exponent; out of range past a double's."""
    value = float(text)
    return value if math.isfinite(value) else _OutOfRange()


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


def _find_marker(value: Any) -> tuple[str, object] | None:
    """The path of the first NaN, Infinity or number out of range in a parsed value, and
    its marker (no recursion)."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, _Constant | _OutOfRange):
            return path or "(body)", item
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
        value = json.loads(text, parse_constant=lambda _: _Constant(), parse_int=_integer,
                           parse_float=_real)
    except RecursionError:
        raise _too_deep(max_depth) from None
    except json.JSONDecodeError as exc:
        raise JsonRefused("invalid", f"not JSON: {exc}") from None
    except ValueError as exc:  # the standard library's own limits (digits of an integer)
        raise JsonRefused("invalid", f"not JSON: {exc or first}") from None
    found = _find_marker(value)
    if found is not None:
        where, marker = found
        if isinstance(marker, _Constant):
            raise JsonRefused("constant", "NaN and Infinity are not accepted", where)
        raise JsonRefused("number", "a number out of range (integers must fit in 64 bits, "
                          "other numbers in a double)", where)
    return value
