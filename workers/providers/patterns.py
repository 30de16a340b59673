"""A deterministic string that a regular expression finds (JSON Schema's ``pattern``, which
``jsonschema`` checks with ``re.search``): what ``echo`` and ``simulated`` write for a
string property with a pattern (dates, codes, ids, e-mail addresses).

It walks the tree Python's own parser makes of the pattern (``re._parser``, the module
the standard library compiles with) and writes, for each node: a literal as it is; a
class (``[A-Z]``, ``[^,]``, ``\\d``, ``\\w``, ``\\s`` and their negations) as one of its
characters, plain ASCII letters, digits and punctuation first; ``.`` as a letter; a
repeat as many times as its lower bound plus a few (drawn); an alternation as one branch
(drawn); a group as its content, and a back-reference as the text its group got; anchors,
word boundaries and lookarounds as nothing. The choices are drawn from ``draw`` (the
instance's seed), so the same schema and prompt give the same string.

``minLength`` and ``maxLength`` are honoured with the pattern where the pattern allows:
repeats are stretched (or kept at their lower bound) until the length fits, and a pattern
not anchored at its end is padded after its match. The result is checked with
``re.search``; ``None`` when no string was found (a pattern beyond these constructs, or
bounds that contradict it). Pure: no I/O, no clock.
"""

from __future__ import annotations

import importlib
import re
import string
from collections.abc import Callable
from typing import Any

#: Python's regular expression parser (no stubs for it: typed as Any here).
_parser: Any = importlib.import_module("re._parser")
_MAXREPEAT: int = importlib.import_module("re._constants").MAXREPEAT

#: Characters a class is written with when it holds any of them, in this order.
PREFERRED = string.ascii_lowercase + string.ascii_uppercase + string.digits + " _-.:/@+,"
#: Characters each category holds (for writing) and its test (for negations).
_CATEGORIES: dict[str, tuple[str, Callable[[str], bool]]] = {
    "CATEGORY_DIGIT": (string.digits, lambda c: c.isdigit()),
    "CATEGORY_WORD": (string.ascii_letters + string.digits + "_",
                      lambda c: c.isalnum() or c == "_"),
    "CATEGORY_SPACE": (" ", lambda c: c.isspace()),
}
#: Most extra times a repeat is drawn to run beyond its lower bound.
EXTRA = 3
#: Longest string written (a pattern asking for more gets None).
MAX_CHARS = 100_000
#: Draws: (a label, how many options) -> the option taken.
Draw = Callable[[str, int], int]


class _Writer:
    """One string for a parsed pattern. Each choice is drawn under a label naming its
    place in the tree (and the repeat's round), so that the same place makes the same
    choice whatever the repeats around it do. ``budget`` None: each repeat runs its
    lower bound plus a drawn few; else repeats run their lower bound and share
    ``budget`` extra rounds, the first ones first (the string then grows with the
    budget, which ``matching`` searches for a length)."""

    def __init__(self, draw: Draw, budget: int | None) -> None:
        self.draw = draw
        self.budget = budget
        self.size = 0
        self.groups: dict[int, str] = {}

    def seq(self, items: Any, path: str) -> str:
        return "".join(self.node(str(op), arg, f"{path}.{i}")
                       for i, (op, arg) in enumerate(items))

    def node(self, op: str, arg: Any, path: str) -> str:
        if op in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = arg
            return "".join(self.seq(sub, f"{path}*{k}")
                           for k in range(self.times(low, high, path)))
        if op == "BRANCH":
            branches = arg[1]
            return self.seq(branches[self.draw(path, len(branches))], path)
        if op == "SUBPATTERN":
            group, _, _, sub = arg
            text = self.seq(sub, path)
            if group is not None:
                self.groups[group] = text
            return text
        if op == "ATOMIC_GROUP":
            return self.seq(arg, path)
        if op == "GROUPREF_EXISTS":  # (?(1)yes|no): the branch its group decides
            group, yes, no = arg
            return self.seq(yes if group in self.groups else (no or []), path)
        text = self.leaf(op, arg, path)
        self.size += len(text)
        if self.size > MAX_CHARS:
            raise OverflowError
        return text

    def leaf(self, op: str, arg: Any, path: str) -> str:
        if op == "LITERAL":
            return chr(arg)
        if op in ("IN", "NOT_LITERAL", "ANY"):
            return self.char(op, arg, path)
        if op == "GROUPREF":
            return self.groups.get(arg, "")
        return ""  # AT (anchors, boundaries), ASSERT, ASSERT_NOT: no text of their own

    def times(self, low: int, high: int, path: str) -> int:
        top = MAX_CHARS if high == _MAXREPEAT else high
        if self.budget is None:
            return low + self.draw(f"{path}#n", min(EXTRA, top - low) + 1)
        extra = min(self.budget, top - low)
        self.budget -= extra
        return low + extra

    def char(self, op: str, arg: Any, path: str) -> str:
        if op == "ANY":
            return PREFERRED[self.draw(path, 26)]
        if op == "NOT_LITERAL":
            options = [c for c in PREFERRED if c.isalnum() and ord(c) != arg]
            return options[self.draw(path, len(options))]
        items = [(str(o), a) for o, a in arg]
        negate = any(o == "NEGATE" for o, _ in items)
        options = [c for c in PREFERRED if _holds(items, c) != negate]
        if negate:  # letters and digits where the class allows them
            options = [c for c in options if c.isalnum()] or options
        elif not options:
            options = _members(items)
        if not options:
            raise LookupError("a class with no character to write")
        return options[self.draw(path, len(options))]


def _holds(items: list[tuple[str, Any]], c: str) -> bool:
    """Whether the class's items (without its negation) hold ``c``."""
    for op, arg in items:
        if op == "LITERAL" and ord(c) == arg:
            return True
        if op == "RANGE" and arg[0] <= ord(c) <= arg[1]:
            return True
        if op == "CATEGORY":
            name = str(arg)
            base = name.replace("_NOT", "")
            if base in _CATEGORIES and _CATEGORIES[base][1](c) != (name != base):
                return True
    return False


def _members(items: list[tuple[str, Any]]) -> list[str]:
    """Characters of a class beyond ``PREFERRED`` (a range of other letters)."""
    out: list[str] = []
    for op, arg in items:
        if op == "LITERAL":
            out.append(chr(arg))
        elif op == "RANGE":
            out += [chr(k) for k in range(arg[0], min(arg[1], arg[0] + 25) + 1)]
        elif op == "CATEGORY" and str(arg) in _CATEGORIES:
            out += list(_CATEGORIES[str(arg)][0])
    return out


def _end_anchored(tree: Any) -> bool:
    """Whether the pattern's last node is an end anchor (``$``, ``\\Z``)."""
    items = list(tree)
    return bool(items) and str(items[-1][0]) == "AT" and "END" in str(items[-1][1])


#: Sets of choices tried before a pattern is given up on (a length bound may be met by
#: some choices of an alternation and not others: ``^(q|rs){1,3}$`` in 5 characters).
ATTEMPTS = 16


def matching(pattern: str, draw: Draw, least: int = 0, most: int | None = None,
             ) -> str | None:
    """A string ``re.search(pattern, ...)`` finds, of ``least`` to ``most`` characters,
    its choices drawn from ``draw``; None when none was found (see the module
    docstring)."""
    most = MAX_CHARS if most is None else most
    try:
        compiled = re.compile(pattern)
        tree = _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return None
    pad = not _end_anchored(tree)

    def fits(text: str | None) -> bool:
        return text is not None and least <= len(text) <= most \
            and compiled.search(text) is not None

    for attempt in range(ATTEMPTS):  # other choices when one set of them misses the bounds
        again = draw if attempt == 0 else _salted(draw, attempt)
        drawn = _write(tree, again, None)
        if fits(drawn):
            return drawn
        text = _shortest_at_least(tree, again, least)
        if text is not None and pad and len(text) < least:
            text += "x" * (least - len(text))  # after the match: it is still found
        if fits(text):
            return text
    return None


def _salted(draw: Draw, salt: int) -> Draw:
    """``draw`` under other labels: another set of choices."""
    return lambda label, n: draw(f"{label}~{salt}", n)


def _write(tree: Any, draw: Draw, budget: int | None) -> str | None:
    try:
        return _Writer(draw, budget).seq(tree, "")
    except (OverflowError, LookupError, RecursionError):
        return None


def _shortest_at_least(tree: Any, draw: Draw, least: int) -> str | None:
    """The string of the smallest budget that has at least ``least`` characters, else of
    the largest budget tried (lengths grow with the budget: a search by halves)."""
    low = _write(tree, draw, 0)
    if low is None or len(low) >= least:
        return low
    lo, hi, best = 0, 1, low
    while True:  # double until long enough
        text = _write(tree, draw, hi)
        if text is None or len(text) == len(best):
            return best  # no repeat left to grow: as long as it gets
        if len(text) >= least:
            break
        lo, best = hi, text
        hi *= 2
    found = text
    while hi - lo > 1:
        mid = (lo + hi) // 2
        text = _write(tree, draw, mid)
        if text is not None and len(text) >= least:
            hi, found = mid, text
        else:
            lo = mid
    return found
