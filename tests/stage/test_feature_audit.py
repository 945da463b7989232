"""evaluate's feature-space audit on the digits model: a near-duplicate planted in the test shards (a train item,
brightness tweaked) is flagged with its train neighbour; the de-duplicated accuracy is over exactly the other
items and is in metrics/test.json; the threshold is the train-vs-train quantile (checked by brute force on the
model's penultimate features); the test shards are opened once, train is the only other split read; a returned
result rebuilds the audit without reading any shard; switched off, the audit says so."""
from __future__ import annotations

import base64
import io as _bytes_io
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tasks import evaluate
from tasks.core import io
from tasks.core.config import EvaluateConfig
from tasks.evaluate import feature_audit

PLANT_BRIGHTNESS = 3  # +3 of 255 on every pixel: another pixel hash and image, the same digit
CFG = EvaluateConfig(batch_size=64)  # several test batches: the search runs batch by batch in the one pass


def eval_paths(p, root: Path, **update):
    return p.model_copy(update={"test_ledger": str(root / "ledger"), "evaluate_dir": str(root / "evaluate"),
                                "test_metrics": str(root / "metrics" / "test.json"), **update})


def plant(shards_dir: str, root: Path) -> tuple[str, dict]:
    """A copy of the shards whose first test row is replaced by a train item's pixels + ``PLANT_BRIGHTNESS`` (and
    its label), under a new id; the index's checksum of that shard is updated, so the copy verifies."""
    shards = root / "shards"
    shutil.copytree(shards_dir, shards)
    xtr, ytr, itr = io.ShardReader(shards, "train").read_all()
    seen = Counter(x.tobytes() for x in xtr)
    k = next(k for k in range(len(itr)) if seen[xtr[k].tobytes()] == 1)  # no pixel twin inside train
    index = json.loads((shards / "index.json").read_text())
    entry = index["splits"]["test"][0]
    path = shards / entry["file"]
    table = pq.read_table(path)
    group_rows = pq.ParquetFile(path).metadata.row_group(0).num_rows
    image = np.clip(xtr[k].astype(np.int16) + PLANT_BRIGHTNESS, 0, 255).astype(np.uint8)
    planted_id = f"planted-{itr[k][:16]}"
    cols = {c: table.column(c).to_pylist() for c in ("id", "label", "image")}
    cols["id"][0], cols["label"][0], cols["image"][0] = planted_id, int(ytr[k]), image.tobytes()
    new = pa.table({c: pa.array(v, table.schema.field(c).type) for c, v in cols.items()}, schema=table.schema)
    pq.write_table(new, path, row_group_size=group_rows)
    entry["sha256"], entry["bytes"] = io.sha256_file(path), path.stat().st_size
    (shards / "index.json").write_text(json.dumps(index, indent=2))
    return str(shards), {"id": planted_id, "train_id": itr[k], "label": index["classes"][int(ytr[k])],
                         "image": image, "train_image": xtr[k].copy()}


def spy_reader():
    """io.ShardReader that records which split each reader opened and each full pass (iter_batches) over it."""
    log = {"opened": [], "passes": []}

    class Spy(io.ShardReader):
        def __init__(self, shards_dir, split, **kw):
            super().__init__(shards_dir, split, **kw)
            log["opened"].append(split)

        def iter_batches(self, *a, **kw):
            log["passes"].append(self.split)
            yield from super().iter_batches(*a, **kw)

    return Spy, log


@pytest.fixture(scope="module")
def planted(digits_trained, tmp_path_factory):
    """One evaluation of the digits model on shards with a planted near-duplicate, in its own ledger."""
    p, _ = digits_trained
    root = tmp_path_factory.mktemp("planted")
    shards, info = plant(p.shards_dir, root)
    ep = eval_paths(p, root, shards_dir=shards)
    spy, log = spy_reader()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(io, "ShardReader", spy)
        res = evaluate.run(CFG, ep)
    audit = json.loads((Path(ep.evaluate_dir) / "feature_duplicates.json").read_text())
    return ep, res, info, audit, log


def penultimate(model, x: np.ndarray, pre: dict) -> np.ndarray:
    """The reference features, independent of the audit's hook: timm's forward_head(pre_logits=True)."""
    from tasks.model.views import Normalize

    xb = Normalize(pre["mean"], pre["std"])(torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float())
    with torch.no_grad():
        return model.eval().forward_head(model.forward_features(xb), pre_logits=True).numpy().astype(np.float64)


def unit(f: np.ndarray) -> np.ndarray:
    return f / np.linalg.norm(f, axis=1, keepdims=True)


# ---------------------------------------------------------------- the planted near-duplicate
def test_a_planted_near_duplicate_is_flagged_with_its_train_neighbour(planted):
    ep, res, info, audit, _ = planted
    assert res.decision == "read" and audit["enabled"] and audit["layer"] == "fc" and audit["feature_dim"] == 512
    hit = next(r for r in audit["flagged"] if r["id"] == info["id"])
    assert hit["train_id"] == info["train_id"] and hit["label"] == hit["train_label"] == info["label"]
    assert hit["same_label"] and hit["distance"] <= audit["threshold"] / 2  # well inside, not by a hair
    assert [r["distance"] for r in audit["flagged"]] == sorted(r["distance"] for r in audit["flagged"])
    assert audit["flagged_count"] == len(audit["flagged"]) == res.feature_dup_count >= 1
    assert audit["test_rows"] == res.rows and audit["quantile"] == CFG.feature_dup_quantile
    # the picture shows it, and the recorded result holds both images exactly (lossless PNG)
    assert info["id"] in audit["picture"]["pairs"]
    sheet = Image.open(Path(ep.evaluate_dir) / "feature_duplicates.png")
    assert sheet.format == "PNG" and sheet.width >= 4 * (2 * feature_audit.TILE)
    recorded = json.loads((Path(ep.test_ledger) / "results" / f"{res.model_sha256}.json").read_text())
    pair = next(q for q in recorded["feature_audit"]["pairs"] if q["id"] == info["id"])

    def pixels(b64: str) -> np.ndarray:
        return np.asarray(Image.open(_bytes_io.BytesIO(base64.b64decode(b64))).convert("RGB"))

    assert pair["train_id"] == info["train_id"]
    assert (pixels(pair["test_png"]) == info["image"]).all() and (pixels(pair["train_png"]) == info["train_image"]).all()
    summary = (Path(ep.evaluate_dir) / "summary.md").read_text()
    assert "## Feature-space near-duplicates" in summary and f"`{info['id'][:12]}`" in summary


def test_dedup_accuracy_is_over_exactly_the_unflagged_items_and_in_test_json(planted):
    ep, res, _, audit, _ = planted
    pred = pq.read_table(Path(ep.evaluate_dir) / "predictions.parquet")
    ids = pred.column("id").to_pylist()
    correct = pred.column("label").to_numpy() == pred.column("pred").to_numpy()
    flagged = {r["id"] for r in audit["flagged"]}
    assert flagged <= set(ids)
    keep = np.array([i not in flagged for i in ids])
    assert keep.sum() == audit["dedup_rows"] == res.rows - len(flagged)
    assert audit["accuracy_dedup"] == pytest.approx(correct[keep].mean()) and audit["accuracy"] == res.accuracy
    assert all(r["correct"] == bool(correct[ids.index(r["id"])]) for r in audit["flagged"])
    metrics = json.loads(Path(ep.test_metrics).read_text())
    assert metrics["feature_audit"] == "on" and metrics["test_accuracy_dedup"] == audit["accuracy_dedup"]
    assert metrics["feature_dup_count"] == len(flagged) and metrics["feature_dup_threshold"] == audit["threshold"]
    assert metrics["feature_dup_fraction"] == pytest.approx(len(flagged) / res.rows)
    assert res.accuracy_dedup == metrics["test_accuracy_dedup"] and res.metrics == metrics
    entry = [json.loads(x) for x in (Path(ep.test_ledger) / "ledger.jsonl").read_text().splitlines()][-1]
    assert entry["metrics"]["test_accuracy_dedup"] == audit["accuracy_dedup"]
    assert entry["metrics"]["feature_dup_count"] == len(flagged)


def test_threshold_is_the_train_vs_train_quantile_of_the_penultimate_features(planted, digits_trained):
    """Brute force in float64 with timm's pre-logits (no hook, no faiss) gives the same threshold and flags."""
    from tasks.evaluate.checkpoint import build, load_checkpoint

    ep, _, info, audit, _ = planted
    ckpt = load_checkpoint(Path(ep.models_dir) / "best.pt")
    model, _ = build(ckpt, Path(ep.models_dir) / "best.pt")
    xtr, _, itr = io.ShardReader(ep.shards_dir, "train").read_all()
    xte, _, ite = io.ShardReader(ep.shards_dir, "test", reader_of=io.TEST_READER).read_all()  # checks the output
    ftr, fte = unit(penultimate(model, xtr, ckpt["index"])), unit(penultimate(model, xte, ckpt["index"]))
    d_train = 1 - ftr @ ftr.T
    np.fill_diagonal(d_train, np.inf)  # each train item's nearest OTHER train item
    threshold = np.quantile(d_train.min(1), CFG.feature_dup_quantile)
    assert audit["threshold"] == pytest.approx(threshold, abs=1e-5)
    assert audit["train_rows"] == len(itr) and audit["train_nn_distance"]["min"] == pytest.approx(d_train.min(),
                                                                                                 abs=1e-5)
    d_test = 1 - fte @ ftr.T
    nn, dist = d_test.argmin(1), d_test.min(1)
    margin = 1e-5  # float32 vs float64: an item this close to the threshold may fall either way
    sure = {ite[i] for i in np.flatnonzero(dist <= threshold - margin)}
    maybe = {ite[i] for i in np.flatnonzero(dist <= threshold + margin)}
    flagged = {r["id"]: r for r in audit["flagged"]}
    assert sure <= set(flagged) <= maybe and info["id"] in sure
    for i, tid in enumerate(ite):
        if tid in flagged:
            assert flagged[tid]["train_id"] == itr[nn[i]] and flagged[tid]["distance"] == pytest.approx(dist[i],
                                                                                                     abs=1e-5)


def test_the_test_shards_are_opened_once_and_train_is_the_only_other_split_read(planted):
    *_, log = planted
    assert log["opened"].count("test") == 1 and log["passes"].count("test") == 1
    assert sorted(log["opened"]) == ["test", "train"] and sorted(log["passes"]) == ["test", "train"]


def test_a_recorded_result_rebuilds_the_audit_without_reading_any_shard(planted, tmp_path, monkeypatch):
    ep0, res0, *_ = planted
    ep = eval_paths(ep0, tmp_path, shards_dir=ep0.shards_dir)
    shutil.copytree(ep0.test_ledger, ep.test_ledger)
    opened = []

    class Refuse(io.ShardReader):
        def __init__(self, *a, **kw):
            opened.append(a)
            raise AssertionError("a shard reader was opened")

    monkeypatch.setattr(io, "ShardReader", Refuse)
    res = evaluate.run(CFG, ep)
    assert not opened and res.decision == "recorded_result_returned"
    before, after = Path(ep0.evaluate_dir), Path(ep.evaluate_dir)
    for name in ("feature_duplicates.json", "feature_duplicates.png", "summary.md"):
        if name != "summary.md":  # summary.md says how the result was obtained (ledger status), the rest is equal
            assert (after / name).read_bytes() == (before / name).read_bytes(), name
    assert "## Feature-space near-duplicates" in (after / "summary.md").read_text()
    m0, m = json.loads(Path(ep0.test_metrics).read_text()), json.loads(Path(ep.test_metrics).read_text())
    assert m.pop("reused_result") is True and m0.pop("reused_result") is False and m == m0
    assert (res.accuracy_dedup, res.feature_dup_count) == (res0.accuracy_dedup, res0.feature_dup_count)


# ---------------------------------------------------------------- switched off
def test_the_audit_switched_off_says_so_and_reads_no_train(digits_trained, tmp_path, monkeypatch, capfd):
    p, _ = digits_trained
    ep = eval_paths(p, tmp_path)
    spy, log = spy_reader()
    monkeypatch.setattr(io, "ShardReader", spy)
    res = evaluate.run(EvaluateConfig(feature_audit=False), ep)
    assert log["opened"] == ["test"] and res.accuracy_dedup is None and res.feature_dup_count is None
    metrics = json.loads(Path(ep.test_metrics).read_text())
    assert metrics["feature_audit"] == "off: evaluate.feature_audit is false"
    assert [metrics[k] for k in ("test_accuracy_dedup", "feature_dup_count", "feature_dup_fraction",
                                 "feature_dup_threshold")] == [None] * 4
    d = Path(ep.evaluate_dir)
    assert json.loads((d / "feature_duplicates.json").read_text()) == {
        "enabled": False, "reason": "evaluate.feature_audit is false"}
    assert Image.open(d / "feature_duplicates.png").format == "PNG"
    assert "feature-space audit off: evaluate.feature_audit is false" in (d / "summary.md").read_text()
    assert "evaluate: feature-space audit off: evaluate.feature_audit is false" in capfd.readouterr().err
    # the same model again, audit on now: the recorded result stands (no second read) and the log says why
    monkeypatch.undo()
    again = evaluate.run(EvaluateConfig(), ep)
    assert again.decision == "recorded_result_returned" and again.accuracy_dedup is None
    assert "the test split is read once per model: the recorded result stands" in capfd.readouterr().err
