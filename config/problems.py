"""What is wrong in the settings, in the words of the variables a user sets: each error
names ``PROMPTBATCH_<NAME>`` and, for a value that is not JSON, what the variable takes."""

from __future__ import annotations

import re
from typing import Any, get_origin

from pydantic import BaseModel, ValidationError

#: pydantic-settings' words for a value it could not decode as JSON (the field is named).
_NOT_JSON = re.compile(r'error parsing value for field "(\w+)"')
#: An example in a field's description: ``Example: '["errors_high"]'``.
_EXAMPLE = re.compile(r"[Ee]xample: ('[^']+')")


def settings_problem(exc: ValueError, model: type[BaseModel], prefix: str) -> str:
    """One line per problem of ``exc``, raised by building ``model`` from variables named
    ``prefix`` + field name. An error this cannot place keeps its own words."""
    if isinstance(exc, ValidationError):
        return "; ".join(_one(err, prefix) for err in exc.errors(include_url=False))
    found = _NOT_JSON.search(str(exc))
    if found is None:
        return f"{exc} ({exc.__cause__})" if exc.__cause__ else str(exc)
    name = found.group(1)
    field = model.model_fields.get(name)
    kind = {list: "a JSON list", dict: "a JSON object"}.get(
        get_origin(field.annotation) if field else None, "JSON")  # type: ignore[arg-type]
    example = _EXAMPLE.search(field.description or "") if field else None
    return (f"{(prefix + name).upper()} is not valid JSON ({exc.__cause__ or exc}): it takes "
            f"{kind}" + (f", for example {example.group(1)}" if example else ""))


def _one(err: Any, prefix: str) -> str:
    loc = list(err.get("loc") or ())
    if not loc:  # a rule across fields: its message names them
        return str(err["msg"]).removeprefix("Value error, ")
    where = ", ".join(f"item {p}" if isinstance(p, int) else str(p) for p in loc[1:])
    msg = str(err["msg"]).removeprefix("Value error, ")
    return f"{(prefix + str(loc[0])).upper()}{', ' + where if where else ''}: {msg}"
