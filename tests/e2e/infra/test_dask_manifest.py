"""infra/dask/daskcluster.yaml (a dask-kubernetes DaskCluster, a custom resource the Kubernetes schemas do not know):
the scheduler and worker pod specs and the scheduler Service spec it embeds validate as Kubernetes objects, run
as non-root with limits, use the keel image of the flow-run pods, and expose the port the stages connect to."""
from __future__ import annotations

import pytest
import yaml

from tests.e2e.infra.helpers import INFRA, NAMESPACE, k8s_errors, needs_schemas

MANIFEST = INFRA / "dask" / "daskcluster.yaml"


def _cluster() -> dict:
    [doc] = list(yaml.safe_load_all(MANIFEST.read_text()))
    return doc


def _embedded() -> list[dict]:
    spec = _cluster()["spec"]
    meta = {"name": "keel-dask", "namespace": NAMESPACE}
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": {**meta, "name": "keel-dask-scheduler"},
             "spec": spec["scheduler"]["spec"]},
            {"apiVersion": "v1", "kind": "Pod", "metadata": {**meta, "name": "keel-dask-worker"},
             "spec": spec["worker"]["spec"]},
            {"apiVersion": "v1", "kind": "Service", "metadata": {**meta, "name": "keel-dask-scheduler"},
             "spec": spec["scheduler"]["service"]}]


def test_the_dask_cluster_is_keels_in_its_namespace():
    doc = _cluster()
    assert (doc["apiVersion"], doc["kind"]) == ("kubernetes.dask.org/v1", "DaskCluster")
    assert doc["metadata"]["namespace"] == NAMESPACE and doc["spec"]["worker"]["replicas"] >= 1
    ports = {p["port"] for p in doc["spec"]["scheduler"]["service"]["ports"]}
    assert 8786 in ports  # tcp://keel-dask-scheduler.keel.svc.cluster.local:8786, as infra/dask/README.md says


@needs_schemas
@pytest.mark.parametrize("doc", _embedded(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_embedded_specs_validate_against_kubernetes_schemas(doc):
    errors = k8s_errors(doc, str(MANIFEST))
    assert not errors, "\n".join(errors)


def test_pods_run_as_non_root_with_limits_and_the_keel_image():
    images = set()
    for pod in _embedded()[:2]:
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, pod["metadata"]["name"]
        for c in spec["containers"]:
            assert c["resources"]["limits"]["memory"], (pod["metadata"]["name"], c["name"])
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, c["name"]
            images.add(c["image"])
    assert len(images) == 1 and next(iter(images)).split("/")[-1].startswith("keel:"), images
