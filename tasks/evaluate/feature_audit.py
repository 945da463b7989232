"""The feature-space leakage audit: test items whose nearest train item, in the trained model's own penultimate
features, is closer than train items usually are to one another (the look of ciFAIR, Barz & Denzler 2020, "Do we
train on test data?"), and the test accuracy with and without them.

The split stage already keeps exact (pixel hash) and near (pHash) duplicates inside one split; this looks again,
after training, in the space the model itself uses: a test item that the model cannot tell apart from a train item
is not an independent test of generalisation.

Space
    the input of the model's final classifier (``get_classifier()``, timm's interface, which keel's own nets
    implement too), captured by a forward pre-hook (``FeatureTap``) on the plain view: with test-time views the
    first forward call of ``tta_logits`` is the plain image, and only that call is tapped. Features are
    L2-normalised; distance = cosine distance = 1 - cosine similarity, in [0, 2].
Threshold (calibrated on train-vs-train)
    for each train item, the distance to its nearest OTHER train item (itself excluded; exact duplicates inside
    train count as ~0); threshold = the ``evaluate.feature_dup_quantile`` quantile of those distances (linear
    interpolation). A test item is a feature-space near-duplicate when its nearest train item is at distance
    <= threshold + ``FLOAT_TOLERANCE`` (float32 noise of unit vectors: an exact copy must not miss a threshold of
    ~0 by 1e-7).
Search
    exact: faiss ``IndexFlatIP`` on the normalised train features (imported lazily). Train features are held in
    memory (N_train x D float32) and each test batch is searched as it is scored, so the test split is read once
    and only the images of the closest flagged test items are kept (for the picture).

Pure compute (arrays in, arrays/dicts out): ``l2_normalise``, ``FeatureIndex``, ``nearest``, ``calibrate``,
``dedup_accuracy``, ``summarise``, ``disabled``, ``headline``. Glue for ``stage``: ``FeatureTap``, ``check_tap``,
``embed``, ``TestSearch``, ``read_rows``, ``pair_images``. Rendering for ``report``: ``render_pairs``.
"""
from __future__ import annotations

import base64
import io as _bytes_io
import sys
import time
from dataclasses import dataclass, field
from typing import Self

import numpy as np

from tasks.core import io
from tasks.evaluate.errors import EvaluateError

FLOAT_TOLERANCE = 1e-6  # cosine distances of float32 unit vectors: an identical pair may come out as ~6e-8
SHEET_PAIRS = 16  # the closest flagged pairs shown in feature_duplicates.png (and kept in the recorded result)
TILE = 72  # picture tile size in pixels (as the ingest audit's contact sheet)


# ---------------------------------------------------------------- pure compute
def l2_normalise(feats: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (float32, C-contiguous, as faiss wants); an all-zero row stays zero."""
    f = np.ascontiguousarray(feats, dtype=np.float32).reshape(len(feats), -1)
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    return np.ascontiguousarray(np.divide(f, norm, out=np.zeros_like(f), where=norm > 0))


class FeatureIndex:
    """Exact cosine nearest-neighbour search over L2-normalised rows (faiss ``IndexFlatIP``)."""

    def __init__(self, base: np.ndarray):
        import faiss

        self.base = l2_normalise(base)
        self.index = faiss.IndexFlatIP(self.base.shape[1])
        self.index.add(self.base)

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, query: np.ndarray, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(cosine distance float64 [N], base row int64 [N]) of each query row's nearest base row. ``exclude_self``:
        the query is the base itself (row i is base row i) and a row's own entry is skipped; an exact duplicate
        elsewhere in the base is still a neighbour (distance ~0)."""
        q = l2_normalise(query)
        if len(q) == 0:
            return np.zeros(0), np.zeros(0, np.int64)
        k = 2 if exclude_self else 1
        if len(self) < k:
            raise ValueError(f"nearest neighbours need at least {k} base row(s), have {len(self)}")
        sims, idx = self.index.search(q, k)
        if exclude_self:
            own = idx[:, 0] == np.arange(len(q))
            sims = np.where(own, sims[:, 1], sims[:, 0])
            idx = np.where(own, idx[:, 1], idx[:, 0])
        else:
            sims, idx = sims[:, 0], idx[:, 0]
        return np.clip(1.0 - sims.astype(np.float64), 0.0, 2.0), idx.astype(np.int64)


def nearest(base: np.ndarray, query: np.ndarray, exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Each query row's cosine distance to, and row of, its nearest base row (see ``FeatureIndex.search``)."""
    return FeatureIndex(base).search(query, exclude_self)


def calibrate(train_nn_distance: np.ndarray, quantile: float) -> float:
    """The threshold: the ``quantile`` quantile (linear interpolation) of each train item's distance to its
    nearest other train item."""
    if not 0 < quantile < 0.5:
        raise ValueError(f"quantile must be > 0 and < 0.5, got {quantile!r}")
    if len(train_nn_distance) == 0:
        raise ValueError("no train-vs-train distances to calibrate on")
    return float(np.quantile(np.asarray(train_nn_distance, np.float64), quantile))


def flagged_mask(test_nn_distance: np.ndarray, threshold: float) -> np.ndarray:
    return np.asarray(test_nn_distance) <= threshold + FLOAT_TOLERANCE


def dedup_accuracy(correct: np.ndarray, flagged: np.ndarray) -> float | None:
    """Accuracy over the items not flagged (None when every item is flagged)."""
    keep = ~np.asarray(flagged, bool)
    return float(np.asarray(correct, np.float64)[keep].mean()) if keep.any() else None


def _quantiles(d: np.ndarray) -> dict:
    if len(d) == 0:
        return {}
    q = np.quantile(d, [0.0, 0.01, 0.05, 0.5, 1.0])
    return {"min": float(q[0]), "p01": float(q[1]), "p05": float(q[2]), "median": float(q[3]), "max": float(q[4]),
            "mean": float(np.mean(d))}


def summarise(*, quantile: float, threshold: float, train_nn_distance: np.ndarray, train_ids: list[str],
              train_labels: np.ndarray, test_ids: list[str], labels: np.ndarray, preds: np.ndarray,
              test_nn_distance: np.ndarray, test_nn_row: np.ndarray, classes: list[str], space: dict) -> dict:
    """The audit's record (what the recorded result holds, minus the pictures' pixels): every flagged test item
    (sorted by distance), the threshold and how it was obtained, counts, accuracy on all items and on the others."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    flagged = flagged_mask(test_nn_distance, threshold)
    correct = preds == labels
    order = sorted(np.flatnonzero(flagged).tolist(), key=lambda i: (float(test_nn_distance[i]), test_ids[i]))
    rows = []
    for i in order:
        j = int(test_nn_row[i])
        tl = int(train_labels[j])
        rows.append({"id": test_ids[i], "label": classes[int(labels[i])], "pred": classes[int(preds[i])],
                     "train_id": train_ids[j], "train_label": classes[tl], "distance": float(test_nn_distance[i]),
                     "correct": bool(correct[i]), "same_label": tl == int(labels[i])})
    n, k = len(test_ids), int(flagged.sum())
    return {"enabled": True, **space, "quantile": float(quantile), "threshold": float(threshold),
            "tolerance": FLOAT_TOLERANCE,
            "rule": "flagged: cosine distance to the nearest train item <= threshold (+ tolerance); threshold: "
                    "the quantile of each train item's distance to its nearest other train item",
            "train_rows": len(train_ids), "train_nn_distance": _quantiles(np.asarray(train_nn_distance)),
            "test_rows": n, "test_nn_distance": _quantiles(np.asarray(test_nn_distance)),
            "flagged_count": k, "flagged_fraction": k / n if n else 0.0,
            "expected_by_chance": float(quantile) * n,  # test exchangeable with train: about q of it is flagged
            "flagged_label_conflicts": sum(not r["same_label"] for r in rows),
            "accuracy": float(correct.mean()) if n else None, "accuracy_dedup": dedup_accuracy(correct, flagged),
            "dedup_rows": n - k, "flagged": rows}


def disabled(reason: str) -> dict:
    """The record of an evaluation without the audit: it says so, nothing is silently missing."""
    return {"enabled": False, "reason": reason}


NOT_RECORDED = disabled("not recorded: this model was scored before evaluate had the feature-space audit (the "
                        "test split is read once per model, so it cannot be added without a second read)")


def headline(audit: dict | None) -> dict:
    """The audit's keys in ``paths.test_metrics`` (None values, with ``feature_audit`` saying why, when off)."""
    audit = audit or NOT_RECORDED
    if not audit.get("enabled"):
        return {"feature_audit": f"off: {audit.get('reason')}", "test_accuracy_dedup": None, "feature_dup_count": None,
                "feature_dup_fraction": None, "feature_dup_threshold": None}
    return {"feature_audit": "on", "test_accuracy_dedup": audit["accuracy_dedup"],
            "feature_dup_count": audit["flagged_count"], "feature_dup_fraction": audit["flagged_fraction"],
            "feature_dup_threshold": audit["threshold"]}


def summary_line(audit: dict | None) -> str:
    """One readable line for the log (and summary.md)."""
    audit = audit or NOT_RECORDED
    if not audit.get("enabled"):
        return f"feature-space audit off: {audit.get('reason')}"
    dedup = audit["accuracy_dedup"]
    return (f"feature-space audit: {audit['flagged_count']} of {audit['test_rows']} test items "
            f"({audit['flagged_fraction']:.1%}) within cosine distance {audit['threshold']:.4g} of a train item "
            f"(the {audit['quantile']:g} quantile of train-vs-train nearest distances over {audit['train_rows']} "
            f"train items; about {audit['expected_by_chance']:.1f} expected by chance); accuracy "
            f"{audit['accuracy']:.4f} on all, "
            + (f"{dedup:.4f} on the {audit['dedup_rows']} others" if dedup is not None else "no item left")
            + (f"; {audit['flagged_label_conflicts']} flagged pair(s) disagree on the label"
               if audit["flagged_label_conflicts"] else ""))


# ---------------------------------------------------------------- the model's penultimate features
def classifier_of(model):
    """(name, module) of the model's final classifier: timm's ``get_classifier()`` (keel's nets implement it)."""
    from torch import nn

    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if isinstance(head, list | tuple):  # e.g. distilled models: (head, head_dist); the first is the class head
        head = head[0] if head else None
    if not isinstance(head, nn.Module) or isinstance(head, nn.Identity):
        raise EvaluateError(f"the feature-space audit taps the input of the model's final classifier, and "
                            f"{type(model).__name__} exposes none (get_classifier() gave {type(head).__name__}); "
                            "set evaluate.feature_audit: false to evaluate it without the audit")
    name = next((n for n, m in model.named_modules() if m is head), type(head).__name__)
    return name, head


class FeatureTap:
    """A forward pre-hook on the final classifier: after ``arm()``, the first call's input (the penultimate
    features of the plain view) is kept; ``take()`` returns it flattened to [N, D] and disarms."""

    def __init__(self, model):
        self.name, self.module = classifier_of(model)
        self._armed, self._got, self._handle = False, None, None

    def __enter__(self) -> Self:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, args) -> None:
        if self._armed and args:
            self._got = args[0].detach()
            self._armed = False

    def arm(self) -> None:
        self._armed, self._got = True, None

    def take(self):
        got, self._got, self._armed = self._got, None, False
        if got is None:
            raise EvaluateError(f"the feature-space audit's hook on {self.name!r} saw no call: the model does not run "
                                "its classifier module in forward; set evaluate.feature_audit: false")
        return got.flatten(1)


def check_tap(model, in_chans: int, resolution: int, device) -> dict:
    """Before any access decision: faiss is importable and the tap works on this model (one blank image, eval
    mode). Returns the space it taps (recorded with the audit)."""
    import torch

    try:
        import faiss  # noqa: F401 - the exact search; fail here, before any access decision
    except ImportError:
        raise EvaluateError("the feature-space audit needs faiss (pip install faiss-cpu, a keel dependency); or set "
                            "evaluate.feature_audit: false to evaluate without it") from None
    model = model.to(device).eval()
    with FeatureTap(model) as tap, torch.no_grad():
        tap.arm()
        logits = model(torch.zeros(1, in_chans, resolution, resolution, device=device))
        f = tap.take()
    if f.shape[0] != 1 or logits.shape[0] != 1:
        raise EvaluateError(f"the feature-space audit's hook on {tap.name!r} saw features of shape "
                            f"{tuple(f.shape)}; set evaluate.feature_audit: false")
    return {"space": f"input of the final classifier {tap.name!r} ({type(tap.module).__name__}), L2-normalised, "
                     "cosine distance; plain view", "layer": tap.name, "feature_dim": int(f.shape[1])}


def embed(model, reader: io.ShardReader, mean: list[float], std: list[float], batch_size: int,
          device) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Penultimate features float32 [N, D] (plain view, eval mode), labels and ids of every row ``reader`` yields."""
    import torch

    from tasks.model.views import Normalize

    model = model.to(device).eval()
    norm = Normalize(mean, std).to(device)
    feats, labels, ids = [], [], []
    total, t0, last = len(reader), time.monotonic(), time.monotonic()
    with FeatureTap(model) as tap, torch.no_grad():
        for x, y, i in reader.iter_batches(batch_rows=batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x)).to(device).permute(0, 3, 1, 2)
            tap.arm()
            model(norm(xb.float()))
            feats.append(tap.take().float().cpu().numpy())
            labels.append(y)
            ids.extend(i)
            now = time.monotonic()
            if now - last > 2.0:
                last = now
                print(f"evaluate: feature audit: embedded {len(ids)}/{total} {reader.split} rows", file=sys.stderr,
                      flush=True)
    if not feats:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), []
    print(f"evaluate: feature audit: embedded {len(ids)} {reader.split} rows [{time.monotonic() - t0:.1f}s]",
          file=sys.stderr)
    return np.concatenate(feats), np.concatenate(labels), ids


@dataclass
class TestSearch:
    """Fed batch by batch from the one test pass (``metrics.predict``'s ``on_features``): each test row's nearest
    train row, and the pixels of the ``keep`` closest flagged rows (copied: the batch is a view of the shard)."""

    index: FeatureIndex
    threshold: float
    keep: int = SHEET_PAIRS
    distance: list = field(default_factory=list)
    row: list = field(default_factory=list)
    kept: list = field(default_factory=list)  # (distance, test id, image)

    def __call__(self, images: np.ndarray, feats: np.ndarray, ids: list[str]) -> None:
        d, j = self.index.search(feats)
        self.distance.append(d)
        self.row.append(j)
        for k in np.flatnonzero(flagged_mask(d, self.threshold)):
            self.kept.append((float(d[k]), ids[k], np.array(images[k], copy=True)))
        if len(self.kept) > 4 * self.keep:
            self._prune()

    def _prune(self) -> None:
        self.kept = sorted(self.kept, key=lambda t: (t[0], t[1]))[:self.keep]

    def result(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        self._prune()
        if not self.distance:
            return np.zeros(0), np.zeros(0, np.int64), {}
        return np.concatenate(self.distance), np.concatenate(self.row), {i: img for _, i, img in self.kept}


def read_rows(reader: io.ShardReader, rows: list[int]) -> dict[int, tuple[str, np.ndarray]]:
    """The ids and images of a few rows (positions in ``reader``'s iteration order), reading only the row groups
    that hold them (the shards were verified when ``reader`` was opened)."""
    import pyarrow.parquet as pq

    hwc = (reader.index.resolution, reader.index.resolution, reader.index.channels)
    want, out, start = sorted(set(rows)), {}, 0
    for s in reader.files:
        here = [r - start for r in want if start <= r < start + s.rows]
        if here:
            pf = pq.ParquetFile(reader.dir / s.file)
            g0 = 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                local = [r - g0 for r in here if g0 <= r < g0 + n]
                if local:
                    t = pf.read_row_group(g, columns=["id", "image"])
                    images = io.decode_image_column(t.column("image"), hwc)
                    ids = t.column("id").to_pylist()
                    for r in local:
                        out[start + g0 + r] = (ids[r], np.array(images[r], copy=True))
                g0 += n
        start += s.rows
    return out


def png_b64(image: np.ndarray) -> str:
    """An HWC uint8 image as base64 PNG text (lossless; what the recorded result keeps for the picture)."""
    from PIL import Image

    img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    buf = _bytes_io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def pair_images(audit: dict, test_images: dict[str, np.ndarray], train_reader: io.ShardReader,
                test_nn_row: dict[str, int]) -> list[dict]:
    """The closest flagged pairs (up to ``SHEET_PAIRS``) with both images as base64 PNG, for the recorded result."""
    shown = [r for r in audit["flagged"] if r["id"] in test_images][:SHEET_PAIRS]
    rows = read_rows(train_reader, [test_nn_row[r["id"]] for r in shown])
    pairs = []
    for r in shown:
        tid, image = rows[test_nn_row[r["id"]]]
        if tid != r["train_id"]:
            raise EvaluateError(f"{train_reader.dir}: train shard rows moved while evaluating (expected "
                                f"{r['train_id'][:12]}…, found {tid[:12]}…); re-run `keel evaluate`")
        pairs.append({"id": r["id"], "train_id": tid, "test_png": png_b64(test_images[r["id"]]),
                      "train_png": png_b64(image)})
    return pairs


# ---------------------------------------------------------------- the stage's two halves of a read
@dataclass
class TrainSide:
    """The train split in the model's feature space, and the threshold calibrated on it (before the test pass)."""

    reader: io.ShardReader
    ids: list[str]
    labels: np.ndarray
    nn_distance: np.ndarray
    index: FeatureIndex
    threshold: float
    quantile: float
    space: dict

    def search(self) -> TestSearch:
        return TestSearch(self.index, self.threshold)


def prepare(model, shards_dir: str, mean: list[float], std: list[float], batch_size: int, device, quantile: float,
            space: dict) -> TrainSide | dict:
    """Embed the train split, find each train item's nearest other train item, calibrate the threshold. Returns
    the ``disabled`` record instead when train cannot calibrate (fewer than 2 rows)."""
    reader = io.ShardReader(shards_dir, "train")
    if len(reader) < 2:
        return disabled(f"the train split has {len(reader)} row(s): no train-vs-train distance to calibrate on")
    t0 = time.monotonic()
    feats, labels, ids = embed(model, reader, mean, std, batch_size, device)
    index = FeatureIndex(feats)
    nn_distance, _ = index.search(feats, exclude_self=True)
    threshold = calibrate(nn_distance, quantile)
    print(f"evaluate: feature audit: threshold {threshold:.4g} = the {quantile:g} quantile of {len(ids)} train items' "
          f"nearest-other-train cosine distances [{time.monotonic() - t0:.1f}s]", file=sys.stderr)
    return TrainSide(reader, ids, labels, nn_distance, index, threshold, quantile, space)


def finish(train: TrainSide, search: TestSearch, test_ids: list[str], labels: np.ndarray, probs: np.ndarray,
           classes: list[str]) -> dict:
    """The audit's record after the test pass, with the closest flagged pairs' pixels (``pairs``) for the picture."""
    distance, row, images = search.result()
    audit = summarise(quantile=train.quantile, threshold=train.threshold, train_nn_distance=train.nn_distance,
                      train_ids=train.ids, train_labels=train.labels, test_ids=test_ids, labels=labels,
                      preds=probs.argmax(1) if len(probs) else np.zeros(0, np.int64), test_nn_distance=distance,
                      test_nn_row=row, classes=classes, space=train.space)
    position = {i: int(r) for i, r in zip(test_ids, row)}
    try:
        audit["pairs"] = pair_images(audit, images, train.reader, position)
    except (EvaluateError, io.DataError, OSError) as exc:  # the test split was read: a picture must not cost
        # the ledger its record of this read (the numbers above stand; only the picture is missing)
        audit["pairs"], audit["pairs_error"] = [], f"{type(exc).__name__}: {str(exc)[:300]}"
        print(f"evaluate: feature audit: no picture of the pairs ({audit['pairs_error']})", file=sys.stderr)
    return audit


# ---------------------------------------------------------------- the picture
def render_pairs(audit: dict, pairs: list[dict]) -> bytes:
    """feature_duplicates.png: the closest flagged pairs side by side (test | nearest train), each captioned with
    its distance and labels (PIL, like the ingest audit's contact sheet). Same record, same bytes."""
    from PIL import Image, ImageDraw, ImageFont

    by_id = {r["id"]: r for r in audit.get("flagged", [])}
    cols, pad, cap, head = 4, 8, 40, 40
    cell_w = 2 * TILE + 4
    rows = max(1, -(-len(pairs) // cols))
    font, big = ImageFont.load_default(size=11), ImageFont.load_default(size=14)
    if audit.get("enabled"):
        title = (f"feature-space near-duplicates: {audit['flagged_count']} of {audit['test_rows']} test items "
                 f"within cosine distance {audit['threshold']:.4g} (train-vs-train q={audit['quantile']:g})")
        sub = (f"test | nearest train; closest {len(pairs)} shown" if pairs
               else "no test item is that close to a train item")
    else:
        title, sub = "feature-space audit off", str(audit.get("reason", ""))[:160]
    width = max(cols * (cell_w + pad) + pad, int(max(big.getlength(title), font.getlength(sub))) + 2 * pad)
    sheet = Image.new("RGB", (width, head + rows * (TILE + cap + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), title, fill="black", font=big)
    draw.text((pad, 22), sub, fill="#555555", font=font)

    def tile(b64: str):
        img = Image.open(_bytes_io.BytesIO(base64.b64decode(b64))).convert("RGB")
        scale = TILE / max(img.size)
        return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                          Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BILINEAR)

    for k, p in enumerate(pairs):
        r = by_id.get(p["id"], {})
        x = pad + (k % cols) * (cell_w + pad)
        y = head + (k // cols) * (TILE + cap + pad)
        for dx, b64 in ((0, p["test_png"]), (TILE + 4, p["train_png"])):
            t = tile(b64)
            sheet.paste(t, (x + dx + (TILE - t.width) // 2, y + (TILE - t.height) // 2))
        colour = "black" if r.get("same_label", True) else "#cc0000"
        draw.text((x, y + TILE + 1), f"#{k + 1} d={r.get('distance', float('nan')):.4f}", fill=colour, font=font)
        draw.text((x, y + TILE + 13), f"test {str(r.get('label'))[:10]} (pred {str(r.get('pred'))[:10]})",
                  fill=colour, font=font)
        draw.text((x, y + TILE + 25), f"train {str(r.get('train_label'))[:10]}  {p['train_id'][:8]}",
                  fill="#777777", font=font)
    buf = _bytes_io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()
