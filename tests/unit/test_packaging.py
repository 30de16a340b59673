"""What `pip install .` promises: every package the code imports is declared."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OURS = {"config", "jobs", "producers", "scheduler", "workers", "promptbatch"}
#: Imports that a declared dependency guarantees (FastAPI is built on Starlette).
PROVIDED_BY = {"starlette": "fastapi", "pydantic_core": "pydantic"}
#: Modules allowed to import an optional extra (they are only loaded when it is chosen).
EXTRA_USERS = {"scheduler/minilm.py": "semantic"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found - OURS - set(sys.stdlib_module_names) - {"__future__"}


def test_every_imported_package_is_a_declared_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_name(r) for r in project["dependencies"]}
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    dists = packages_distributions()
    missing: list[str] = []
    for package in sorted(OURS):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            allowed = declared | extras.get(EXTRA_USERS.get(rel, ""), set())
            for module in _imports(path):
                if PROVIDED_BY.get(module) in declared:
                    continue
                names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
                if not names & allowed:
                    missing.append(f"{rel} imports {module} ({', '.join(sorted(names))})")
    assert not missing, "not declared in pyproject.toml: " + "; ".join(missing)
