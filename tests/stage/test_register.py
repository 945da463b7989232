"""tasks.register against a real ``mlflow server`` (and the embedded SQLite default), with the real digits
checkpoint: the gate, idempotence, champion hand-over, lineage tags, refusals and an unreachable server."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tasks import register
from tasks.core import io
from tasks.core.config import Paths
from tasks.core.config import RegisterConfig as _Register
from tasks.core.tracking import MlflowLogger
from tasks.register import Champion, RegisterError, model_sha256
from tests.support.mlflow_server import free_port, mlflow_server


def RegisterConfig(**kw) -> _Register:
    """The register section with the absolute thresholds off (the schema's default is params.yaml's 0.9 digits
    gate): these tests use candidates with made-up metrics and test the champion rule, idempotence, retries..."""
    return _Register(**{"min_val_accuracy": 0.0, "min_test_accuracy": 0.0, "min_test_macro_f1": 0.0, **kw})


@pytest.fixture(autouse=True)
def quiet_mlflow(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME",
                "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(var, raising=False)
    cwd = tmp_path / "cwd"  # an empty cwd: no dvc.lock / params.yaml, and MLflow's ./mlruns fallback would show
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture(scope="module")
def server():
    with mlflow_server() as srv:
        yield srv


@pytest.fixture(scope="module")
def base(digits_trained):
    """(digits paths, best.pt blob, real test metrics of that model on the digits test shards)."""
    import torch

    from tasks import serving

    paths, _ = digits_trained
    blob = torch.load(Path(paths.models_dir) / "best.pt", map_location="cpu", weights_only=True)
    x, y, _ = io.ShardReader(paths.shards_dir, "test", reader_of="tasks.evaluate").read_all()
    probs = serving.ImageClassifier.from_checkpoint(blob, device="cpu").probabilities(x)
    pred = probs.argmax(1)
    f1s = []
    for c in range(probs.shape[1]):
        tp, fp, fn = ((pred == c) & (y == c)).sum(), ((pred == c) & (y != c)).sum(), ((pred != c) & (y == c)).sum()
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    index = json.loads((Path(paths.shards_dir) / "index.json").read_text())
    metrics = {"test_accuracy": float((pred == y).mean()), "test_macro_f1": float(np.mean(f1s)),
               "test_loss": float(-np.log(probs[np.arange(len(y)), y] + 1e-12).mean()), "test_ece": 0.02,
               "test_rows": len(y), "test_looks": 1, "test_reused": False,
               "model_sha256": model_sha256(blob["model"], blob["model_name"]),
               "manifest_sha256": index["manifest_sha256"], "reused_result": False,
               # evaluate's feature-space audit (tests/stage/test_feature_audit.py checks the real numbers)
               "feature_audit": "on", "test_accuracy_dedup": float((pred[1:] == y[1:]).mean()), "feature_dup_count": 1,
               "feature_dup_fraction": 1 / len(y), "feature_dup_threshold": 0.02}
    return paths, blob, metrics


def perturbed(blob: dict, seed: int) -> dict:
    """A really different model (different weights, hence a different model_sha256)."""
    state = {k: v.clone() for k, v in blob["model"].items()}
    head = [k for k in state if k.endswith("bias") and state[k].is_floating_point()][-1]
    state[head] += 1e-3 * (seed + 1)
    return {**blob, "model": state}


def candidate(root: Path, base, blob: dict | None = None, **test_overrides) -> Paths:
    """A project folder holding a candidate: best.pt, metrics/test.json (evaluate's contract), metrics/train.json,
    evaluate figures, a validate summary; data paths point (read-only) at the digits pipeline."""
    import torch

    dpaths, base_blob, metrics = base
    blob = blob if blob is not None else base_blob
    root.mkdir(parents=True, exist_ok=True)
    p = Paths(raw_items=dpaths.raw_items, rejects=dpaths.rejects, audit_dir=str(root / "audit"),
              split_manifest=dpaths.split_manifest, leakage_report=str(root / "leakage.json"),
              leakage_picture=str(root / "leakage.png"), validate_dir=str(root / "validate"), shards_dir=dpaths.shards_dir, models_dir=str(root / "models"),
              checkpoints_dir=str(root / "checkpoints"),
              train_metrics=str(root / "metrics" / "train.json"), train_plots_dir=str(root / "reports" / "train"),
              evaluate_dir=str(root / "reports" / "evaluate"), test_metrics=str(root / "metrics" / "test.json"),
              test_ledger=str(root / "test_ledger"), register_report=str(root / "reports" / "register.json"))
    Path(p.models_dir).mkdir(parents=True)
    torch.save(blob, Path(p.models_dir) / "best.pt")
    Path(p.train_metrics).parent.mkdir(parents=True)
    shutil.copy(dpaths.train_metrics, p.train_metrics)
    test = {**metrics, "model_sha256": model_sha256(blob["model"], blob["model_name"]), **test_overrides}
    Path(p.test_metrics).write_text(json.dumps(test))
    ev = Path(p.evaluate_dir)
    ev.mkdir(parents=True)
    (ev / "confusion.png").write_bytes(_png())
    (ev / "summary.md").write_text("# test\n")
    Path(p.validate_dir).mkdir()
    (Path(p.validate_dir) / "summary.json").write_text(json.dumps({"success": True, "failures": []}))
    return p


def _png() -> bytes:
    from tests.conftest import encode

    return encode(np.zeros((4, 4), np.uint8))


def snapshot(uri: str, name: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    rm = client.get_registered_model(name)
    versions = {v.version: dict(v.tags) for v in client.search_model_versions(f"name = '{name}'")}
    return {"aliases": dict(rm.aliases), "versions": versions}


# ---------------------------------------------------------------- pure pieces
def test_model_sha256_is_the_weights_and_the_name(base):
    _, blob, _ = base
    state = blob["model"]
    h = model_sha256(state, blob["model_name"])
    assert model_sha256(dict(reversed(list(state.items()))), blob["model_name"]) == h  # key order is irrelevant
    assert model_sha256(perturbed(blob, 0)["model"], blob["model_name"]) != h
    assert model_sha256(state, "resnet18") != h
    assert len(h) == 64


def test_gate_champion_rules():
    cfg = RegisterConfig(min_improvement=0.05)
    test = {"test_accuracy": 0.95, "test_macro_f1": 0.9, "test_reused": False, "test_looks": 1}
    champ = Champion("3", "other", "split-a", "test_accuracy", 0.90, None)
    by_name = {c.name: c for c in register.gate(cfg, test, 0.9, "cand", "split-a", champ)}
    assert by_name["champion"].passed  # 0.95 >= 0.90 + 0.05 despite float rounding
    by_name = {c.name: c for c in register.gate(cfg, {**test, "test_accuracy": 0.949}, 0.9, "cand", "split-a", champ)}
    assert not by_name["champion"].passed
    equal = register.gate(RegisterConfig(), {**test, "test_accuracy": 0.90}, 0.9, "cand", "split-a", champ)
    assert all(c.passed for c in equal)  # min_improvement 0: at least as good replaces the champion
    other = {c.name: c for c in register.gate(cfg, {**test, "test_accuracy": 1.0}, 0.9, "cand", "split-b", champ)}
    assert not other["champion"].passed and "another test split" in other["champion"].detail
    same = {c.name: c for c in register.gate(cfg, test, 0.9, "other", "split-b", champ)}
    assert same["champion"].passed  # the candidate is the champion itself
    reused = {**test, "test_reused": True, "test_looks": 2}
    strict = {c.name: c for c in register.gate(RegisterConfig(allow_reused_test=False), reused, 0.9, "c", "s", None)}
    assert not strict["test_not_reused"].passed and "2 looks" in strict["test_not_reused"].detail
    assert all(c.passed for c in register.gate(RegisterConfig(), reused, 0.9, "c", "s", None))


# ---------------------------------------------------------------- against a real server
def test_register_then_again_is_idempotent(server, base, tmp_path, quiet_mlflow):
    from mlflow.tracking import MlflowClient

    p = candidate(tmp_path / "proj", base)
    cfg = RegisterConfig(model_name="digits-a", experiment="keel-a", retries=1, retry_backoff_s=0.1)
    r = register.run(cfg, p, tracking_uri=server.uri)
    assert (r.status, r.version, r.aliases) == ("registered", "1", ["challenger", "champion"])
    client = MlflowClient(server.uri)
    mv = client.get_model_version("digits-a", "1")
    tags = mv.tags
    assert {f"keel.{k}" for k in register.TAG_KEYS} <= set(tags)
    _, blob, metrics = base
    assert tags["keel.model_sha256"] == model_sha256(blob["model"], blob["model_name"])
    assert tags["keel.manifest_sha256"] == metrics["manifest_sha256"]
    assert tags["keel.shard_index_sha256"] == io.sha256_file(Path(p.shards_dir) / "index.json")
    assert tags["keel.ge_validation"] == "passed" and tags["keel.test_ledger"] == "first look"
    assert tags["keel.dvc_lock_sha256"] == "absent" and tags["keel.params_sha256"] == "absent"
    assert tags["keel.training_run_id"] == "none"  # the fixture trained without a tracker
    assert float(tags["keel.test_accuracy"]) == pytest.approx(metrics["test_accuracy"])
    # the version carries both accuracies: all test items, and without the feature-space near-duplicates
    assert float(tags["keel.test_accuracy_dedup"]) == pytest.approx(metrics["test_accuracy_dedup"])
    assert tags["keel.feature_dup_count"] == "1"
    assert tags["keel.model_name"] == blob["model_name"] and tags["keel.git_sha"]
    assert "mlflow models serve -m models:/digits-a@champion" in mv.description
    assert f"test accuracy {metrics['test_accuracy_dedup']:.4f} without the 1 test item(s)" in mv.description
    # logged under a "register" run (no training run on this server), with the test metrics and figures
    run = client.get_run(mv.run_id)
    assert run.info.run_name == "register" and run.info.status == "FINISHED"
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert run.data.metrics["test_accuracy_dedup"] == pytest.approx(metrics["test_accuracy_dedup"])
    assert run.data.metrics["feature_dup_count"] == 1 and run.data.metrics["feature_dup_threshold"] == 0.02
    assert {a.path for a in client.list_artifacts(mv.run_id, "evaluate")} >= {"evaluate/confusion.png",
                                                                              "evaluate/summary.md"}
    report = json.loads(Path(p.register_report).read_text())
    assert report["status"] == "registered" and report["version"] == "1"
    assert report["model_uri"] == "models:/digits-a@champion"
    assert report["serve"]["command"] == "mlflow models serve -m models:/digits-a@champion --env-manager local -p 5001"
    assert report["serve"]["env"]["MLFLOW_TRACKING_URI"] == server.uri
    assert report["serve"]["env"]["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"  # the model is logged as code
    assert report["gate"]["passed"] and report["tags"] == dict(tags)
    assert report["candidate"]["test_accuracy_dedup"] == metrics["test_accuracy_dedup"]
    assert report["candidate"]["feature_dup_count"] == 1

    before = snapshot(server.uri, "digits-a")
    (quiet_mlflow / "dvc.lock").write_text("schema: '2.0'\n")  # e.g. the register stage got locked meanwhile
    again = register.run(cfg, p, tracking_uri=server.uri)
    assert (again.status, again.version, again.aliases) == ("already_registered", "1", ["challenger", "champion"])
    assert snapshot(server.uri, "digits-a") == before  # no second version, same aliases, lineage tags as recorded
    report = json.loads(Path(p.register_report).read_text())
    assert report["status"] == "already_registered" and report["tags"] == dict(tags)
    assert report["tag_drift"] == {"keel.dvc_lock_sha256": {"registered": "absent",
                                                            "now": io.sha256_file(quiet_mlflow / "dvc.lock")}}
    assert [x.name for x in quiet_mlflow.iterdir()] == ["dvc.lock"]  # nothing fell back to ./mlruns in the cwd


def test_better_candidate_takes_over_worse_and_other_split_are_refused(server, base, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    _, blob, metrics = base
    cfg = RegisterConfig(model_name="digits-b", experiment="keel-b", retries=1, retry_backoff_s=0.1)
    assert register.run(cfg, candidate(tmp_path / "v1", base), tracking_uri=server.uri).version == "1"

    # v2 comes from a training run tracked on this server: the model and the test metrics are logged into it
    with MlflowLogger("keel-b-train", "train", server.uri) as lg:
        lg.log_metrics({"val_accuracy": 0.9}, step=1)
    trained = perturbed(blob, 1)
    trained["run_info"] = {**blob["run_info"], "tracking_run_id": lg.run_id}
    acc = metrics["test_accuracy"]
    better_acc = min(1.0, acc + 0.01)
    better = candidate(tmp_path / "v2", base, trained, test_accuracy=better_acc)
    r = register.run(cfg, better, tracking_uri=server.uri)
    assert (r.status, r.version, r.aliases) == ("registered", "2", ["challenger", "champion"])
    client = MlflowClient(server.uri)
    v2 = client.get_model_version("digits-b", "2")
    assert v2.run_id == lg.run_id == v2.tags["keel.training_run_id"]
    train_run = client.get_run(lg.run_id)
    assert train_run.info.status == "FINISHED" and train_run.data.metrics["test_accuracy"] == pytest.approx(better_acc)
    assert client.search_runs([train_run.info.experiment_id], "attributes.run_name = 'register'") == []
    assert dict(client.get_registered_model("digits-b").aliases) == {"challenger": "2", "champion": "2"}
    assert client.get_model_version("digits-b", "1").aliases == []  # v1 stays, without an alias

    before = snapshot(server.uri, "digits-b")
    worse = candidate(tmp_path / "v3", base, perturbed(blob, 2), test_accuracy=acc - 0.05)
    capsys.readouterr()
    r = register.run(cfg, worse, tracking_uri=server.uri)
    assert r.status == "gate_failed" and r.version is None
    assert [c.name for c in r.checks if not c.passed] == ["champion"]
    assert snapshot(server.uri, "digits-b") == before  # registry unchanged
    report = json.loads(Path(worse.register_report).read_text())
    assert report["status"] == "gate_failed" and report["champion_before"]["version"] == "2"
    failed = [c for c in report["gate"]["checks"] if not c["passed"]]
    assert failed[0]["name"] == "champion" and failed[0]["threshold"] == pytest.approx(better_acc)
    out = capsys.readouterr().out
    assert "FAIL" in out and "gate failed (champion)" in out

    other = candidate(tmp_path / "v4", base, perturbed(blob, 3), test_accuracy=1.0, manifest_sha256="f" * 64)
    r = register.run(cfg, other, tracking_uri=server.uri)
    assert r.status == "gate_failed"
    detail = next(c.detail for c in r.checks if c.name == "champion")
    assert "another test split" in detail and "alias by hand" in detail
    assert snapshot(server.uri, "digits-b") == before


def test_thresholds_and_reused_test_fail_the_gate(server, base, tmp_path):
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    p = candidate(tmp_path / "proj", base, test_reused=True, test_looks=3)
    cfg = RegisterConfig(model_name="digits-c", min_test_accuracy=0.9999, min_val_accuracy=0.5,
                         allow_reused_test=False, retries=0)
    r = register.run(cfg, p, tracking_uri=server.uri)
    assert r.status == "gate_failed"
    assert {c.name for c in r.checks if not c.passed} == {"test_accuracy", "test_not_reused"}
    report = json.loads(Path(p.register_report).read_text())
    check = next(c for c in report["gate"]["checks"] if c["name"] == "test_accuracy")
    assert check == {"name": "test_accuracy", "value": pytest.approx(base[2]["test_accuracy"]), "threshold": 0.9999,
                     "passed": False, "detail": "register.min_test_accuracy"}
    with pytest.raises(MlflowException):  # not even the registered model was created
        MlflowClient(server.uri).get_registered_model("digits-c")


def test_feature_audit_numbers_are_required_and_an_off_audit_is_tagged_with_its_reason(base, tmp_path):
    from tasks.register.candidate import lineage_tags, load_candidate

    p = candidate(tmp_path / "old", base)
    test = json.loads(Path(p.test_metrics).read_text())
    for k in ("test_accuracy_dedup", "feature_dup_count"):
        test.pop(k)
    Path(p.test_metrics).write_text(json.dumps(test))  # written by an evaluate before the audit existed
    with pytest.raises(RegisterError, match=r"test.json: missing \['test_accuracy_dedup', 'feature_dup_count'\]; "
                                            r"re-run `keel evaluate`"):
        load_candidate(p)
    off = candidate(tmp_path / "off", base, feature_audit="off: evaluate.feature_audit is false",
                    test_accuracy_dedup=None, feature_dup_count=None, feature_dup_fraction=None,
                    feature_dup_threshold=None)
    tags = lineage_tags(RegisterConfig(), off, load_candidate(off))
    assert tags["keel.test_accuracy_dedup"] == tags["keel.feature_dup_count"] == \
        "none: feature audit off: evaluate.feature_audit is false"


def test_test_metrics_of_another_model_are_refused(base, tmp_path):
    _, blob, _ = base
    p = candidate(tmp_path / "proj", base, model_sha256=model_sha256(perturbed(blob, 5)["model"], blob["model_name"]))
    with pytest.raises(RegisterError, match="belongs to another model"):
        # refused before any registry call: this URI has no server behind it
        register.run(RegisterConfig(retries=0), p, tracking_uri=f"http://127.0.0.1:{free_port()}")
    assert not Path(p.register_report).exists()


def test_unreachable_tracking_server_fails_in_bounded_time(base, tmp_path):
    p = candidate(tmp_path / "proj", base)
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RegisterError) as err:
        register.run(RegisterConfig(retries=2, retry_backoff_s=0.2), p, tracking_uri=uri)
    assert time.monotonic() - t0 < 30
    msg = str(err.value)
    assert uri in msg and "3 time(s)" in msg and "unreachable" in msg and "/health" in msg
    assert not Path(p.register_report).exists()


def test_embedded_default_keeps_everything_in_the_project(base, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    project = tmp_path / "project"
    p = candidate(project, base)
    (project / "params.yaml").write_text("register:\n  model_name: digits-e\n")
    (project / "dvc.lock").write_text("schema: '2.0'\n")
    monkeypatch.chdir(project)
    r = register.run(RegisterConfig(model_name="digits-e", retries=0), p, allowed_formats=["PNG", "JPEG"])
    assert (r.status, r.version) == ("registered", "1")
    # the served model accepts the formats the data was ingested under (ingest.allowed_formats), not a default
    spec = json.loads(next((tmp_path / "project" / "mlruns" / "artifacts").rglob("preprocessing.json")).read_text())
    assert spec["allowed_formats"] == ["PNG", "JPEG"]
    mlruns = project / "mlruns"
    assert r.tracking_uri == f"sqlite:///{mlruns.resolve()}/mlflow.db" and (mlruns / "mlflow.db").is_file()
    assert {x.name for x in mlruns.iterdir()} == {"mlflow.db", "artifacts"}  # no ./mlruns/<experiment> fallback
    assert list((mlruns / "artifacts").rglob("MLmodel")) and list((mlruns / "artifacts").rglob("weights.pt"))
    mv = MlflowClient(r.tracking_uri).get_model_version("digits-e", "1")
    assert mv.tags["keel.params_sha256"] == io.sha256_file(project / "params.yaml")
    assert mv.tags["keel.dvc_lock_sha256"] == io.sha256_file(project / "dvc.lock")
    assert {x.name for x in project.iterdir()} == {"mlruns", "models", "metrics", "reports", "validate",
                                                  "params.yaml", "dvc.lock"}
