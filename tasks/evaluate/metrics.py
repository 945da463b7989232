"""Scoring: the model's class probabilities on every test row (with its test-time views), and the metrics computed
from them: accuracy, macro F1, per-class precision/recall/F1, confusion matrix, NLL, ECE with reliability bins."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from tasks.core import io, progress


def predict(model, reader: io.ShardReader, mean: list[float], std: list[float], batch_size: int,
            device, tta: str = "none", on_features: Callable[[np.ndarray, np.ndarray, list[str]], None] | None = None,
            ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Class probabilities float32 [N,K], labels int64 [N] and ids of every row the reader yields; ``tta``: the
    model's test-time views (``train.tta``), averaged as in validation and serving.

    ``on_features(images, features, ids)``: called per batch, in the same pass, with the batch's uint8 images (a
    view of the shard: copy what you keep) and the penultimate features of the plain view (the input of the final
    classifier, float32 [B, D]; ``feature_audit.FeatureTap``)."""
    import contextlib

    import torch

    from tasks.evaluate.feature_audit import FeatureTap
    from tasks.model.views import Normalize, tta_logits

    model = model.to(device).eval()
    norm = Normalize(mean, std).to(device)
    probs, labels, ids = [], [], []
    with torch.no_grad(), (FeatureTap(model) if on_features is not None else contextlib.nullcontext()) as tap, \
            progress.progress(total=len(reader), desc="evaluate", unit="row") as bar:
        for x, y, i in reader.iter_batches(batch_rows=batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2)
            if tap is not None:
                tap.arm()  # tta_logits runs the plain view first: that call is the one tapped
            logits = tta_logits(model, norm(xb.float()), tta)[0].float()  # Normalize takes 0..255, as training
            if tap is not None:
                on_features(x, tap.take().float().cpu().numpy(), i)
            probs.append(torch.softmax(logits, dim=1).cpu().numpy().astype(np.float32))
            labels.append(y)
            ids.extend(i)
            bar.update(len(y))
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


def predictions_table(ids: list[str], labels: np.ndarray, probs: np.ndarray) -> pa.Table:
    """id, label, pred, probs (list<float32>): the recorded predictions of one read."""
    k = probs.shape[1]
    offsets = pa.array(np.arange(0, (len(ids) + 1) * k, k, dtype=np.int32))
    return pa.table({"id": pa.array(ids, pa.string()), "label": pa.array(labels.astype(np.int64)),
                     "pred": pa.array(probs.argmax(1).astype(np.int64)),
                     "probs": pa.ListArray.from_arrays(offsets, pa.array(probs.reshape(-1), pa.float32()))})
