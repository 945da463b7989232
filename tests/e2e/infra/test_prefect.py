"""Prefect on the cluster: the prefect.yaml cluster deployments (pull steps into the workspace, job variables) and the
keel-gpu work pool's base job template (infra/prefect/k8s-base-job-template.json): Prefect's format, GPUs, /dev/shm
and secrets, variable validation, and the rendered flow-run Job against the Kubernetes schemas."""
from __future__ import annotations

import json
import uuid

import pytest

from tests.e2e.infra.helpers import (
    IMAGE_ROOT,
    TEMPLATE,
    WORKSPACE,
    _assert_workspace_mount,
    _flow_run_pod,
    _render_template,
    env_of,
    k8s_errors,
    needs_schemas,
    prefect_deployments,
    walk,
)


def test_cluster_deployments_run_in_the_workspace():
    deps = prefect_deployments()
    template = json.loads(TEMPLATE.read_text())
    from prefect.utilities.schema_tools import validate

    entrypoints = {"keel-gpu-nightly": "flows/pipeline.py:pipeline", "keel-gpu-multinode": "flows/pipeline.py:pipeline",
                   "keel-gpu-sweep": "flows/sweep.py:sweep", "keel-gpu-sweep-trial": "flows/sweep_trial.py:sweep_trial"}
    for name, entrypoint in entrypoints.items():
        dep = deps[name]
        assert dep["work_pool"]["name"] == "keel-gpu" and dep["entrypoint"] == entrypoint
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
    # a sweep's trials: their own queue (the driver holds a slot of `default`, which allows one run at a time)
    assert deps["keel-gpu-sweep-trial"]["work_pool"]["work_queue_name"] == "sweep-trials"
    assert deps["keel-gpu-sweep"]["work_pool"]["work_queue_name"] == "default"
    assert deps["keel-gpu-sweep"]["parameters"]["trials_on"] == "keel-sweep-trial/keel-gpu-sweep-trial"


# the variables of prefect-kubernetes' default template (0.8.0, `KubernetesWorker.get_default_base_job_template()`)
PREFECT_K8S_DEFAULT_VARIABLES = {
    "name", "env", "labels", "command", "annotations", "namespace", "image", "service_account_name",
    "image_pull_policy", "backoff_limit", "finished_job_ttl", "job_watch_timeout_seconds",
    "pod_watch_timeout_seconds", "stream_output", "cluster_config", "cpu_request", "cpu_limit", "memory_request",
    "memory_limit"}
PREFECT_K8S_JOB_CONFIGURATION = {
    "command", "env", "labels", "name", "annotations", "namespace", "job_manifest", "cluster_config",
    "job_watch_timeout_seconds", "pod_watch_timeout_seconds", "stream_output"}


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
                                      for n in ("keel-gpu-nightly", "keel-gpu-multinode", "keel-gpu-sweep",
                                                "keel-gpu-sweep-trial"))],
                         ids=["defaults", "cpu-only", "eight-gpus", "keel-gpu-nightly", "keel-gpu-multinode",
                              "keel-gpu-sweep", "keel-gpu-sweep-trial"])
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
