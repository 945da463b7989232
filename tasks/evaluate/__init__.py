"""keel evaluate: the only reader of the sealed test split, and the test-access ledger that keeps it honest.

The stage scores ``<models_dir>/best.pt`` on the test shards once per model and records every access decision.

Model identity
    ``model_sha256`` = sha256 over the checkpoint's state dict (keys sorted; per tensor: key, dtype, shape, bytes)
    then the model name (see ``model_sha256``).  It is not the file hash: best.pt also embeds git SHA, timings and lineage, which change
    without the weights changing.

Ledger  (``paths.test_ledger``; deliberately NOT a DVC output: DVC deletes a stage's outputs before it runs, and
this record must outlive every run)
    ``ledger.jsonl``   append-only, one JSON object per access decision, appended and fsync'd while holding an
                       exclusive ``fcntl.flock`` on ``ledger.lock`` (the lock is held from the decision until the
                       entry is written, so two concurrent evaluations cannot both take "the first look").
    ``results/<model_sha256>.json``               the full result of a read (all metrics, confusion matrix,
                                                  per-class table, reliability bins, lineage)
    ``results/<model_sha256>.predictions.parquet`` id, label, pred, probs (list<float32>)

    Entry fields: ``time`` (UTC ISO), ``action`` (``read`` | ``recorded_result_returned`` | ``refused``),
    ``model_sha256``, ``model_name``, ``checkpoint``, ``tracking_run_id``, ``train_git_sha``/``train_git_dirty``
    (from the checkpoint), ``git_sha``/``git_dirty`` (now), ``manifest_sha256`` (which frozen test split),
    ``shard_index_sha256``, ``test_rows``, ``looks`` (distinct models that have read this manifest's test split,
    this one included when it read), ``policy`` (evaluate.second_look), and for reads ``metrics`` (headline),
    ``test_reused``, ``result_sha256``/``predictions_sha256`` (of the two result files: a recorded result is
    only returned when both still match) and ``note``; for recorded returns ``returned_read_time``; for refusals
    ``reason``.

Decisions (all taken under the lock)
    * same model_sha256 with a ``read`` on the same manifest: the test shards are not opened; the outputs are
      rebuilt from the recorded result and a ``recorded_result_returned`` entry is appended.
    * a first model on a manifest: read, record the result, append ``read``.
    * a different model on a manifest another model has read (a second look): ``strict`` appends ``refused`` and
      raises ``SecondLookRefused``; ``warn`` reads and marks the result ``test_reused: true, test_looks: N``.

A result is always recorded (results/*) before its ``read`` entry, so every ``read`` entry has a result to return.
Should a recorded result be missing or altered (checksums in the entry), the same model is scored again: another
``read`` entry with a ``note``, the same look number as its first read, no refusal (it is not a new look).
"""
from __future__ import annotations

import contextlib
import csv
import io as _bytes_io
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core import io, lineage
from tasks.core.config import EvaluateConfig, Paths
from tasks.core.lineage import model_sha256

OUTPUT_FILES = ("confusion.png", "confusion.csv", "per_class.csv", "reliability.png", "predictions.parquet",
                "summary.md")
PREPROCESSING_FIELDS = ("classes", "resolution", "channels", "mean", "std", "resize", "background")


class EvaluateError(io.DataError):
    """A problem the user can act on (missing or mismatched checkpoint, wrong data version, ledger damage)."""


class SecondLookRefused(EvaluateError):
    """A different model asked for a test split that another model has already been scored on (strict policy)."""


@dataclass
class EvaluateResult:
    decision: str  # "read" | "recorded_result_returned"
    model_sha256: str
    model_name: str
    manifest_sha256: str
    accuracy: float
    macro_f1: float
    loss: float
    ece: float
    rows: int
    looks: int
    test_reused: bool
    reused_result: bool
    metrics: dict  # what paths.test_metrics holds


# ---------------------------------------------------------------- checkpoint


def _load_checkpoint(path: Path) -> dict:
    import pickle

    import torch

    if not path.exists():
        raise EvaluateError(f"{path}: no best checkpoint; run `keel train` first (or `dvc repro train`)")
    try:
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # objects outside the safe allow-list: a keel checkpoint is trusted input
            blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means an unusable file
        raise EvaluateError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
                            "re-run `keel train` (or `dvc checkout` to restore it)") from None
    need = ("model", "index", "run_info")
    if not isinstance(blob, dict) or any(k not in blob for k in need) or not isinstance(blob["model"], dict):
        keys = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise EvaluateError(f"{path}: not a keel best checkpoint (needs {list(need)}, has {keys}); "
                            "re-run `keel train`")
    if not isinstance(blob["run_info"].get("config"), dict):
        raise EvaluateError(f"{path}: run_info has no training config; re-run `keel train`")
    return blob


def _check_data(ckpt: dict, index: io.ShardIndex, ckpt_path: Path, shards_dir: str) -> None:
    """The checkpoint's preprocessing and split must be those of the shards it is about to be scored on."""
    pre = ckpt["index"]
    for name in PREPROCESSING_FIELDS:
        if name not in pre:
            if name in ("resize", "background"):
                continue  # older checkpoints did not record them
            raise EvaluateError(f"{ckpt_path}: preprocessing record lacks {name!r}; re-run `keel train`")
        ours, theirs = pre[name], getattr(index, name)
        if name in ("mean", "std"):
            same = len(ours) == len(theirs) and np.allclose(ours, theirs, rtol=0, atol=1e-6)
        else:
            same = list(ours) == list(theirs) if isinstance(theirs, list) else ours == theirs
        if not same:
            raise EvaluateError(
                f"{ckpt_path} was trained with {name}={ours!r} but the shards at {shards_dir} have "
                f"{name}={theirs!r}; the model does not match this data: re-run `keel train` on these shards "
                "(or restore the matching shards with `dvc checkout`)")
    trained_on = ckpt["run_info"].get("split_manifest_sha256")
    if trained_on is None:
        print(f"evaluate: warning: {ckpt_path} does not record its split manifest; cannot check it was trained "
              "on this split", file=sys.stderr)
    elif trained_on != index.manifest_sha256:
        raise EvaluateError(
            f"{ckpt_path} was trained on split manifest {trained_on[:12]}… but the shards at {shards_dir} come "
            f"from manifest {index.manifest_sha256[:12]}…: the model was trained on a different split, so this "
            "test set may overlap its training data; re-run `keel train` on the current shards")


def _build(ckpt: dict, ckpt_path: Path):
    """The network of the checkpoint with its weights loaded strictly; readable errors for a misfit."""
    from pydantic import ValidationError

    from tasks.core.config import TrainConfig
    from tasks.model.build import ModelConfigError, build_model

    config = dict(ckpt["run_info"]["config"])
    name = ckpt.get("model_name") or config.get("model")
    if config.get("model") != name:
        raise EvaluateError(f"{ckpt_path}: inconsistent checkpoint: model_name={name!r} but its training config "
                            f"says model={config.get('model')!r}; re-run `keel train`")
    known = {k: v for k, v in config.items() if k in TrainConfig.model_fields}
    # weights come from the checkpoint: never fetch hub weights or read an init checkpoint here
    known.update(pretrained="none", init_checkpoint=None)
    try:
        cfg = TrainConfig(**known)
        pre = ckpt["index"]
        model, _ = build_model(cfg, num_classes=len(pre["classes"]), in_chans=int(pre["channels"]),
                               resolution=int(pre["resolution"]))
    except (ValidationError, ModelConfigError) as exc:
        raise EvaluateError(f"{ckpt_path}: cannot rebuild model {name!r} from its training config: {exc}") from None
    state = ckpt["model"]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), first: {'; '.join(shapes[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), first: {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first: {unexpected[:3]}")
        raise EvaluateError(f"{ckpt_path}: the weights do not fit model {name!r} ({', '.join(parts)}); the "
                            "checkpoint's weights are not the architecture its config names (wrong or corrupt "
                            "file): re-run `keel train`")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EvaluateError(f"{ckpt_path}: the weights do not load into model {name!r}: {str(exc)[:500]}") from None
    return model, name


# ---------------------------------------------------------------- ledger
class Ledger:
    """The append-only test-access record of one project (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.path = self.root / "ledger.jsonl"
        self.results = self.root / "results"

    @contextlib.contextmanager
    def locked(self) -> Iterator[Ledger]:
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "ledger.lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield self
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                raise EvaluateError(f"{self.path}:{n}: unreadable ledger entry; the test-access record is damaged "
                                    "(inspect it, restore it from a backup; never delete it to get another look)"
                                    ) from None
        return out

    def append(self, entry: dict) -> None:
        line = (json.dumps(entry, sort_keys=False, default=io._json_default) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write on an O_APPEND descriptor: the line lands whole
            os.fsync(fd)
        finally:
            os.close(fd)

    def result_paths(self, sha: str) -> tuple[Path, Path]:
        return self.results / f"{sha}.json", self.results / f"{sha}.predictions.parquet"


def readers(entries: list[dict], manifest_sha: str) -> dict[str, dict]:
    """model_sha256 -> its first ``read`` entry, for the models that read this manifest's test split (in order)."""
    out: dict[str, dict] = {}
    for e in entries:
        if e.get("action") == "read" and e.get("manifest_sha256") == manifest_sha:
            out.setdefault(e["model_sha256"], e)
    return out


def latest_read(entries: list[dict], model_sha: str, manifest_sha: str) -> dict | None:
    """The newest ``read`` entry of one model on one manifest (it names the result file's current checksum)."""
    hits = [e for e in entries if e.get("action") == "read" and e.get("model_sha256") == model_sha
            and e.get("manifest_sha256") == manifest_sha]
    return hits[-1] if hits else None


def _refusal(prior: dict[str, dict], sha: str, name: str, manifest_sha: str, ledger: Path) -> str:
    first = next(iter(prior.values()))
    others = len(prior) - 1
    run = f", tracking run {first['tracking_run_id']}" if first.get("tracking_run_id") else ""
    return (
        f"second look at the sealed test split refused (evaluate.second_look: strict). The test split of manifest "
        f"{manifest_sha[:12]}… was already used to score model {first['model_sha256'][:12]}… ({first['model_name']}, "
        f"{first['checkpoint']}{run}) at {first['time']}"
        + (f", and {others} other model(s) since" if others else "")
        + f". This model ({sha[:12]}…, {name}) would be look #{len(prior) + 1}: every extra look at the same test "
        "set biases the estimate toward models that happen to fit that test set, so its number stops measuring "
        "generalisation.\nHow to proceed:\n"
        "  - select between models on the val split (train's best_val_accuracy) and evaluate only the one you pick;\n"
        "  - or carve a fresh held-out set: add new data (or a new source test split) and run `keel split "
        "--refreeze`, then shard/train/evaluate again (a refreeze voids earlier test results);\n"
        "  - or knowingly accept a reused test set: set evaluate.second_look: warn (the result is marked "
        "test_reused with the number of looks).\n"
        f"The refusal is recorded in {ledger}.")


# ---------------------------------------------------------------- inference and metrics
def _device(want: str):
    import torch

    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise EvaluateError("evaluate.device=cuda but no CUDA device is available; set evaluate.device: cpu or auto")
    return torch.device(want)


def predict(model, reader: io.ShardReader, mean: list[float], std: list[float], batch_size: int,
            device, tta: str = "none") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Class probabilities float32 [N,K], labels int64 [N] and ids of every row the reader yields; ``tta``: the
    model's test-time views (``train.tta``), averaged as in validation and serving."""
    import torch

    from tasks.model.views import Normalize, tta_logits

    model = model.to(device).eval()
    norm = Normalize(mean, std).to(device)
    total, done, t0, last = len(reader), 0, time.monotonic(), time.monotonic()
    probs, labels, ids = [], [], []
    with torch.no_grad():
        for x, y, i in reader.iter_batches(batch_rows=batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2)
            logits = tta_logits(model, norm(xb.float()), tta)[0].float()  # Normalize takes 0..255, as training
            probs.append(torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32))
            labels.append(y)
            ids.extend(i)
            done += len(y)
            now = time.monotonic()
            if now - last > 2.0:
                last = now
                print(f"evaluate: {done}/{total} test rows ({done / max(now - t0, 1e-9):,.0f}/s)", file=sys.stderr,
                      flush=True)
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), []
    return np.concatenate(probs), np.concatenate(labels), ids


def compute_metrics(probs: np.ndarray, labels: np.ndarray, classes: list[str], bins: int) -> dict:
    """Accuracy, macro F1, per-class precision/recall/F1/support, confusion matrix, NLL, ECE + reliability bins."""
    k, n = len(classes), len(labels)
    pred = probs.argmax(1)
    cm = np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = (support > 0) | (predicted > 0)  # as scikit-learn: classes seen in labels or predictions
    p_true = probs[np.arange(n), labels].astype(np.float64)
    nll = float(-np.log(np.clip(p_true, 1e-12, None)).mean())
    conf = probs.max(1).astype(np.float64)
    correct = (pred == labels).astype(np.float64)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)  # bins (lo, hi]
    table, ece = [], 0.0
    for b in range(bins):
        m = which == b
        c = int(m.sum())
        row = {"lower": b / bins, "upper": (b + 1) / bins, "count": c,
               "confidence": float(conf[m].mean()) if c else None, "accuracy": float(correct[m].mean()) if c else None}
        if c:
            ece += c / n * abs(row["accuracy"] - row["confidence"])
        table.append(row)
    return {
        "accuracy": float(correct.mean()),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "loss": nll,
        "ece": float(ece),
        "rows": int(n),
        "confusion_matrix": cm.tolist(),
        "per_class": [{"class": c, "precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                       "support": int(support[j])} for j, c in enumerate(classes)],
        "reliability": table,
    }


def _predictions_table(ids: list[str], labels: np.ndarray, probs: np.ndarray) -> pa.Table:
    k = probs.shape[1]
    offsets = pa.array(np.arange(0, (len(ids) + 1) * k, k, dtype=np.int32))
    return pa.table({"id": pa.array(ids, pa.string()), "label": pa.array(labels.astype(np.int64)),
                     "pred": pa.array(probs.argmax(1).astype(np.int64)),
                     "probs": pa.ListArray.from_arrays(offsets, pa.array(probs.reshape(-1), pa.float32()))})


# ---------------------------------------------------------------- outputs
def _headline(result: dict, reused_result: bool) -> dict:
    m = result["metrics"]
    return {"test_accuracy": m["accuracy"], "test_macro_f1": m["macro_f1"], "test_loss": m["loss"],
            "test_ece": m["ece"], "test_rows": m["rows"], "test_looks": result["looks"],
            "test_reused": result["test_reused"], "model_sha256": result["model_sha256"],
            "manifest_sha256": result["manifest_sha256"], "reused_result": reused_result}


def _csv_text(header: list[str], rows: list[list]) -> str:
    buf = _bytes_io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _png(path: Path, fig) -> None:
    import matplotlib.pyplot as plt

    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    with io.atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def _plot_confusion(path: Path, cm: np.ndarray, classes: list[str], accuracy: float) -> None:
    import matplotlib.pyplot as plt

    k = len(classes)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    side = min(max(4.0, 0.55 * k + 2), 30.0)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the actual class (row)")
    ax.set_xticks(range(k), classes, rotation=90 if k > 10 or max(map(len, classes)) > 4 else 0)
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(f"test confusion matrix (accuracy {accuracy:.4f}, {int(cm.sum())} items)")
    if k <= 40:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    _png(path, fig)


def _plot_reliability(path: Path, table: list[dict], ece: float, bins: int) -> None:
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / bins
    centres = [(r["lower"] + r["upper"]) / 2 for r in table]
    used = [r for r in table if r["count"]]
    top.bar(centres, [r["accuracy"] or 0.0 for r in table], width=width, edgecolor="black", alpha=0.8,
            label="accuracy")
    mid = [(r["lower"] + r["upper"]) / 2 for r in used]
    top.vlines(mid, [r["accuracy"] for r in used], [r["confidence"] for r in used], color="red", lw=2,
               label="gap (accuracy vs confidence)")
    top.scatter(mid, [r["confidence"] for r in used], marker="_", s=300 * width * 15, color="red", zorder=3,
                label="mean confidence")
    top.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.set_title(f"reliability (ECE {ece:.4f}, {bins} bins)")
    top.legend(loc="upper left")
    bottom.bar(centres, [r["count"] for r in table], width=width, edgecolor="black")
    bottom.set_xlabel("confidence (max probability)")
    bottom.set_ylabel("items")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    _png(path, fig)


def _summary_md(result: dict, headline: dict, ledger_status: str) -> str:
    m, classes = result["metrics"], result["classes"]
    cm = np.asarray(m["confusion_matrix"])
    lines = [f"# Test evaluation: {result['model_name']}", "",
             (f"- accuracy **{m['accuracy']:.4f}**, macro F1 **{m['macro_f1']:.4f}**, NLL loss {m['loss']:.4f}, "
              f"ECE {m['ece']:.4f} ({len(m['reliability'])} bins)"),
             f"- {m['rows']} test items, {len(classes)} classes",
             f"- model `{result['model_sha256']}` ({result['checkpoint']}), scored {result['time']}",
             (f"- frozen test split: manifest `{result['manifest_sha256']}`, shard index "
              f"`{result['shard_index_sha256']}`"),
             f"- test looks on this split: {result['looks']}"
             + (" — **test set reused**: this estimate is biased toward models that fit this test set"
                if result["test_reused"] else " (first look)"),
             "", "## Ledger", "", ledger_status, "", "## Per class", "",
             "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['class']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |"
              for r in m["per_class"]]
    off = [(int(cm[i, j]), classes[i], classes[j]) for i in range(len(classes)) for j in range(len(classes))
           if i != j and cm[i, j] > 0]
    off.sort(key=lambda t: (-t[0], t[1], t[2]))
    lines += ["", "## Most confused pairs (actual → predicted)", ""]
    if off:
        lines += ["| actual | predicted | count | share of actual |", "|---|---|---:|---:|"]
        support = cm.sum(1)
        lines += [f"| {a} | {p} | {c} | {c / support[classes.index(a)]:.1%} |" for c, a, p in off[:10]]
    else:
        lines.append("none: every test item was classified correctly")
    return "\n".join(lines) + "\n"


def write_outputs(paths: Paths, result: dict, pred_table: pa.Table, reused_result: bool, ledger_status: str) -> dict:
    """Every stage output, rendered from one recorded result (so a returned result reproduces them exactly)."""
    out = Path(paths.evaluate_dir)
    classes, m = result["classes"], result["metrics"]
    labels = pred_table.column("label").to_numpy()
    preds = pred_table.column("pred").to_numpy()
    names = np.asarray(classes, dtype=object)
    cm = np.asarray(m["confusion_matrix"])
    io.write_text(out / "confusion.csv", _csv_text(["actual", "predicted"],
                                                   [[names[a], names[p]] for a, p in zip(labels, preds)]))
    io.write_text(out / "per_class.csv", _csv_text(
        ["class", "precision", "recall", "f1", "support"],
        [[r["class"], f"{r['precision']:.6f}", f"{r['recall']:.6f}", f"{r['f1']:.6f}", r["support"]]
         for r in m["per_class"]]))
    full = pa.table({"id": pred_table.column("id"), "label": pred_table.column("label"),
                     "pred": pred_table.column("pred"),
                     "label_name": pa.array(names[labels].tolist(), pa.string()),
                     "pred_name": pa.array(names[preds].tolist(), pa.string()),
                     "probs": pred_table.column("probs")})
    io.write_table(out / "predictions.parquet", full)
    try:
        import matplotlib
    except ImportError:  # e.g. a GPU node with torch + timm + pyarrow only: the CSVs carry the same numbers
        print("evaluate: matplotlib not installed; skipping confusion.png and reliability.png", file=sys.stderr)
    else:
        matplotlib.use("Agg")
        _plot_confusion(out / "confusion.png", cm, classes, m["accuracy"])
        _plot_reliability(out / "reliability.png", m["reliability"], m["ece"], len(m["reliability"]))
    headline = _headline(result, reused_result)
    io.write_text(out / "summary.md", _summary_md(result, headline, ledger_status))
    io.write_json(paths.test_metrics, headline)  # last: its presence means the stage finished
    return headline


def _remove_stale_outputs(paths: Paths, sha: str) -> None:
    """After a refusal, outputs describing another model must not sit beside this best.pt (DVC would have removed
    them too); only the files this stage writes are touched."""
    metrics = Path(paths.test_metrics)
    try:
        stale = json.loads(metrics.read_text()).get("model_sha256") != sha if metrics.exists() else False
    except (OSError, ValueError):
        stale = True
    if stale:
        metrics.unlink(missing_ok=True)
        for name in OUTPUT_FILES:
            (Path(paths.evaluate_dir) / name).unlink(missing_ok=True)
        print(f"evaluate: removed {metrics} and {paths.evaluate_dir}/* of an earlier model (they do not describe "
              "this best.pt; evaluating that model again restores them from the ledger)", file=sys.stderr)


# ---------------------------------------------------------------- the stage
def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _load_recorded(ledger: Ledger, entry: dict) -> tuple[dict, pa.Table] | None:
    res_path, pred_path = ledger.result_paths(entry["model_sha256"])
    try:
        if io.sha256_file(res_path) != entry.get("result_sha256") or \
                io.sha256_file(pred_path) != entry.get("predictions_sha256"):
            return None
        result = json.loads(res_path.read_text())
        if result.get("model_sha256") != entry["model_sha256"] or \
                result.get("manifest_sha256") != entry["manifest_sha256"]:
            return None
        return result, pq.read_table(pred_path)
    except (OSError, ValueError, pa.ArrowInvalid):
        return None


def run(cfg: EvaluateConfig, paths: Paths) -> EvaluateResult:
    """Score best.pt on the sealed test split once per model; see the module docstring for the ledger contract."""
    t0 = time.monotonic()
    ckpt_path = Path(paths.models_dir) / "best.pt"
    index = io.ShardIndex.load(paths.shards_dir)
    ckpt = _load_checkpoint(ckpt_path)
    _check_data(ckpt, index, ckpt_path, paths.shards_dir)
    model, name = _build(ckpt, ckpt_path)
    device = _device(cfg.device)  # fail before any access decision
    sha = model_sha256(ckpt["model"], name)
    manifest_sha = index.manifest_sha256
    rows = index.rows("test")
    if rows == 0:
        raise EvaluateError(f"{paths.shards_dir}: the test split has no rows; nothing to evaluate "
                            "(check the split fractions and re-run `keel split`/`keel shard`)")
    info = ckpt["run_info"]
    git = lineage.git_state()
    base = {"model_sha256": sha, "model_name": name, "checkpoint": str(ckpt_path),
            "tracking_run_id": info.get("tracking_run_id"), "train_git_sha": info.get("git_sha"),
            "train_git_dirty": info.get("git_dirty"), "git_sha": git["git_sha"], "git_dirty": git["git_dirty"],
            "manifest_sha256": manifest_sha,
            "shard_index_sha256": io.sha256_file(Path(paths.shards_dir) / "index.json"), "test_rows": rows,
            "policy": cfg.second_look}
    ledger = Ledger(paths.test_ledger)
    with ledger.locked():
        entries = ledger.entries()
        prior = readers(entries, manifest_sha)
        last_read = latest_read(entries, sha, manifest_sha)
        recorded = _load_recorded(ledger, last_read) if last_read else None
        if recorded is not None:
            result, pred_table = recorded
            decision, note = "recorded_result_returned", None
            ledger.append({"time": _now(), "action": decision, **base, "looks": len(prior),
                           "returned_read_time": result["time"]})
        else:
            rescore = sha in prior  # its recorded result is gone or altered: scoring it again is not a new look
            order = list(prior)
            others = {k: prior[k] for k in order[:order.index(sha)]} if rescore else prior  # looked before it
            looks = len(others) + 1
            if others and not rescore and cfg.second_look == "strict":
                msg = _refusal(others, sha, name, manifest_sha, ledger.path)
                ledger.append({"time": _now(), "action": "refused", **base, "looks": len(prior),
                               "reason": f"second look (would be look #{looks}); earlier readers: "
                                         f"{[k[:12] for k in others]}"})
                _remove_stale_outputs(paths, sha)
                raise SecondLookRefused(msg)
            note = "recorded result missing or altered; the same model re-scored (not a new look)" if rescore else None
            if note:
                print(f"evaluate: warning: {note}", file=sys.stderr)
            if others:
                earlier = ", ".join(f"{k[:12]}… ({v['model_name']}, {v['time']})" for k, v in others.items())
                print(f"evaluate: warning: test set reused (evaluate.second_look: {cfg.second_look}): look #{looks} "
                      f"at the test split of manifest {manifest_sha[:12]}…, already used to score {earlier}; "
                      "this estimate is biased toward models that happen to fit this test set", file=sys.stderr)
            reader = io.ShardReader(paths.shards_dir, "test", reader_of=io._TEST_READER_TOKEN)
            pre = ckpt["index"]
            tta = ckpt["run_info"]["config"].get("tta", "none")
            probs, labels, ids = predict(model, reader, pre["mean"], pre["std"], cfg.batch_size, device, tta)
            metrics = compute_metrics(probs, labels, list(pre["classes"]), cfg.calibration_bins)
            result = {**base, "time": _now(), "classes": list(pre["classes"]), "looks": looks, "tta": tta,
                      "test_reused": bool(others), "earlier_readers": list(others), "metrics": metrics}
            pred_table = _predictions_table(ids, labels, probs)
            res_path, pred_path = ledger.result_paths(sha)
            io.write_table(pred_path, pred_table)
            io.write_json(res_path, result)
            decision = "read"
            headline = {k: v for k, v in _headline(result, False).items()
                        if k in ("test_accuracy", "test_macro_f1", "test_loss", "test_ece")}
            ledger.append({"time": result["time"], "action": decision, **base, "looks": looks, "metrics": headline,
                           "test_reused": bool(others), "result_sha256": io.sha256_file(res_path),
                           "predictions_sha256": io.sha256_file(pred_path), "note": note})
    total_looks = len(readers(ledger.entries(), manifest_sha))
    if decision == "read":
        status = (f"Read the sealed test split (look #{result['looks']} on this split) at {result['time']}; "
                  f"recorded in `{ledger.path}`" + (f" ({note})" if note else "") + ".")
    else:
        status = (f"Recorded result returned: this model was scored at {result['time']}; the test shards were not "
                  f"opened again (`{ledger.path}`). Models scored on this split so far: {total_looks}.")
    headline = write_outputs(paths, result, pred_table, decision != "read", status)
    m = result["metrics"]
    if decision == "read":
        said = f"read, look #{result['looks']}" + (" (TEST SET REUSED)" if result["test_reused"] else "")
    else:
        said = "recorded result returned (test shards not opened)"
    print(f"evaluate: {name} {sha[:12]}… on {m['rows']} test items: accuracy {m['accuracy']:.4f}, macro F1 "
          f"{m['macro_f1']:.4f}, ECE {m['ece']:.4f}; ledger: {said} [{time.monotonic() - t0:.1f}s]", file=sys.stderr)
    return EvaluateResult(decision=decision, model_sha256=sha, model_name=name, manifest_sha256=manifest_sha,
                          accuracy=m["accuracy"], macro_f1=m["macro_f1"], loss=m["loss"], ece=m["ece"],
                          rows=m["rows"], looks=result["looks"], test_reused=result["test_reused"],
                          reused_result=decision != "read", metrics=headline)


__all__ = ["EvaluateError", "EvaluateResult", "Ledger", "SecondLookRefused", "compute_metrics", "model_sha256",
           "predict", "readers", "run", "write_outputs"]
