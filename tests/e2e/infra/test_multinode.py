"""Multi-node training on the cluster: the Indexed Job (infra/k8s/train/multinode-job.yaml) and the join Job of a
multi-node flow run (infra/k8s/train/join-train-job.yaml), checked against each other and prefect.yaml, and each
one's own launch script run as two 'nodes' on loopback with the real torchrun."""
from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.e2e.infra.helpers import (
    IMAGE_ROOT,
    NAMESPACE,
    WORKSPACE,
    _assert_workspace_mount,
    _beside_python,
    _flow_env,
    _flow_run_pod,
    by_kind,
    env_of,
    image_root,
    prefect_deployments,
)


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
