"""The cluster workspace (flows.workspace): a DVC project made from the image's files by the deployment's own pull
steps, kept across pods and image updates; errors that name the path; lineage without git."""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from tests.e2e.infra.helpers import (
    IMAGE_ROOT,
    WORKSPACE,
    _flow_env,
    _run,
    image_root,
    prefect_deployments,
)


def _run_pull_steps(steps: list[dict]) -> None:
    """A deployment's pull steps, each called as Prefect's runner calls it (the step function with its inputs; the
    templating and event reporting around it are left out: these steps have no placeholders)."""
    import asyncio
    import inspect

    from prefect.utilities.importtools import import_object

    for step in steps:
        (fqn, inputs), = step.items()
        out = import_object(fqn)(**{k: v for k, v in inputs.items() if k not in ("id", "requires")})
        if inspect.isawaitable(out):
            asyncio.run(out)


def _tree_hashes(root: Path) -> dict[str, str]:
    import hashlib

    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_workspace_from_the_image_is_a_dvc_project_that_keeps_its_state(tmp_path, monkeypatch):
    """The cluster deployment's own pull steps (prefect.yaml) turn an empty volume into a DVC project from the image's
    files; real DVC runs there without git; a second init keeps dvc.lock and the data and updates the code."""
    from flows.workspace import init_workspace

    image, ws = image_root(tmp_path / "image"), tmp_path / "volume" / "workspace"
    assert not (image / ".git").exists() and (image / ".dvc/config").is_file() and (image / ".dvcignore").is_file()
    if not (image / "dvc.lock").exists():  # keel commits none; a user's image carries the dvc.lock they committed
        (image / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    steps = prefect_deployments()["keel-gpu-nightly"]["pull"]
    steps = json.loads(json.dumps(steps).replace(IMAGE_ROOT, str(image)).replace(WORKSPACE, str(ws)))
    env = _flow_env(PYTHONPATH=str(ws))
    monkeypatch.setenv("PATH", env["PATH"])           # the image's PATH has its venv first
    monkeypatch.chdir(tmp_path)                       # set_working_directory chdirs; monkeypatch restores
    _run_pull_steps(steps)
    assert Path.cwd() == ws.resolve()
    assert (ws / "dvc.lock").read_bytes() == (image / "dvc.lock").read_bytes()  # seeded: the volume had none
    assert "no_scm = true" in (ws / ".dvc/config.local").read_text()
    assert "no_scm" not in (ws / ".dvc/config").read_text()  # the committed config stays as it is
    assert _tree_hashes(ws / "tasks") == _tree_hashes(image / "tasks")

    def dvc(*args, check=True):
        r = _run([sys.executable, "-m", "dvc", *args], cwd=ws, env=env, timeout=300)
        assert not check or r.returncode == 0, f"dvc {args}: {r.stdout}\n{r.stderr}"
        return r

    assert "ingest" in json.loads(dvc("status", "--json").stdout)   # a DVC project without git; nothing run yet
    r = dvc("repro", "ingest")
    assert "Running stage 'ingest'" in r.stdout and "found 1797 = ingested 1797" in r.stdout + r.stderr
    lock, data = (ws / "dvc.lock").read_bytes(), _tree_hashes(ws / "data")
    assert b"ingest" in lock and data and lock != (image / "dvc.lock").read_bytes()

    # the next pod, same image: nothing to do, so a no-op run skips the stage
    lines = init_workspace(image, ws, echo=None)
    assert "kept dvc.lock (the workspace's record of what each stage ran on)" in lines
    assert re.search(r"^synced tasks/: 0 written, 0 removed, \d+ unchanged$", "\n".join(lines), re.MULTILINE)
    assert json.loads(dvc("status", "ingest", "--json").stdout) == {}

    # a new image: one module changed, one added; a file the image no longer has is removed from the workspace
    (image / "tasks/ingest/__init__.py").write_text((image / "tasks/ingest/__init__.py").read_text() + "\n# changed\n")
    (image / "tasks/new_helper.py").write_text("X = 1\n")
    (ws / "tasks/stale_module.py").write_text("raise ImportError\n")
    (ws / "params.yaml").write_text((ws / "params.yaml").read_text() + "\n# a run's override\n")
    lines = init_workspace(image, ws, echo=None)
    assert "synced tasks/: 2 written, 1 removed" in "\n".join(lines), lines
    assert "updated params.yaml" in lines and "unchanged dvc.yaml" in lines
    assert _tree_hashes(ws / "tasks") == _tree_hashes(image / "tasks")
    assert (ws / "params.yaml").read_bytes() == (image / "params.yaml").read_bytes()   # the image's recipe
    assert (ws / "dvc.lock").read_bytes() == lock and _tree_hashes(ws / "data") == data  # state kept
    status = json.loads(dvc("status", "ingest", "--json").stdout)
    assert "tasks/ingest" in json.dumps(status["ingest"]), status  # DVC sees the new code


def test_workspace_errors_name_the_path(tmp_path, capsys):
    from flows.workspace import WorkspaceError, init_workspace, main

    image = tmp_path / "image"
    image.mkdir()
    for rel in ("dvc.yaml", "params.yaml", "pyproject.toml", "requirements.lock", ".dvcignore", ".dvc/config"):
        (image / rel).parent.mkdir(parents=True, exist_ok=True)
        (image / rel).write_text("x\n")
    (image / "tasks").mkdir()
    with pytest.raises(WorkspaceError, match=rf"^source {re.escape(str(image))}: flows missing: not a keel project"):
        init_workspace(image, tmp_path / "ws", echo=None)
    (image / "flows").mkdir()
    missing = tmp_path / "nope"
    assert main(["--source", str(missing), "--workspace", str(tmp_path / "ws")]) == 1
    assert f"keel workspace: error: source {missing}: no such directory" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    with pytest.raises(WorkspaceError, match=rf"^workspace {re.escape(str(a_file))}: exists and is not a directory"):
        init_workspace(image, a_file, echo=None)
    with pytest.raises(WorkspaceError, match="overlap"):
        init_workspace(image, image / "ws", echo=None)
    ws = tmp_path / "ws"
    (ws / "tasks").parent.mkdir()
    (ws / "tasks").write_text("")
    with pytest.raises(WorkspaceError, match=rf"^{re.escape(str(ws / 'tasks'))}: exists and is not a directory"):
        init_workspace(image, ws, echo=None)
    (ws / "tasks").unlink()
    (ws / ".dvc/config.local").write_text("[core\nno_scm = \n")
    with pytest.raises(WorkspaceError, match=rf"^{re.escape(str(ws / '.dvc/config.local'))}: not a readable DVC "):
        init_workspace(image, ws, echo=None)
    (ws / ".dvc/config.local").unlink()
    (ws / ".git").mkdir()   # a workspace that is a git checkout: DVC uses git there, no_scm is not set
    lines = init_workspace(image, ws, echo=None)
    assert lines[-1].endswith("is a git repository: core.no_scm not set") and not (ws / ".dvc/config.local").exists()
    assert lines[-2] == "no dvc.lock in the image or the workspace: dvc repro will write one"


@pytest.mark.parametrize("built", ["0123456789abcdef0123456789abcdef01234567", "unknown", ""])
def test_lineage_without_git_records_the_image_builds_sha(tmp_path, monkeypatch, built):
    from tasks.core import lineage

    monkeypatch.delenv("GIT_DIR", raising=False)
    monkeypatch.setenv("KEEL_GIT_SHA", built)
    state = lineage.git_state(tmp_path)   # no repository here, as in the image
    if built and built != "unknown":
        assert state == {"git_sha": built, "git_dirty": None, "git_sha_source": "KEEL_GIT_SHA (image build)"}
    else:
        assert state == {"git_sha": "unknown", "git_dirty": None}
    # in a repository, git decides, as before (the variable is ignored)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    (tmp_path / "a.txt").write_text("a")
    for cmd in (["git", "init", "-q"], ["git", "add", "a.txt"], ["git", "commit", "-qm", "x"]):
        assert _run(cmd, cwd=tmp_path, env=env).returncode == 0
    head = _run(["git", "rev-parse", "HEAD"], cwd=tmp_path).stdout.strip()
    assert lineage.git_state(tmp_path) == {"git_sha": head, "git_dirty": False}
