"""dvc.yaml deps cover what each stage imports: a change to any project module a stage can import (lazy imports
inside functions included) must make that stage out of date. Static: walks the AST, imports nothing."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tasks.cli import RUNNERS
from tests.contracts.imports import PROJECT, REPO, closure, module_file


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
