"""The Lua steps read as documented and touch only the keys they are given."""

from __future__ import annotations

import re

import pytest

from jobs import lua

#: redis.call('CMD', FIRST, ...): the command and its first argument.
CALL = re.compile(r"redis\.call\('(?P<cmd>[A-Z]+)'(?:,\s*(?P<first>[^,)]+))?")
#: Helpers whose first parameter is a key, and their calls.
HELPERS = re.compile(r"\b(?P<fn>intake_add|count_delivery|add_counts|take_queued)"
                     r"\((?P<first>[^,)]+)")
#: Commands that take no key.
KEYLESS = {"TIME"}
#: Names of the helpers' own key parameters.
HELPER_PARAMS = {"intake", "deliveries", "key"}


def _bound_to_keys(text: str) -> set[str]:
    """Names the script binds to an element of KEYS."""
    names: set[str] = set()
    for m in re.finditer(r"^[ \t]*(?:local[ \t]+)?([\w \t,]+?)[ \t]*=[ \t]*(KEYS\[.*)$", text,
                         re.M):
        lhs = [n.strip() for n in m.group(1).split(",")]
        rhs = [r.strip() for r in m.group(2).split("], ")]
        if len(lhs) == len(rhs) and all(r.startswith("KEYS[") for r in rhs):
            names.update(lhs)
    for m in re.finditer(r"for\s+\w+,\s*(\w+)\s+in\s+ipairs\(KEYS\)", text):
        names.add(m.group(1))
    return names


def _is_key(expr: str, bound: set[str]) -> bool:
    expr = expr.strip()
    return expr.startswith("KEYS[") or expr in bound


@pytest.mark.parametrize("name", lua.steps())
def test_each_step_opens_with_what_it_does_and_its_keys_argv_and_states(name: str) -> None:
    text = lua._read(name)
    header = [line for line in text.splitlines() if line.startswith("--")]
    assert header[0].startswith(f"-- {name}: "), f"{name}.lua must open with '-- {name}: ...'"
    for part in ("-- KEYS", "-- ARGV", "-- Moves", "-- Returns"):
        assert any(line.startswith(part) for line in header), f"{name}.lua: no {part!r}"


@pytest.mark.parametrize("name", lua.steps())
def test_every_key_a_step_touches_is_passed_in_keys(name: str) -> None:
    text = lua.source(name)
    bound = _bound_to_keys(text) | HELPER_PARAMS
    code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
    for m in CALL.finditer(code):
        if m.group("cmd") in KEYLESS:
            continue
        first = m.group("first") or ""
        assert _is_key(first, bound), f"{name}.lua: {m.group(0)}: not a key from KEYS"
    for m in HELPERS.finditer(code):
        if "function" in code[max(0, m.start() - 15):m.start()]:
            continue  # the helper's definition
        assert _is_key(m.group("first"), bound), f"{name}.lua: {m.group(0)}"


def test_helpers_are_included_not_concatenated() -> None:
    assert "local function intake_add" in lua.source("stage")
    assert lua.INCLUDE not in lua.source("stage")
    assert "_intake_add" not in lua.steps()


def test_the_check_sees_a_key_built_inside_a_script() -> None:
    bad = "local job = KEYS[1]\nredis.call('DEL', 'pb:job:' .. ARGV[1])\n"
    code = bad
    m = next(CALL.finditer(code))
    assert not _is_key(m.group("first"), _bound_to_keys(code))
    read = "for _, k in ipairs(redis.call('ZRANGE', KEYS[1], 0, 9)) do redis.call('DEL', k) end"
    calls = list(CALL.finditer(read))
    assert _is_key(calls[0].group("first"), _bound_to_keys(read))
    assert not _is_key(calls[1].group("first"), _bound_to_keys(read))
