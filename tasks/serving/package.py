"""What ``mlflow.pyfunc.save_model`` / ``log_model`` needs for a ``best.pt`` blob: weights + spec artifacts, the
``tasks`` source as ``code_paths``, the signature, an input example and exact pip pins."""
from __future__ import annotations

import importlib.metadata
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.core import checkpoint
from tasks.serving.inputs import IMAGE_COLUMN
from tasks.serving.model import spec_from_checkpoint
from tasks.serving.pyfunc import SPEC_ARTIFACT, WEIGHTS_ARTIFACT

MODEL_CODE = "serving/model_code.py"  # the models-from-code script, relative to the staged tasks package

# What load_context imports (tasks.serving -> tasks.core.imaging, tasks.model.build -> tasks.core.config,
# tasks.train.data -> tasks.core.io), pinned to the versions installed here.  torchvision: timm imports it.
SERVING_PACKAGES = ("torch", "torchvision", "timm", "numpy", "pillow", "pandas", "pydantic", "pyyaml", "pyarrow")


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
    src = Path(__file__).resolve().parents[1]  # the tasks package (this file is tasks/serving/package.py)
    out = dest / "tasks"
    for f in src.rglob("*.py"):
        if "__pycache__" in f.parts:
            continue
        target = out / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)
    return out


def package(blob: dict, workdir: str | Path, *, max_image_bytes: int, max_pixels: int,
            example_images: Sequence[bytes], allowed_formats: list[str] | None = None) -> dict:
    """Everything ``mlflow.pyfunc.save_model`` / ``log_model`` needs for a ``best.pt`` blob, as keyword arguments
    (python_model, artifacts, code_paths, signature, input_example, pip_requirements).  ``python_model`` is the
    path of the staged ``tasks/serving/model_code.py``: MLflow's models-from-code, no pickled object in the
    model.  Files are staged under ``workdir``, which must outlive the save/log call.  ``allowed_formats``: the
    training data's ``ingest.allowed_formats`` (see ``spec_from_checkpoint``)."""

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    spec = spec_from_checkpoint(blob, max_image_bytes=max_image_bytes, max_pixels=max_pixels,
                                allowed_formats=allowed_formats)
    weights, spec_path = work / "weights.pt", work / "preprocessing.json"
    checkpoint.save(weights, {k: v.detach().cpu() for k, v in blob["model"].items()})
    spec_path.write_text(json.dumps(spec, indent=2) + "\n")
    if not example_images:
        raise ValueError("example_images: give at least one encoded image for the input example")
    code = _stage_code(work / "code")
    return {
        "python_model": str(code / MODEL_CODE),
        "artifacts": {WEIGHTS_ARTIFACT: str(weights), SPEC_ARTIFACT: str(spec_path)},
        "code_paths": [str(code)],
        "signature": signature(),
        "input_example": input_example(example_images),
        "pip_requirements": pip_requirements(),
    }


def save(blob: dict, dest: str | Path, *, max_image_bytes: int, max_pixels: int,
         example_images: Sequence[bytes], allowed_formats: list[str] | None = None) -> Path:
    """``mlflow.pyfunc.save_model`` of a ``best.pt`` blob to the (new or empty) folder ``dest``."""
    import tempfile

    import mlflow.pyfunc

    with tempfile.TemporaryDirectory(prefix="keel-serving-") as work:
        kw = package(blob, work, max_image_bytes=max_image_bytes, max_pixels=max_pixels,
                     example_images=example_images, allowed_formats=allowed_formats)
        mlflow.pyfunc.save_model(path=str(dest), **kw)
    return Path(dest)


def encode_png(pixels: np.ndarray) -> bytes:
    """uint8 HxW / HxWx1 / HxWx3 pixels -> PNG bytes (for examples made from shard pixels)."""
    arr = pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()
