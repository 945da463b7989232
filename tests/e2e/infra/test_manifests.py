"""infra/k8s: every manifest parses, is in namespace keel and validates against the Kubernetes schemas; references
resolve; Services select their pods; pods run as non-root with limits; the worker's RBAC; the servers' databases,
S3 and images."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.e2e.infra.helpers import (
    INFRA,
    K8S,
    NAMESPACE,
    ROOT,
    TEMPLATE,
    _flow_run_pod,
    _lock,
    _render_template,
    all_objects,
    by_kind,
    documents,
    env_of,
    k8s_errors,
    manifest_files,
    needs_schemas,
    pod_templates,
    walk,
)

# ConfigMaps the README creates from files (kubectl create configmap --from-file), not from a manifest
CONFIGMAPS_FROM_FILES = {"keel-base-job-template": {"baseJobTemplate.json"}}


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
