"""A failed experiment leaves the workspace as it was (issue 16), in the form docs/contracts.md documents: an
experiment run outside the workspace (``dvc exp run --temp``, as ``--queue`` experiments are) that fails at
training leaves params.yaml, dvc.lock, models/, metrics/ and reports/train/ byte for byte as they were, git
clean, and DVC agreeing that train is up to date. Real DVC on digits, one epoch, one torch thread.

(Why not a workspace ``dvc exp run train -S ...``: DVC writes the -S values into params.yaml and removes the
stage's outputs before it runs the command, and has no rollback: after a failure params.yaml stays edited and
models/, metrics/train.json and reports/train/ are gone until ``git checkout params.yaml && dvc checkout``.)
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from tests.e2e.test_pipeline import clone_repo, sh

pytestmark = pytest.mark.slow

SHORT = {"ingest": {"workers": 1}, "shard": {"workers": 1}, "train": {"epochs": 1}}
ENV = {"OMP_NUM_THREADS": "1"}
WATCHED = ("params.yaml", "dvc.lock", "models", "metrics", "reports/train")


def _snapshot(root: Path) -> dict[str, str]:
    files = [p for rel in WATCHED for p in ((root / rel).rglob("*") if (root / rel).is_dir() else [root / rel])]
    snap = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}
    snap["git status"] = sh(["git", "status", "--porcelain"], root).stdout
    snap["HEAD"] = sh(["git", "rev-parse", "HEAD"], root).stdout.strip()
    return snap


def test_a_failed_temp_experiment_leaves_the_workspace_as_it_was(tmp_path):
    root = clone_repo(tmp_path / "keel")
    (root / "dvc.lock").unlink(missing_ok=True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in SHORT.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(["dvc", "repro", "train"], root, env=ENV)  # the baseline: a trained model, committed
    sh("git add -A && git commit -qm baseline", root)
    before = _snapshot(root)
    assert {"models/best.pt", "models/last.pt", "metrics/train.json"} <= set(before) and not before["git status"]

    # an experiment that fails at runtime, in training (the name is valid YAML and a valid param; timm refuses it)
    r = sh(["dvc", "exp", "run", "--temp", "train", "-S", "train.model=no_such_net"], root, check=False, env=ENV)
    assert r.returncode != 0
    assert "keel train: error: train.model: unknown timm model 'no_such_net'" in r.stdout + r.stderr, r.stderr[-3000:]

    assert _snapshot(root) == before  # params.yaml, dvc.lock, models/, metrics/, reports/train/, git: as they were
    assert json.loads(sh(["dvc", "status", "train", "--json"], root).stdout or "{}") == {}
