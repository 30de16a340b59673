"""The queue's steps in Lua: one file per step in this folder, loaded by name.

Each ``NAME.lua`` opens with what the step does, its KEYS and ARGV by name, the states it
moves a job between, what it guarantees and what it returns (README, "How it works",
has the table). Files whose names start with ``_`` are helpers: a line
``--@include _NAME`` puts the helper's text in its place when the step is loaded, once,
at start-up. A caller registers ``source(NAME)`` with redis-py's ``register_script``,
which calls ``EVALSHA`` by the text's SHA1 (and loads the script on a server that does
not have it), so no call costs a round trip more.

Every key a step touches is passed in KEYS (no key is built from a string inside a
script, nor read from a reply and then written): the precondition for Redis Cluster with
hash tags. ``tests/unit/test_lua_steps.py`` checks the headers and the keys.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

INCLUDE = "--@include "


def _read(name: str) -> str:
    return (files(__name__) / f"{name}.lua").read_text(encoding="utf-8")


@cache
def source(name: str) -> str:
    """The text of the step ``name``, its helpers included."""
    out: list[str] = []
    for line in _read(name).splitlines():
        if line.startswith(INCLUDE):
            out.append(source(line[len(INCLUDE):].strip()))
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def steps() -> list[str]:
    """The names of the steps (not the helpers), sorted."""
    return sorted(p.name[:-4] for p in files(__name__).iterdir()
                  if p.name.endswith(".lua") and not p.name.startswith("_"))


def helpers() -> list[str]:
    """The names of the helpers (``_NAME``, included by the steps), sorted."""
    return sorted(p.name[:-4] for p in files(__name__).iterdir()
                  if p.name.endswith(".lua") and p.name.startswith("_"))
