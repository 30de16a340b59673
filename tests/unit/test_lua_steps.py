"""The Lua steps read as documented and touch only the keys they are given: every argument
in a key position of a Redis command, in a step or a helper, is an element of KEYS (or a
name bound only to one), and a helper's key parameter counts as a key inside that helper
alone."""

from __future__ import annotations

import re

import pytest

from jobs import lua

#: The start of a call: ``redis.call('CMD', ...``.
CALL = re.compile(r"redis\.call\(\s*'(?P<cmd>[A-Z]+)'")
#: Where each command the steps use takes its keys: the 1-based positions of its
#: arguments after the command's name, or "all" of them. A command missing here fails
#: the check until its key positions are written down.
KEY_ARGS: dict[str, tuple[int, ...] | str] = {
    **dict.fromkeys(["GET", "SET", "GETDEL", "INCR", "INCRBY", "DECRBY", "EXPIRE",
                     "PEXPIRE", "PERSIST", "TTL", "PTTL", "TYPE",
                     "HGET", "HSET", "HSETNX", "HDEL", "HEXISTS", "HINCRBY", "HINCRBYFLOAT",
                     "HMGET", "HGETALL", "HVALS", "HKEYS", "HLEN",
                     "SADD", "SREM", "SCARD", "SISMEMBER", "SMEMBERS",
                     "ZADD", "ZREM", "ZCARD", "ZSCORE", "ZRANGE", "ZRANGEBYSCORE",
                     "ZREMRANGEBYSCORE", "LPUSH", "RPUSH", "LPOP", "RPOP", "LRANGE", "LLEN",
                     "LREM", "XADD", "XDEL", "XLEN", "XRANGE", "XTRIM",
                     # A channel, passed in KEYS too (the result's, in finish_many).
                     "PUBLISH"], (1,)),
    **dict.fromkeys(["RENAME", "RENAMENX", "SMOVE", "RPOPLPUSH", "LMOVE", "COPY"], (1, 2)),
    **dict.fromkeys(["DEL", "UNLINK", "EXISTS", "MGET", "TOUCH"], "all"),
    "TIME": (),
}
#: Helpers (``--@include``d files) whose first parameter is a key.
KEY_HELPERS = ("intake_add", "count_delivery", "add_counts", "add_floats", "take_queued")
HELPER_CALL = re.compile(r"(?<![\w.])(?P<fn>" + "|".join(KEY_HELPERS) + r")\(")
#: ``local function NAME(first, ...``: a helper's definition and its first parameter.
HELPER_DEF = re.compile(r"\bfunction\s+(?P<fn>\w+)\s*\(\s*(?P<first>\w+)")
#: ``[local] a, b = x, y``: an assignment (not ``==``, ``~=``, ``<=``, ``>=``).
ASSIGN = re.compile(r"^[ \t]*(?:local[ \t]+)?(?P<lhs>\w+(?:[ \t]*,[ \t]*\w+)*)[ \t]*"
                    r"(?<![=~<>])=(?!=)[ \t]*(?P<rhs>.+)$", re.M)


def _args(code: str, start: int) -> list[str]:
    """The arguments of the call whose ``(`` is at ``start``, split at the commas of its
    own level (not inside parentheses, braces, brackets or strings)."""
    args: list[str] = []
    depth, quote, i, begin = 0, "", start + 1, start + 1
    while i < len(code):
        c = code[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            if depth == 0:
                args.append(code[begin:i].strip())
                return [a for a in args if a]
            depth -= 1
        elif c == "," and depth == 0:
            args.append(code[begin:i].strip())
            begin = i + 1
        i += 1
    raise AssertionError(f"unclosed call at {code[start:start + 40]!r}")


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas of its own level (an expression that goes on to the
    next lines: as one value)."""
    try:
        return _args(f"({text})", 0)
    except AssertionError:
        return [text]


def _bound_to_keys(code: str, params: frozenset[str] = frozenset()) -> tuple[set[str], list[str]]:
    """Names bound to an element of KEYS (with ``params``, a helper's key parameters),
    and the problems: a name bound to a key that is also given something else."""
    bound = set(params)
    others: dict[str, str] = {}
    for m in ASSIGN.finditer(code):
        lhs = [n.strip() for n in m.group("lhs").split(",")]
        rhs = _split_top(m.group("rhs").strip())
        for k, name in enumerate(lhs):
            value = rhs[k] if k < len(rhs) else "nil"
            if value.startswith("KEYS["):
                bound.add(name)
            else:
                others.setdefault(name, value)
    for m in re.finditer(r"for\s+\w+,\s*(\w+)\s+in\s+ipairs\(KEYS\)", code):
        bound.add(m.group(1))
    problems = [f"{name} holds a key and also {others[name]!r}" for name in sorted(bound)
                if name in others and name not in params]
    return bound, problems


def _is_key(expr: str, bound: set[str]) -> bool:
    expr = expr.strip()
    return (expr.startswith("KEYS[") and expr.endswith("]")
            and "]" not in expr[5:-1]) or expr in bound


def violations(text: str, params: frozenset[str] = frozenset()) -> list[str]:
    """Every argument in a key position that is not a key from KEYS, in Lua ``text``
    (``params``: names that are keys there, a helper's key parameters)."""
    code = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
    bound, problems = _bound_to_keys(code, params)
    for m in CALL.finditer(code):
        cmd = m.group("cmd")
        args = _args(code, code.index("(", m.start()))[1:]
        if cmd not in KEY_ARGS:
            problems.append(f"{cmd}: its key positions are not in KEY_ARGS")
            continue
        spec = KEY_ARGS[cmd]
        at = range(1, len(args) + 1) if spec == "all" else spec
        for pos in at:
            if pos <= len(args) and not _is_key(args[pos - 1], bound):
                problems.append(f"{cmd} argument {pos} ({args[pos - 1]!r}): not a key from KEYS")
    for m in HELPER_CALL.finditer(code):
        if re.search(r"function\s+$", code[max(0, m.start() - 15):m.start()]):
            continue  # the helper's definition
        args = _args(code, m.end() - 1)
        if not args or not _is_key(args[0], bound):
            problems.append(f"{m.group('fn')}({', '.join(args)}): its key is not from KEYS")
    return problems


@pytest.mark.parametrize("name", lua.steps())
def test_each_step_opens_with_what_it_does_and_its_keys_argv_and_states(name: str) -> None:
    text = lua._read(name)
    header = [line for line in text.splitlines() if line.startswith("--")]
    assert header[0].startswith(f"-- {name}: "), f"{name}.lua must open with '-- {name}: ...'"
    for part in ("-- KEYS", "-- ARGV", "-- Moves", "-- Returns"):
        assert any(line.startswith(part) for line in header), f"{name}.lua: no {part!r}"


@pytest.mark.parametrize("name", lua.steps())
def test_every_key_a_step_touches_is_passed_in_keys(name: str) -> None:
    # The step's own text: its helpers are checked on their own, below.
    assert violations(lua._read(name)) == [], name


@pytest.mark.parametrize("name", lua.helpers())
def test_every_key_a_helper_touches_is_its_key_parameter_or_from_keys(name: str) -> None:
    text = lua._read(name)
    params = frozenset(m.group("first") for m in HELPER_DEF.finditer(text)
                       if m.group("fn") in KEY_HELPERS)
    assert violations(text, params) == [], name


def test_helpers_are_included_not_concatenated() -> None:
    assert "local function intake_add" in lua.source("stage")
    assert lua.INCLUDE not in lua.source("stage")
    assert "_intake_add" not in lua.steps()
    assert "_intake_add" in lua.helpers()


@pytest.mark.parametrize("bad", [
    # A key built inside the script, first or in any other key position.
    "local job = KEYS[1]\nredis.call('DEL', 'pb:job:' .. ARGV[1])\n",
    "local job = KEYS[1]\nredis.call('DEL', job, 'pb:job:' .. ARGV[1])\n",
    "redis.call('SMOVE', KEYS[1], 'pb:other', ARGV[1])\n",
    "redis.call('RENAME', KEYS[1], ARGV[1])\n",
    # A key read from a reply, then written.
    "for _, k in ipairs(redis.call('ZRANGE', KEYS[1], 0, 9)) do redis.call('DEL', k) end\n",
    # A helper's parameter name is a key in the helper only, not in a step.
    "local key = 'pb:x:' .. ARGV[1]\nredis.call('GET', key)\n",
    "local intake = ARGV[1]\nredis.call('XADD', intake, '*', 'id', ARGV[2])\n",
    # A name bound to a key, then to something else.
    "local job = KEYS[1]\njob = 'pb:job:' .. ARGV[1]\nredis.call('DEL', job)\n",
    # A helper given a key that is not from KEYS, whatever its name.
    "local deliveries = 'pb:d'\ncount_delivery(deliveries, ARGV[1], 60, true)\n",
    # A command whose key positions nobody wrote down.
    "redis.call('SUNIONSTORE', KEYS[1], KEYS[2], 'pb:x')\n",
    # KEYS indexed by something read from KEYS itself.
    "redis.call('GET', KEYS[KEYS[1]])\n",
])
def test_the_check_sees_a_key_that_is_not_from_keys(bad: str) -> None:
    assert violations(bad), bad


@pytest.mark.parametrize("good", [
    "local job, intake = KEYS[1], KEYS[2]\nredis.call('HSET', job, 'state', ARGV[1])\n"
    "redis.call('XADD', intake, '*', 'id', ARGV[2])\n",
    "redis.call('DEL', KEYS[1], KEYS[2])\nredis.call('SMOVE', KEYS[1], KEYS[2], 'pb:member')\n",
    "for i = 1, #KEYS do\n  local job = KEYS[i]\n  redis.call('HGET', job, 'state')\nend\n",
    "local t = redis.call('TIME')\nif redis.call('GET', KEYS[1]) == ARGV[1] then end\n",
])
def test_the_check_passes_keys_from_keys_in_every_position(good: str) -> None:
    assert violations(good) == [], good
