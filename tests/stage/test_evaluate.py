"""The evaluate stage on the digits model: outputs and metrics, the test-access ledger (recorded results, second
looks under strict and warn), readable refusals of bad checkpoints, the sealed test split, and the CLI exit."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tasks import evaluate
from tasks.core import io
from tasks.core.config import EvaluateConfig, TrainConfig
from tasks.evaluate import EvaluateError, SecondLookRefused

REPO = Path(__file__).resolve().parents[2]
STRICT, WARN = EvaluateConfig(), EvaluateConfig(second_look="warn")


def eval_paths(p, root: Path, **update):
    """The fixture's data and model, with every evaluate output (and the ledger) under ``root``."""
    return p.model_copy(update={"test_ledger": str(root / "ledger"), "evaluate_dir": str(root / "evaluate"),
                                "test_metrics": str(root / "metrics" / "test.json"), **update})


def checkpoint(p) -> dict:
    return torch.load(Path(p.models_dir) / "best.pt", map_location="cpu", weights_only=True)


def altered_models(p, root: Path, change) -> str:
    """A copy of best.pt changed by ``change(blob)`` in ``root/models`` (the fixture's folder stays untouched)."""
    blob = checkpoint(p)
    change(blob)
    (root / "models").mkdir(parents=True)
    torch.save(blob, root / "models" / "best.pt")
    return str(root / "models")


def perturb(blob: dict) -> None:
    g = torch.Generator().manual_seed(1)
    w = blob["model"]["fc.weight"]
    blob["model"]["fc.weight"] = w + 1e-3 * torch.randn(w.shape, generator=g)


def ledger(paths) -> list[dict]:
    return [json.loads(line) for line in (Path(paths.test_ledger) / "ledger.jsonl").read_text().splitlines()]


def outputs(paths) -> dict:
    """What a re-run must reproduce: metrics (minus the reused flag), CSVs, predictions, the feature audit."""
    d = Path(paths.evaluate_dir)
    metrics = json.loads(Path(paths.test_metrics).read_text())
    metrics.pop("reused_result")
    return {"metrics": metrics, "confusion": (d / "confusion.csv").read_bytes(),
            "per_class": (d / "per_class.csv").read_bytes(),
            "predictions": pq.read_table(d / "predictions.parquet").to_pylist(),
            "feature_duplicates": (d / "feature_duplicates.json").read_bytes(),
            "feature_picture": (d / "feature_duplicates.png").read_bytes()}


@pytest.fixture(scope="module")
def first(digits_trained, tmp_path_factory):
    """One first evaluation of the digits model in its own ledger (other tests copy that ledger)."""
    p, _ = digits_trained
    root = tmp_path_factory.mktemp("first")
    ep = eval_paths(p, root)
    return ep, evaluate.run(STRICT, ep)


def with_ledger_of(first_paths, root: Path, p, **update):
    """Fresh output paths under ``root`` sharing a copy of the first evaluation's ledger."""
    shutil.copytree(first_paths.test_ledger, root / "ledger")
    return eval_paths(p, root, **update)


# ---------------------------------------------------------------- a first evaluation
def test_first_evaluation_writes_all_outputs_with_sane_metrics(first, digits_trained):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    ep, res = first
    p, _ = digits_trained
    index = io.ShardIndex.load(p.shards_dir)
    rows = index.rows("test")
    assert res.decision == "read" and not res.reused_result and res.looks == 1 and not res.test_reused
    assert res.rows == rows > 100 and res.accuracy > 0.8 and 0 <= res.ece <= 1 and res.loss > 0
    d = Path(ep.evaluate_dir)
    for name in evaluate.OUTPUT_FILES:
        assert (d / name).stat().st_size > 0, name
    metrics = json.loads(Path(ep.test_metrics).read_text())
    audit = json.loads((d / "feature_duplicates.json").read_text())  # tests/stage/test_feature_audit.py: the audit
    assert metrics == {"test_accuracy": res.accuracy, "test_macro_f1": res.macro_f1, "test_loss": res.loss,
                       "test_ece": res.ece, "test_rows": rows, "test_looks": 1, "test_reused": False,
                       "model_sha256": res.model_sha256, "manifest_sha256": index.manifest_sha256,
                       "reused_result": False, "feature_audit": "on", "test_accuracy_dedup": res.accuracy_dedup,
                       "feature_dup_count": res.feature_dup_count,
                       "feature_dup_fraction": res.feature_dup_count / rows, "feature_dup_threshold": audit["threshold"]}
    ck = checkpoint(p)
    assert res.model_sha256 == evaluate.model_sha256(ck["model"], "resnet10t")
    # the numbers agree with scikit-learn on the recorded predictions
    pred = pq.read_table(d / "predictions.parquet")
    assert pred.column_names == ["id", "label", "pred", "label_name", "pred_name", "probs"]
    y, yhat = pred.column("label").to_numpy(), pred.column("pred").to_numpy()
    probs = np.asarray(pred.column("probs").to_pylist(), dtype=np.float32)
    assert probs.shape == (rows, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert len(set(pred.column("id").to_pylist())) == rows
    assert res.accuracy == pytest.approx(accuracy_score(y, yhat))
    assert res.macro_f1 == pytest.approx(f1_score(y, yhat, average="macro"))
    full = json.loads((Path(ep.test_ledger) / "results" / f"{res.model_sha256}.json").read_text())["metrics"]
    cm = np.asarray(full["confusion_matrix"])
    assert (cm == confusion_matrix(y, yhat, labels=range(10))).all() and cm.sum() == rows
    assert sum(r["support"] for r in full["per_class"]) == rows
    assert sum(b["count"] for b in full["reliability"]) == rows and len(full["reliability"]) == 15
    conf = probs.max(1)
    manual_ece = sum(abs((yhat[m] == y[m]).mean() - conf[m].mean()) * m.sum() / rows
                     for b in full["reliability"] if b["count"]
                     for m in [(conf > b["lower"]) & (conf <= b["upper"])])
    assert res.ece == pytest.approx(manual_ece, abs=1e-6)
    # the DVC confusion plot reads class names, one row per test item
    with (d / "confusion.csv").open() as f:
        conf_rows = list(csv.DictReader(f))
    assert len(conf_rows) == rows and {r["actual"] for r in conf_rows} == set(index.classes)
    summary = (d / "summary.md").read_text()
    assert "Most confused pairs" in summary and "look #1" in summary and "| precision |" in summary
    # exactly one ledger entry: a read, with its lineage
    (entry,) = ledger(ep)
    assert entry["action"] == "read" and entry["model_sha256"] == res.model_sha256 and entry["looks"] == 1
    assert entry["manifest_sha256"] == index.manifest_sha256 and entry["test_rows"] == rows
    assert entry["shard_index_sha256"] == io.sha256_file(Path(p.shards_dir) / "index.json")
    assert entry["train_git_sha"] == ck["run_info"]["git_sha"] and entry["policy"] == "strict"
    assert entry["metrics"]["test_accuracy"] == res.accuracy and entry["checkpoint"].endswith("best.pt")
    assert {"time", "model_name", "tracking_run_id", "git_sha", "git_dirty", "result_sha256"} <= entry.keys()
    assert (Path(ep.test_ledger) / "results" / f"{res.model_sha256}.predictions.parquet").exists()


# ---------------------------------------------------------------- one evaluation per model
def test_same_model_again_returns_the_recorded_result_without_opening_the_test_shards(
        first, digits_trained, tmp_path, monkeypatch):
    p, _ = digits_trained
    shards = tmp_path / "shards"
    shutil.copytree(p.shards_dir, shards)
    ep = eval_paths(p, tmp_path / "a", shards_dir=str(shards))
    res1 = evaluate.run(STRICT, ep)
    before = outputs(ep)
    test_files = sorted((shards / "test").glob("*.parquet"))
    assert test_files
    for f in test_files:  # the test shards are now unreadable: any attempt to open them fails
        f.write_bytes(b"corrupt")
    opened = []

    class Refuse(io.ShardReader):
        def __init__(self, *a, **kw):
            opened.append(a)
            raise AssertionError("the test shards were opened")

    monkeypatch.setattr(io, "ShardReader", Refuse)
    res2 = evaluate.run(STRICT, ep)
    assert not opened and res2.decision == "recorded_result_returned" and res2.reused_result
    assert res2.model_sha256 == res1.model_sha256 and res2.accuracy == res1.accuracy
    assert outputs(ep) == before
    assert json.loads(Path(ep.test_metrics).read_text())["reused_result"] is True
    assert [e["action"] for e in ledger(ep)] == ["read", "recorded_result_returned"]
    monkeypatch.undo()
    # the corruption is real: a model with no recorded result would have hit it
    with pytest.raises(io.DataError, match="checksum mismatch"):
        evaluate.run(STRICT, eval_paths(p, tmp_path / "b", shards_dir=str(shards)))


def test_deleted_outputs_are_restored_from_the_ledger(first, digits_trained, tmp_path):
    p, _ = digits_trained
    ep0, _ = first
    ep = with_ledger_of(ep0, tmp_path, p)
    shutil.copytree(ep0.evaluate_dir, ep.evaluate_dir)
    Path(ep.test_metrics).parent.mkdir(parents=True)
    shutil.copy(ep0.test_metrics, ep.test_metrics)
    before = outputs(ep)
    shutil.rmtree(ep.evaluate_dir)
    Path(ep.test_metrics).unlink()
    res = evaluate.run(STRICT, ep)
    assert res.decision == "recorded_result_returned"
    assert outputs(ep) == before
    for name in evaluate.OUTPUT_FILES:
        assert (Path(ep.evaluate_dir) / name).exists(), name
    assert "Recorded result returned" in (Path(ep.evaluate_dir) / "summary.md").read_text()


def test_an_altered_recorded_result_is_rescored_not_trusted(first, digits_trained, tmp_path):
    p, _ = digits_trained
    ep0, res0 = first
    ep = with_ledger_of(ep0, tmp_path, p)
    recorded = Path(ep.test_ledger) / "results" / f"{res0.model_sha256}.json"
    doctored = json.loads(recorded.read_text())
    doctored["metrics"]["accuracy"] = 1.0
    recorded.write_text(json.dumps(doctored))
    res = evaluate.run(STRICT, ep)  # same model: scored again, same look number, no refusal
    assert res.decision == "read" and res.accuracy == res0.accuracy and res.looks == 1 and not res.test_reused
    entries = ledger(ep)
    assert [e["action"] for e in entries] == ["read", "read"] and "re-scored" in entries[1]["note"]
    assert evaluate.run(STRICT, ep).decision == "recorded_result_returned"  # the new record is trusted again
    (Path(ep.test_ledger) / "ledger.jsonl").open("a").write('{"time": "truncated\n')
    with pytest.raises(EvaluateError, match=r"ledger.jsonl:4: unreadable ledger entry; the test-access record is "
                                            r"damaged .* never delete it"):
        evaluate.run(STRICT, ep)


def test_model_sha256_follows_the_documented_layout():
    """Register recomputes it from best.pt to check test metrics belong to the checkpoint: the layout is a contract."""
    import hashlib

    sd = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.steps": torch.tensor(7),
          "c.empty": torch.zeros(0, dtype=torch.bfloat16)}
    h = hashlib.sha256()
    for key in ("a.steps", "b.weight", "c.empty"):
        t = sd[key]
        h.update(key.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(b"resnet10t")
    assert evaluate.model_sha256(sd, "resnet10t") == h.hexdigest()
    assert evaluate.model_sha256(sd, "resnet18") != h.hexdigest()


def test_identity_is_the_weights_not_the_file(first, digits_trained, tmp_path):
    """best.pt re-saved with other lineage (git SHA, tracking run) is the same model: no second look."""
    p, _ = digits_trained
    ep0, res0 = first

    def relabel(blob):
        blob["run_info"] = {**blob["run_info"], "git_sha": "0" * 40, "tracking_run_id": "another-run"}
        blob["epoch"] = 99

    ep = with_ledger_of(ep0, tmp_path, p, models_dir=altered_models(p, tmp_path, relabel))
    res = evaluate.run(STRICT, ep)
    assert res.decision == "recorded_result_returned" and res.model_sha256 == res0.model_sha256


# ---------------------------------------------------------------- second looks
def test_a_second_model_is_refused_under_strict(first, digits_trained, tmp_path):
    p, _ = digits_trained
    ep0, res0 = first
    ep = with_ledger_of(ep0, tmp_path, p, models_dir=altered_models(p, tmp_path, perturb))
    shutil.copytree(ep0.evaluate_dir, ep.evaluate_dir)  # the earlier model's outputs sit in the output paths
    Path(ep.test_metrics).parent.mkdir(parents=True)
    shutil.copy(ep0.test_metrics, ep.test_metrics)
    with pytest.raises(SecondLookRefused) as err:
        evaluate.run(STRICT, ep)
    msg = str(err.value)
    assert res0.model_sha256[:12] in msg and "resnet10t" in msg and "already used to score" in msg
    assert "biases the estimate" in msg and "keel split --refreeze" in msg and "voids earlier test results" in msg
    assert "second_look: warn" in msg and "val split" in msg
    assert isinstance(err.value, io.DataError)  # the CLI reports it as a user error
    entries = ledger(ep)
    assert [e["action"] for e in entries] == ["read", "refused"]
    assert entries[1]["model_sha256"] != res0.model_sha256 and entries[1]["looks"] == 1
    # nothing describing a model sits beside this best.pt: no test metrics, no reports
    assert not Path(ep.test_metrics).exists()
    assert not any((Path(ep.evaluate_dir) / n).exists() for n in evaluate.OUTPUT_FILES)


def test_a_second_model_under_warn_is_scored_and_marked_reused(first, digits_trained, tmp_path, capfd):
    p, _ = digits_trained
    ep0, res0 = first
    ep = with_ledger_of(ep0, tmp_path, p, models_dir=altered_models(p, tmp_path, perturb))
    res = evaluate.run(WARN, ep)
    assert res.decision == "read" and res.test_reused and res.looks == 2 and res.model_sha256 != res0.model_sha256
    assert "test set reused" in capfd.readouterr().err
    metrics = json.loads(Path(ep.test_metrics).read_text())
    assert metrics["test_reused"] is True and metrics["test_looks"] == 2 and metrics["test_accuracy"] > 0.8
    assert "test set reused" in (Path(ep.evaluate_dir) / "summary.md").read_text()
    last = ledger(ep)[-1]
    assert last["action"] == "read" and last["test_reused"] and last["looks"] == 2 and last["policy"] == "warn"
    # the first model still gets its own (first-look) result back, under strict, without a refusal
    back = evaluate.run(STRICT, eval_paths(p, tmp_path, models_dir=p.models_dir))
    assert back.decision == "recorded_result_returned" and back.looks == 1 and not back.test_reused


# ---------------------------------------------------------------- checkpoints that cannot be scored
def test_wrong_architecture_names_the_file_model_and_keys(digits_trained, tmp_path):
    from tasks.model.build import build_model

    p, _ = digits_trained
    other, _ = build_model(TrainConfig(model="resnet18"), num_classes=10, in_chans=3, resolution=32)

    def swap(blob):
        blob["model"] = other.state_dict()  # resnet18 weights under a resnet10t config

    ep = eval_paths(p, tmp_path, models_dir=altered_models(p, tmp_path, swap))
    with pytest.raises(EvaluateError) as err:
        evaluate.run(STRICT, ep)
    msg = str(err.value)
    assert str(Path(ep.models_dir) / "best.pt") in msg and "'resnet10t'" in msg and "do not fit" in msg
    assert "shape mismatch(es), first: layer2.0.downsample.1.weight: checkpoint (128,) vs model (128, 64, 1, 1)" in msg
    assert "missing key(s), first: ['conv1.0.weight'" in msg and "unexpected key(s), first: ['conv1.weight'" in msg
    assert not (Path(ep.test_ledger) / "ledger.jsonl").exists()  # refused before any access decision


def test_missing_and_corrupt_checkpoints(digits_trained, tmp_path):
    p, _ = digits_trained
    ep = eval_paths(p, tmp_path, models_dir=str(tmp_path / "models"))
    with pytest.raises(EvaluateError, match=r"models/best.pt: no best checkpoint; run `keel train` first"):
        evaluate.run(STRICT, ep)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "best.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(EvaluateError, match=r"models/best.pt: not a readable checkpoint"):
        evaluate.run(STRICT, ep)


@pytest.mark.parametrize("change,expected", [
    (lambda b: b["index"].update(mean=[0.5, 0.5, 0.5]),
     r"trained with mean=\[0.5, 0.5, 0.5\] but the shards at .* have mean=\["),
    (lambda b: b["index"].update(classes=list("abcdefghij")), r"trained with classes=\['a', 'b'.* have classes=\['0'"),
    (lambda b: b["run_info"].update(split_manifest_sha256="f" * 64),
     r"trained on split manifest ffffffffffff… .* trained on a different split"),
], ids=["mean", "classes", "manifest"])
def test_checkpoint_for_other_data_is_refused(digits_trained, tmp_path, change, expected):
    p, _ = digits_trained
    ep = eval_paths(p, tmp_path, models_dir=altered_models(p, tmp_path, change))
    with pytest.raises(EvaluateError, match=expected):
        evaluate.run(STRICT, ep)
    assert not (Path(ep.test_ledger) / "ledger.jsonl").exists()


# ---------------------------------------------------------------- the sealed split and the CLI
def test_the_test_split_is_sealed_to_everyone_but_evaluate(digits_trained):
    p, _ = digits_trained
    for caller in (None, "tasks.train", "tasks.evaluate.extra"):
        with pytest.raises(io.TestSplitAccessError, match="the test split is sealed: only the evaluate stage"):
            io.ShardReader(p.shards_dir, "test", reader_of=caller)
    assert len(io.ShardReader(p.shards_dir, "val")) > 0  # the other splits stay open
    assert len(io.ShardReader(p.shards_dir, "test", reader_of=evaluate.__name__)) > 0
    assert io.TEST_READER == evaluate.__name__  # the public token is the package's name, its modules pass it


def test_no_project_code_outside_evaluate_presents_the_test_reader_token():
    """io.TEST_READER is a declaration, not a lock: the seal holds only while no other code (tests aside) passes
    it, so a reach for the test split from a stage, the serving layer, a flow or a bench is caught here."""
    offenders = [f.relative_to(REPO).as_posix()
                 for d in ("tasks", "flows", "bench") for f in sorted((REPO / d).rglob("*.py"))
                 if not f.is_relative_to(REPO / "tasks" / "evaluate") and f != REPO / "tasks" / "core" / "io.py"
                 and any(s in f.read_text() for s in ("TEST_READER", 'reader_of="tasks.evaluate"'))]
    assert not offenders, f"{offenders} present the test-split token; only tasks/evaluate may read the test split"


def test_cli_exits_1_with_a_readable_error_on_a_refused_second_look(first, digits_trained, tmp_path):
    p, _ = digits_trained
    ep0, res0 = first
    ep = with_ledger_of(ep0, tmp_path, p, models_dir=altered_models(p, tmp_path, perturb))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"paths": ep.model_dump(), "evaluate": {"second_look": "strict"}}))
    r = subprocess.run([sys.executable, "-m", "tasks.cli", "evaluate", "--params", str(params)], cwd=REPO,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 1, r.stderr
    assert "keel evaluate: error: second look at the sealed test split refused" in r.stderr
    assert res0.model_sha256[:12] in r.stderr and "Traceback" not in r.stderr
    assert [e["action"] for e in ledger(ep)] == ["read", "refused"]


# ---------------------------------------------------------------- two at once (reliability suite)
def _evaluate_at_once(params_files: list[Path]) -> list[subprocess.CompletedProcess]:
    """``keel evaluate`` for each params file, all started before any has finished (real processes)."""
    procs = [subprocess.Popen([sys.executable, "-m", "tasks.cli", "evaluate", "--params", str(f)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for f in params_files]
    out = []
    for pr, f in zip(procs, params_files):
        stdout, stderr = pr.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(pr.args, pr.returncode, stdout, stderr))
    return out


def _params_file(root: Path, ep, second_look: str = "strict") -> Path:
    f = root / f"params-{len(list(root.glob('params-*.yaml')))}.yaml"
    f.write_text(yaml.safe_dump({"paths": ep.model_dump(), "evaluate": {"second_look": second_look}}))
    return f


@pytest.mark.reliability
def test_two_evaluations_at_once_keep_one_valid_ledger(digits_trained, tmp_path, record):
    """Two `keel evaluate` of the same model at the same moment: one reads the test split, the other returns its
    recorded result; two different models at once under strict: one read, one refusal. Never two first looks,
    never a torn or duplicated ledger line."""
    p, _ = digits_trained
    same = eval_paths(p, tmp_path / "same")
    a, b = _evaluate_at_once([_params_file(tmp_path, same), _params_file(tmp_path, same)])
    entries = ledger(same)
    actions = sorted(e["action"] for e in entries)
    ok = (a.returncode == b.returncode == 0 and actions == ["read", "recorded_result_returned"]
          and "Traceback" not in a.stderr + b.stderr)
    record("concurrency", case="two `keel evaluate` of one model at once", outcome=" + ".join(actions), ok=ok)
    assert ok, (actions, a.stderr[-2000:], b.stderr[-2000:])
    lines = (Path(same.test_ledger) / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 2

    other = eval_paths(p, tmp_path / "other", models_dir=altered_models(p, tmp_path / "other", perturb))
    both = eval_paths(p, tmp_path / "other")
    shutil.copytree(Path(p.models_dir), tmp_path / "orig-models")
    first_model = eval_paths(p, tmp_path / "other", models_dir=str(tmp_path / "orig-models"))
    a, b = _evaluate_at_once([_params_file(tmp_path, first_model), _params_file(tmp_path, other)])
    actions = sorted(e["action"] for e in ledger(both))
    refused = [r for r in (a, b) if r.returncode == 1]
    ok = (actions == ["read", "refused"] and len(refused) == 1 and sorted((a.returncode, b.returncode)) == [0, 1]
          and "second look at the sealed test split refused" in refused[0].stderr
          and "Traceback" not in a.stderr + b.stderr)
    record("concurrency", case="two models evaluated at once (strict)", outcome=" + ".join(actions), ok=ok)
    assert ok, (actions, a.returncode, b.returncode, a.stderr[-2000:], b.stderr[-2000:])
