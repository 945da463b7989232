"""Who may import whom (docs/architecture.md): core knows no stage; model knows only core; stages know core, model
and serving, never each other; flows reach tasks only through tasks.core and the `keel` CLI. Static, lazy
imports included."""
from __future__ import annotations

import pytest

from tests.contracts.imports import REPO, imports_of

STAGES = ("tasks.ingest", "tasks.split", "tasks.validate", "tasks.shard", "tasks.train", "tasks.evaluate",
          "tasks.register")
# (importer prefix, allowed import prefixes)
RULES = [
    ("tasks.core", ("tasks.core",)),
    ("tasks.model", ("tasks.core", "tasks.model")),
    ("tasks.serving", ("tasks.core", "tasks.model", "tasks.serving")),
    *[(s, ("tasks.core", "tasks.model", "tasks.serving", s)) for s in STAGES],
    ("flows", ("flows", "tasks.core")),
]
# the one deliberate exception: `keel train` with train.preflight: true runs the checklist first
EXCEPTIONS = {("tasks.train.entry", "tasks.discipline.preflight")}


def modules() -> list[str]:
    out = []
    for f in sorted([*REPO.glob("tasks/**/*.py"), *REPO.glob("flows/**/*.py")]):
        parts = list(f.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append(".".join(parts))
    return out


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(name: str) -> list[str]:
    rule = next((allowed for who, allowed in RULES if within(name, who)), None)
    if rule is None:  # tasks.cli and tasks.discipline sit on top: they may import any layer
        return []
    return sorted(m for m in imports_of(name) if m not in ("tasks",) and not any(within(m, a) for a in rule)
                  and not any(within(name, a) and (within(m, b) or within(b, m)) for a, b in EXCEPTIONS))


@pytest.mark.parametrize("name", modules())
def test_module_imports_only_its_layers(name):
    bad = violations(name)
    assert not bad, f"{name} imports {bad}, which its layer may not (see docs/architecture.md)"


def test_the_rule_catches_a_stage_importing_another(tmp_path, monkeypatch):
    """The checker itself can fail: a stage that imports another stage is reported."""
    import tests.contracts.imports as walker

    monkeypatch.setattr(walker, "REPO", tmp_path)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("")
    (tmp_path / "tasks" / "split.py").write_text("def run():\n    from tasks import shard\n")
    (tmp_path / "tasks" / "shard.py").write_text("")
    assert violations("tasks.split") == ["tasks.shard"]
