"""End to end against real services: `dvc repro` in a fresh clone, tracking to a real `mlflow server`; the
registered `@champion` is served by `mlflow models serve` and answers raw test images over HTTP exactly as the
evaluate stage scored them; malformed input gets a 4xx with the reason."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.e2e.test_pipeline import clone_repo, sh
from tests.support.mlflow_server import QUIET_ENV, free_port, mlflow_command, mlflow_server, stop
from tests.support.procs import http_ok, log_tail

MODEL = "keel-classifier"


def _post(url: str, payload: dict) -> tuple[int, dict]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with opener.open(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"raw": body}


def _images(raw_dir: Path, ids: list[str]) -> dict[str, bytes]:
    from tasks.core.io import iter_raw_batches

    want, out = set(ids), {}
    for rb in iter_raw_batches(raw_dir, columns=["id", "image"]):
        for i, b in zip(rb.column("id").to_pylist(), rb.column("image").to_pylist(), strict=True):
            if i in want:
                out[i] = b
    return out


@contextlib.contextmanager
def served(model_uri: str, tracking_uri: str, workdir: Path, timeout: float = 180.0):
    port = free_port()
    log = workdir / "serve.log"
    # mlflow starts `uvicorn` through bash: the venv's bin must be on PATH (as after `. .venv/bin/activate`)
    # as the register report says: the model is code, so the server refuses every pickle
    env = {**os.environ, **QUIET_ENV, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "ab") as f:
        proc = subprocess.Popen([*mlflow_command(), "models", "serve", "-m", model_uri, "--env-manager", "local",
                                 "-h", "127.0.0.1", "-p", str(port), "--workers", "1"], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while not http_ok(f"{url}/ping"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow models serve did not come up:\n{log_tail(log)}")
            time.sleep(0.25)
        yield url
    finally:
        stop(proc)


@pytest.mark.slow
def test_pipeline_registers_and_the_champion_serves_raw_images(tmp_path):
    project = clone_repo(tmp_path / "keel")
    with mlflow_server(tmp_path / "mlflow") as srv:
        r = sh(["dvc", "repro"], project, env={"MLFLOW_TRACKING_URI": srv.uri})
        assert "Running stage 'register'" in r.stdout, r.stdout + r.stderr
        assert f"models:/{MODEL}@champion" in r.stdout + r.stderr  # it says where the model is and how to serve it

        from mlflow.tracking import MlflowClient

        client = MlflowClient(srv.uri)
        versions = client.search_model_versions(f"name='{MODEL}'")
        assert len(versions) == 1
        champion = client.get_model_version_by_alias(MODEL, "champion")
        tags = champion.tags
        test = json.loads((project / "metrics/test.json").read_text())
        assert tags["keel.model_sha256"] == test["model_sha256"]
        assert tags["keel.manifest_sha256"] == (project / "data/split/manifest.parquet.sha256").read_text().split()[0]
        assert tags["keel.git_sha"] == sh(["git", "rev-parse", "HEAD"], project).stdout.strip()
        for key in ("keel.environment_hash", "keel.dvc_lock_sha256", "keel.shard_index_sha256", "keel.ge_validation",
                    "keel.params_sha256", "keel.training_run_id", "keel.test_ledger"):
            assert tags.get(key), key
        run = client.get_run(tags["keel.training_run_id"])  # the lineage points at the real training run
        assert "val_accuracy" in run.data.metrics

        # a no-op repro changes nothing in the registry
        sh(["dvc", "repro"], project, env={"MLFLOW_TRACKING_URI": srv.uri})
        assert len(client.search_model_versions(f"name='{MODEL}'")) == 1

        preds = pq.read_table(project / "reports/evaluate/predictions.parquet").to_pylist()
        sample = preds[:48]
        raw = _images(project / "data/raw/items", [p["id"] for p in sample])
        with served(f"models:/{MODEL}@champion", srv.uri, tmp_path) as url:
            rows = [[base64.b64encode(raw[p["id"]]).decode()] for p in sample]
            status, body = _post(f"{url}/invocations", {"dataframe_split": {"columns": ["image"], "data": rows}})
            assert status == 200, body
            out = body["predictions"]
            assert [o["label"] for o in out] == [p["pred_name"] for p in sample]
            got = np.array([o["probabilities"] for o in out])
            want = np.array([p["probs"] for p in sample])
            np.testing.assert_allclose(got, want, atol=1e-4)

            status, body = _post(f"{url}/invocations", {"dataframe_split": {
                "columns": ["image"], "data": [[base64.b64encode(b"this is not an image").decode()]]}})
            assert 400 <= status < 500 and "row 0" in json.dumps(body) and "image" in json.dumps(body).lower(), body
            big = base64.b64encode(b"\0" * 10_000_001).decode()  # register.max_image_bytes is 10 MB
            status, body = _post(f"{url}/invocations", {"dataframe_split": {"columns": ["image"], "data": [[big]]}})
            assert 400 <= status < 500 and "bytes" in json.dumps(body), body
