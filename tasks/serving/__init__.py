"""The served model: an MLflow pyfunc that takes raw images and repeats training's preprocessing exactly.

The serving team loads ``models:/keel-classifier@champion`` (``mlflow.pyfunc.load_model`` or
``mlflow models serve``).  The model packages the best-val weights (a torch state dict), a JSON preprocessing
spec (classes, mean/std fitted on train, resolution, channels, resize rule, alpha background, timm model name and
the settings ``tasks.model.build.build_model`` needs, and the input limits), and the ``tasks`` package source, so
the served pixels come from the very function the shard stage used (``tasks.core.imaging.preprocess``).

Input (``predict(model_input)``): a pandas DataFrame with one column ``image``; one row per image, either
    * encoded image bytes (JPEG, PNG, BMP, GIF, WEBP, TIFF, ... whatever Pillow decodes), or
    * a base64 string of those bytes (a ``data:image/...;base64,`` prefix is accepted), or
    * a ``uint8`` numpy array, HxW (grayscale), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA, composited over the
      training background).
  Limits (from ``params.yaml:register``): at most ``max_image_bytes`` encoded bytes and ``max_pixels`` pixels
  per image.  The MLflow signature declares ``image`` as ``binary``, so over HTTP (``mlflow models serve``) send
  base64 strings: the scoring server decodes them to bytes before ``predict`` sees them::

      POST /invocations  Content-Type: application/json
      {"dataframe_split": {"columns": ["image"], "data": [["<base64 of a PNG/JPEG file>"], ...]}}

Output: a DataFrame, one row per input row, in order:
    label (str, class name), label_index (int64), probability (float64, of ``label``),
    probabilities (list of float64 in the order of the classes).

A bad row (not an image, too many bytes or pixels, corrupt, wrong array dtype/shape, missing) fails the whole
request with ``MlflowException(error_code=INVALID_PARAMETER_VALUE)`` naming the row and the reason, which the
scoring server answers with HTTP 400.

Nothing heavy happens at import: torch, pandas and MLflow are imported inside functions, and the
``PythonModel`` subclass (``KeelImageClassifier``) is created on first access to that attribute.
"""
from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import json
import math
import os
import shutil
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from tasks.core.errors import UserError
from tasks.core.imaging import ImageRejected, preprocess

SPEC_FORMAT = "keel-serving/1"
IMAGE_COLUMN = "image"
OUTPUT_COLUMNS = ("label", "label_index", "probability", "probabilities")
WEIGHTS_ARTIFACT = "weights"        # context.artifacts key: torch state dict (weights.pt)
SPEC_ARTIFACT = "preprocessing"     # context.artifacts key: the JSON spec (preprocessing.json)
# What load_context imports (tasks.serving -> tasks.core.imaging, tasks.model.build -> tasks.core.config,
# tasks.train.data -> tasks.core.io), pinned to the versions installed here.  torchvision: timm imports it.
SERVING_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "pandas", "pydantic", "pyyaml", "pyarrow")
BATCH = 256
DEVICE_ENV = "KEEL_SERVING_DEVICE"  # cpu | cuda | cuda:N; default: cuda when available, else cpu


class InvalidImageError(UserError, ValueError):
    """One input row that cannot be classified; ``row`` is its 0-based position, ``reason`` a stable code."""

    def __init__(self, row: int, reason: str, detail: str):
        super().__init__(f"row {row}: {reason}: {detail}")
        self.row, self.reason, self.detail = row, reason, detail


# ---------------------------------------------------------------- the spec packaged beside the weights
def spec_from_checkpoint(blob: dict, *, max_image_bytes: int, max_pixels: int) -> dict:
    """The preprocessing + model-rebuild spec of a ``best.pt`` blob (see docs/contracts.md)."""
    index = blob["index"]
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
        "model_name": blob["model_name"],
        # weights come from the state dict: rebuild with pretrained=none whatever the training init was
        "timm": {"small_input_stem": bool(train_cfg.get("small_input_stem", True)),
                 "drop_rate": float(train_cfg.get("drop_rate", 0.0)),
                 "drop_path_rate": float(train_cfg.get("drop_path_rate", 0.0))},
        "tta": str(train_cfg.get("tta", "none")),  # the test-time views evaluate scored with: served the same way
        "max_image_bytes": int(max_image_bytes),
        "max_pixels": int(max_pixels),
    }


# ---------------------------------------------------------------- the classifier (torch only, no MLflow)
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

    @classmethod
    def from_checkpoint(cls, blob: dict, *, max_image_bytes: int = 10_000_000, max_pixels: int = 89_478_485,
                        device: str | None = None) -> ImageClassifier:
        spec = spec_from_checkpoint(blob, max_image_bytes=max_image_bytes, max_pixels=max_pixels)
        return cls(spec, blob["model"], device=device)

    @classmethod
    def from_files(cls, weights: str | Path, spec: str | Path, device: str | None = None) -> ImageClassifier:
        import torch

        state = torch.load(weights, map_location="cpu", weights_only=True)
        return cls(json.loads(Path(spec).read_text()), state, device=device)

    # ---- input -> model pixels
    def pixels(self, value: Any, row: int) -> np.ndarray:
        """One input cell -> uint8 ``resolution x resolution x channels`` (the shard stage's pixels)."""
        img = self._image(value, row)
        try:
            return preprocess(img, self.resolution, self.channels, self.spec.get("resize", "center_crop"),
                              tuple(self.spec.get("background", (255, 255, 255))))
        except ImageRejected as exc:
            raise InvalidImageError(row, exc.reason, exc.detail) from None

    def _image(self, value: Any, row: int) -> Image.Image:
        if isinstance(value, np.ndarray):
            return self._from_array(value, row)
        if isinstance(value, str):
            data = self._from_base64(value, row)
        elif isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value)
        elif value is None or (isinstance(value, float) and math.isnan(value)) or _is_na(value):
            raise InvalidImageError(row, "missing", f"no value in column {IMAGE_COLUMN!r}")
        else:
            raise InvalidImageError(row, "unsupported_type",
                                    f"{type(value).__name__}; send encoded image bytes (base64 strings in JSON) or a "
                                    "uint8 HxW / HxWxC array")
        return self._decode(data, row)

    def _from_base64(self, text: str, row: int) -> bytes:
        if text.startswith("data:") and "," in text[:200]:
            text = text.split(",", 1)[1]
        text = "".join(text.split())
        if len(text) * 3 // 4 > self.max_image_bytes + 3:
            raise InvalidImageError(row, "too_many_bytes", f"about {len(text) * 3 // 4} bytes (base64 of "
                                    f"{len(text)} characters) > max_image_bytes={self.max_image_bytes}")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidImageError(row, "bad_base64", f"a string that is not base64-encoded image bytes ({exc})") \
                from None

    def _decode(self, data: bytes, row: int) -> Image.Image:
        if len(data) > self.max_image_bytes:
            raise InvalidImageError(row, "too_many_bytes", f"{len(data)} bytes > max_image_bytes={self.max_image_bytes}")
        if not data:
            raise InvalidImageError(row, "empty", "zero bytes")
        # PIL's decompression-bomb guard follows max_pixels (it raises past 2x and warns past 1x: both refused)
        Image.MAX_IMAGE_PIXELS = self.max_pixels
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                img = Image.open(io.BytesIO(data))
            except UnidentifiedImageError:
                raise InvalidImageError(row, "not_an_image", f"{len(data)} bytes that no image decoder recognises") \
                    from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise InvalidImageError(row, "too_many_pixels", f"{exc} (max_pixels={self.max_pixels})") from None
            except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
                raise InvalidImageError(row, "corrupt_image", f"header unreadable: {type(exc).__name__}: {exc}") \
                    from None
            w, h = img.size
            if w * h > self.max_pixels:
                raise InvalidImageError(row, "too_many_pixels", f"{w}x{h} = {w * h} pixels > max_pixels={self.max_pixels}")
            try:
                img.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise InvalidImageError(row, "too_many_pixels", str(exc)) from None
            except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
                raise InvalidImageError(row, "corrupt_image", f"{img.format} {w}x{h}: {exc}") from None
        return img

    def _from_array(self, arr: np.ndarray, row: int) -> Image.Image:
        if arr.dtype != np.uint8:
            raise InvalidImageError(row, "bad_array", f"dtype {arr.dtype}; expected uint8 pixels 0..255")
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
            raise InvalidImageError(row, "bad_array", f"shape {arr.shape}; expected HxW, HxWx1, HxWx3 (RGB) or "
                                    "HxWx4 (RGBA)")
        h, w = arr.shape[:2]
        if h == 0 or w == 0:
            raise InvalidImageError(row, "bad_array", f"shape {arr.shape} has no pixels")
        if h * w > self.max_pixels:
            raise InvalidImageError(row, "too_many_pixels", f"{w}x{h} = {w * h} pixels > max_pixels={self.max_pixels}")
        return Image.fromarray(np.ascontiguousarray(arr))

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


def _is_na(value: Any) -> bool:
    try:
        import pandas as pd

        return value is pd.NA or value is pd.NaT
    except ImportError:  # pragma: no cover - pandas is a serving requirement
        return False


# ---------------------------------------------------------------- the MLflow pyfunc wrapper (created lazily)
_PYFUNC_CLASS = None


def pyfunc_class() -> type:
    """The ``mlflow.pyfunc.PythonModel`` subclass, created on first use (importing MLflow only then).

    It is registered as ``tasks.serving.KeelImageClassifier`` so cloudpickle stores it by reference: the pickle in
    the model holds no code, and loading imports this module from the model's ``code/`` folder.
    """
    global _PYFUNC_CLASS
    if _PYFUNC_CLASS is not None:
        return _PYFUNC_CLASS
    import mlflow.pyfunc

    class KeelImageClassifier(mlflow.pyfunc.PythonModel):
        """Raw images -> class; see the ``tasks.serving`` module docstring for the input/output schema."""

        # The schema is the explicit signature (``signature()``), not predict's type hints: skip MLflow's
        # type-hint wrapper (and its "add type hints" warning).
        _skip_type_hint_validation = True

        def load_context(self, context):
            self._clf = ImageClassifier.from_files(context.artifacts[WEIGHTS_ARTIFACT], context.artifacts[SPEC_ARTIFACT])

        def predict(self, context, model_input, params=None):
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            try:
                return self._clf.predict(model_input)
            except InvalidImageError as exc:
                raise MlflowException(f"invalid input: {exc}", error_code=INVALID_PARAMETER_VALUE) from None

    KeelImageClassifier.__module__ = __name__
    KeelImageClassifier.__qualname__ = "KeelImageClassifier"
    _PYFUNC_CLASS = KeelImageClassifier
    globals()["KeelImageClassifier"] = KeelImageClassifier
    return KeelImageClassifier


def __getattr__(name: str):
    if name == "KeelImageClassifier":
        return pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------- packaging
def signature():
    """input: ``image`` binary; output: label string, label_index long, probability double, probabilities
    array<double>."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec(DataType.binary, IMAGE_COLUMN)])
    outputs = Schema([ColSpec(DataType.string, "label"), ColSpec(DataType.long, "label_index"),
                      ColSpec(DataType.double, "probability"), ColSpec(Array(DataType.double), "probabilities")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def input_example(images: Sequence[bytes]):
    import pandas as pd

    return pd.DataFrame({IMAGE_COLUMN: pd.Series([bytes(b) for b in images], dtype=object)})


def _public_version(v: str) -> str:
    return v.split("+", 1)[0]  # "2.14.1+cpu" -> "2.14.1": local builds are not on any index


def pip_requirements() -> list[str]:
    """Exact pins of what the model imports, from the installed distributions (never inferred: slow)."""
    reqs = [f"{p}=={_public_version(importlib.metadata.version(p))}" for p in SERVING_PACKAGES]
    return [f"mlflow=={_public_version(importlib.metadata.version('mlflow'))}", *reqs]


def _stage_code(dest: Path) -> Path:
    """Copy the ``tasks`` package's ``.py`` files (no caches) to ``dest/tasks``; the model's ``code_paths``."""
    src = Path(__file__).resolve().parents[1]  # the tasks package (this file is tasks/serving/__init__.py)
    out = dest / "tasks"
    for f in src.rglob("*.py"):
        if "__pycache__" in f.parts:
            continue
        target = out / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    return out


def package(blob: dict, workdir: str | Path, *, max_image_bytes: int, max_pixels: int,
            example_images: Sequence[bytes]) -> dict:
    """Everything ``mlflow.pyfunc.save_model`` / ``log_model`` needs for a ``best.pt`` blob, as keyword arguments
    (python_model, artifacts, code_paths, signature, input_example, pip_requirements).  Files are staged under
    ``workdir``, which must outlive the save/log call."""
    import torch

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    spec = spec_from_checkpoint(blob, max_image_bytes=max_image_bytes, max_pixels=max_pixels)
    weights, spec_path = work / "weights.pt", work / "preprocessing.json"
    torch.save({k: v.detach().cpu() for k, v in blob["model"].items()}, weights)
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    if not example_images:
        raise ValueError("example_images: give at least one encoded image for the input example")
    return {
        "python_model": pyfunc_class()(),
        "artifacts": {WEIGHTS_ARTIFACT: str(weights), SPEC_ARTIFACT: str(spec_path)},
        "code_paths": [str(_stage_code(work / "code"))],
        "signature": signature(),
        "input_example": input_example(example_images),
        "pip_requirements": pip_requirements(),
    }


def save(blob: dict, dest: str | Path, *, max_image_bytes: int, max_pixels: int,
         example_images: Sequence[bytes]) -> Path:
    """``mlflow.pyfunc.save_model`` of a ``best.pt`` blob to the (new or empty) folder ``dest``."""
    import tempfile

    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="keel-serving-") as work:
        kw = package(blob, work, max_image_bytes=max_image_bytes, max_pixels=max_pixels,
                     example_images=example_images)
        mlflow.pyfunc.save_model(path=str(dest), **kw)
    return Path(dest)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 HxW / HxWx1 / HxWx3 pixels -> PNG bytes (for examples made from shard pixels)."""
    arr = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()
