"""The classifier (torch only, no MLflow) and the spec packaged beside its weights."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core import checkpoint
from tasks.core.imaging import ImageRejected, preprocess
from tasks.serving import inputs
from tasks.serving.inputs import IMAGE_COLUMN, InvalidImageError

SPEC_FORMAT = "keel-serving/1"
OUTPUT_COLUMNS = ("label", "label_index", "probability", "probabilities")
BATCH = 256
DEVICE_ENV = "KEEL_SERVING_DEVICE"  # cpu | cuda | cuda:N; default: cuda when available, else cpu


def default_formats() -> list[str]:
    """``ingest.allowed_formats``' default: what a model packaged without recorded formats is taken to accept."""
    from tasks.core.config import IngestConfig

    return list(IngestConfig.model_fields["allowed_formats"].default)


def spec_from_checkpoint(blob: dict, *, max_image_bytes: int, max_pixels: int,
                         allowed_formats: list[str] | None = None) -> dict:
    """The preprocessing + model-rebuild spec of a ``best.pt`` blob (see docs/contracts.md).

    ``allowed_formats``: ``ingest.allowed_formats`` of the training data (else the blob's index's, else the
    default), so serving opens exactly the encodings training could have seen.
    """
    index = blob["index"]
    formats = allowed_formats or index.get("allowed_formats") or default_formats()
    train_cfg = (blob.get("run_info") or {}).get("config") or {}
    return {
        "format": SPEC_FORMAT,
        "classes": list(index["classes"]),
        "mean": [float(v) for v in index["mean"]],
        "std": [float(v) for v in index["std"]],
        "resolution": int(index["resolution"]),
        "channels": int(index["channels"]),
        "resize": index.get("resize", "center_crop"),
        "background": [int(v) for v in index.get("background", (255, 255, 255))],
        "decode": str(index.get("decode", "full")),   # shard.decode (a model trained before it: every pixel)
        "model_name": blob["model_name"],
        # weights come from the state dict: rebuild with pretrained=none whatever the training init was
        "timm": {"small_input_stem": bool(train_cfg.get("small_input_stem", True)),
                 "drop_rate": float(train_cfg.get("drop_rate", 0.0)),
                 "drop_path_rate": float(train_cfg.get("drop_path_rate", 0.0))},
        "tta": str(train_cfg.get("tta", "none")),  # the test-time views evaluate scored with: served the same way
        "max_image_bytes": int(max_image_bytes),
        "max_pixels": int(max_pixels),
        "allowed_formats": [str(f) for f in formats],
    }


class ImageClassifier:
    """Raw images in, class probabilities out: decode -> ``preprocess`` -> Normalize -> model -> softmax."""

    def __init__(self, spec: dict, state_dict: dict, device: str | None = None):
        import torch

        from tasks.core.config import TrainConfig
        from tasks.model.build import build_model
        from tasks.model.views import TTA_MODES, Normalize

        if spec.get("format") != SPEC_FORMAT:
            raise ValueError(f"unknown serving spec format {spec.get('format')!r} (expected {SPEC_FORMAT})")
        self.spec = spec
        self.classes: list[str] = list(spec["classes"])
        self.resolution, self.channels = int(spec["resolution"]), int(spec["channels"])
        self.max_image_bytes, self.max_pixels = int(spec["max_image_bytes"]), int(spec["max_pixels"])
        # a model packaged before formats were recorded was trained under the default list
        self.allowed_formats: list[str] = list(spec.get("allowed_formats") or default_formats())
        device = device or os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        timm_cfg = spec.get("timm", {})
        cfg = TrainConfig(model=spec["model_name"], pretrained="none",
                          small_input_stem=timm_cfg.get("small_input_stem", True),
                          drop_rate=timm_cfg.get("drop_rate", 0.0), drop_path_rate=timm_cfg.get("drop_path_rate", 0.0))
        model, _ = build_model(cfg, len(self.classes), self.channels, self.resolution)
        model.load_state_dict(state_dict)
        self.model = model.to(self.device).eval()
        self.norm = Normalize(spec["mean"], spec["std"]).to(self.device)
        self.tta = spec.get("tta", "none")
        if self.tta not in TTA_MODES:
            raise ValueError(f"serving spec: unknown tta {self.tta!r} (one of {TTA_MODES})")
        self.decode = spec.get("decode", "full")  # how the shards decoded (shard.decode); serving repeats it
        if self.decode not in ("scaled", "full"):
            raise ValueError(f"serving spec: unknown decode {self.decode!r} (one of 'scaled', 'full'; "
                             "shard.decode of the shards this model was trained on)")

    @classmethod
    def from_checkpoint(cls, blob: dict, *, max_image_bytes: int = 10_000_000, max_pixels: int = 89_478_485,
                        allowed_formats: list[str] | None = None, device: str | None = None) -> ImageClassifier:
        spec = spec_from_checkpoint(blob, max_image_bytes=max_image_bytes, max_pixels=max_pixels,
                                    allowed_formats=allowed_formats)
        return cls(spec, blob["model"], device=device)

    @classmethod
    def from_files(cls, weights: str | Path, spec: str | Path, device: str | None = None) -> ImageClassifier:

        state = checkpoint.load(weights)
        return cls(json.loads(Path(spec).read_text()), state, device=device)

    # ---- input -> model pixels
    def pixels(self, value: Any, row: int) -> np.ndarray:
        """One input cell -> uint8 ``resolution x resolution x channels`` (the shard stage's pixels)."""
        img = inputs.image(value, row, max_image_bytes=self.max_image_bytes, max_pixels=self.max_pixels,
                           allowed_formats=self.allowed_formats,
                           draft_to=self.resolution if self.decode == "scaled" else None)
        try:
            return preprocess(img, self.resolution, self.channels, self.spec.get("resize", "center_crop"),
                              tuple(self.spec.get("background", (255, 255, 255))))
        except ImageRejected as exc:
            raise InvalidImageError(row, exc.reason, exc.detail) from None

    # ---- model
    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,C] model pixels -> float32 [N, classes] softmax probabilities."""
        import torch

        from tasks.model.views import tta_logits

        out = np.empty((len(pixels), len(self.classes)), np.float32)
        with torch.inference_mode():
            for s in range(0, len(pixels), BATCH):
                x = torch.from_numpy(np.ascontiguousarray(pixels[s:s + BATCH])).to(self.device)
                logits = tta_logits(self.model, self.norm(x.permute(0, 3, 1, 2)), self.tta)[0]
                out[s:s + BATCH] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return out

    def predict(self, frame: Any):
        """DataFrame with column ``image`` -> DataFrame (label, label_index, probability, probabilities)."""
        import pandas as pd

        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame(frame)
        if IMAGE_COLUMN not in frame.columns:
            raise InvalidImageError(0, "missing_column", f"no column {IMAGE_COLUMN!r} (got {list(frame.columns)})")
        cells = frame[IMAGE_COLUMN].tolist()
        shape = (self.resolution, self.resolution, self.channels)
        pixels = np.empty((len(cells), *shape), np.uint8)
        for i, cell in enumerate(cells):  # every row is checked before any compute: one bad row fails fast
            pixels[i] = self.pixels(cell, i)
        probs = self.probabilities(pixels)
        idx = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
        return pd.DataFrame({
            "label": pd.Series([self.classes[i] for i in idx], dtype=object),
            "label_index": idx.astype(np.int64),
            "probability": probs[np.arange(len(idx)), idx].astype(np.float64),
            "probabilities": pd.Series([p.astype(np.float64).tolist() for p in probs], dtype=object),
        }, index=frame.index)
