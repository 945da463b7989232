"""dvc.yaml deps cover what each stage imports: a change to any project module a stage can import (lazy imports
inside functions included) must make that stage out of date. Static: walks the AST, imports nothing."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from tasks.cli import RUNNERS

REPO = Path(__file__).resolve().parents[2]
PROJECT = ("tasks", "flows")


def module_file(name: str) -> Path | None:
    base = REPO / Path(*name.split("."))
    for f in (base / "__init__.py", base.with_suffix(".py")):
        if f.is_file():
            return f
    return None


def imports_of(name: str) -> set[str]:
    """Every project module that importing ``name`` can import, at module level or inside any function: each
    package on the way (its __init__ runs) and, for ``from pkg import x``, ``pkg.x`` when it is a module."""
    f = module_file(name)
    tree = ast.parse(f.read_text(), str(f))
    package = name if f.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] not in PROJECT:
                continue
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                if module_file(prefix) is not None:
                    found.add(prefix)
    return found


def closure(roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(imports_of(m) - seen)
    return seen


def stage_modules(stage: str, cmd: str) -> set[str]:
    m = re.search(r"(?:^keel|-m tasks\.cli) (\w+)", cmd)
    assert m, f"dvc.yaml stage {stage}: cmd {cmd!r} is not `keel <stage>`"
    return closure(["tasks.cli", RUNNERS[m.group(1)].module])


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO).as_posix()
    return any(rel == d.rstrip("/") or rel.startswith(d.rstrip("/") + "/") for d in deps)


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_module_a_stage_imports_is_in_its_deps(stage):
    spec = STAGES[stage]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
    missing = sorted(module_file(m).relative_to(REPO).as_posix() for m in stage_modules(stage, spec["cmd"])
                     if not covered(module_file(m), deps))
    assert not missing, f"dvc.yaml stage {stage!r} imports {missing} but does not list them in its deps"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_stage_lists_code_it_does_not_import(stage):
    spec = STAGES[stage]
    files = {module_file(m).relative_to(REPO).as_posix() for m in stage_modules(stage, spec["cmd"])}
    code = [d for d in spec.get("deps", []) if isinstance(d, str) and d.startswith(PROJECT)]
    stale = [d for d in code if not any(f == d.rstrip("/") or f.startswith(d.rstrip("/") + "/") for f in files)]
    assert not stale, f"dvc.yaml stage {stage!r} lists {stale} in its deps but never imports them"


def test_the_walker_sees_lazy_imports():
    """A negative check of the walker itself: the lazy import of the audit inside ingest's run is found."""
    assert "tasks.ingest.audit" in closure(["tasks.ingest"])
    assert "tasks.train.loop" not in closure(["tasks.ingest"])
