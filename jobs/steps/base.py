"""What every role's steps share: the client, the Lua steps loaded by name, and one
round trip for a pipeline of steps."""

from __future__ import annotations

from typing import Any

import redis
from redis.exceptions import NoScriptError

from jobs import lua

#: Commands that answer for the writes sent before them on their connection: run again
#: after the scripts of their pipeline that had to be loaded first (``Steps._at_once``).
AFTER_WRITES = frozenset({"WAIT", "WAITAOF"})


class Steps:
    """The Redis client and the queue's Lua steps (``jobs/lua/``), registered once."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._enqueue = client.register_script(lua.source("enqueue"))
        self._stage = client.register_script(lua.source("stage"))
        self._publish = client.register_script(lua.source("publish"))
        self._withdraw = client.register_script(lua.source("withdraw"))
        self._claim = client.register_script(lua.source("claim"))
        self._take_to_expire = client.register_script(lua.source("take_to_expire"))
        self._running = client.register_script(lua.source("mark_running"))
        self._reassign = client.register_script(lua.source("reassign"))
        self._requeue = client.register_script(lua.source("requeue"))
        self._start_run = client.register_script(lua.source("start_run"))
        self._missing = client.register_script(lua.source("missing"))
        self._load = client.register_script(lua.source("load"))
        self._finish_many = client.register_script(lua.source("finish_many"))
        self._cache_put = client.register_script(lua.source("cache_put"))
        self._coalesce = client.register_script(lua.source("coalesce"))
        self._take_followers = client.register_script(lua.source("take_followers"))
        self._release_followers = client.register_script(lua.source("release_followers"))
        self._cancel = client.register_script(lua.source("cancel"))
        self._lease = client.register_script(lua.source("lease"))
        self._release = client.register_script(lua.source("release"))
        self._lane_claim = client.register_script(lua.source("lane_claim"))
        self._lane_return = client.register_script(lua.source("lane_return"))

    def _at_once(self, pipe: Any) -> list[Any]:
        """Run ``pipe`` (a non-transactional pipeline) in one round trip and return its
        replies (the first error is raised).

        redis-py first asks the server whether a pipeline's Lua scripts exist (a round trip
        of its own); here they run by their SHA1 straight away, and only on a server that
        lost them (a restart, a new primary after a failover) are they loaded and the
        commands they failed run again, after the others: each command runs once. A
        ``WAIT`` that followed a failed script runs again after it too: its first answer
        was about the writes before the script, which had not run (with a replica down, a
        start read as replicated at once)."""
        scripts = list(pipe.scripts)
        pipe.scripts.clear()
        commands = list(pipe.command_stack)
        replies: list[Any] = list(pipe.execute(raise_on_error=False))
        missing = [i for i, x in enumerate(replies) if isinstance(x, NoScriptError)]
        if missing:
            for script in scripts:
                script.sha = str(self.r.script_load(script.script))
            # In their order, on one connection: a WAIT answers for the writes before it.
            failed = set(missing)
            redo = [i for i in range(missing[0], len(commands)) if i in failed
                    or str(commands[i][0][0]).upper() in AFTER_WRITES]
            again = self.r.pipeline(transaction=False)
            for i in redo:
                args, options = commands[i]
                again.execute_command(*args, **options)  # type: ignore[no-untyped-call]
            for i, reply in zip(redo, again.execute(raise_on_error=False), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies
