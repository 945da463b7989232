"""The served model: an MLflow pyfunc that takes raw images and repeats training's preprocessing exactly.

The serving team loads ``models:/keel-classifier@champion`` (``mlflow.pyfunc.load_model`` or
``mlflow models serve``).  The model packages the best-val weights (a torch state dict), a JSON preprocessing
spec (classes, mean/std fitted on train, resolution, channels, resize rule, alpha background, timm model name and
the settings ``tasks.model.build.build_model`` needs, and the input limits), and the ``tasks`` package source, so
the served pixels come from the very function the shard stage used (``tasks.core.imaging.preprocess``).

Input (``predict(model_input)``): a pandas DataFrame with one column ``image``; one row per image, either
    * encoded image bytes in one of the formats the model was trained with (``ingest.allowed_formats``, recorded
      in the spec as ``allowed_formats``; default JPEG, PNG, BMP, GIF, WEBP, TIFF), made upright by their EXIF
      Orientation as at ingest, or
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

A bad row (not an image, a format not allowed, too many bytes or pixels, corrupt, wrong array dtype/shape,
missing) fails the whole request with ``MlflowException(error_code=INVALID_PARAMETER_VALUE)`` naming the row and
the reason, which the scoring server answers with HTTP 400.

Nothing heavy happens at import: torch, pandas and MLflow are imported inside functions, and the
``PythonModel`` subclass (``KeelImageClassifier``) is created on first access to that attribute.

Modules: ``inputs`` (raw cells -> images, the guards, ``InvalidImageError``), ``model`` (the spec and the torch
``ImageClassifier``), ``pyfunc`` (the MLflow wrapper, published here as ``tasks.serving.KeelImageClassifier``: the
name every registered model's pickle refers to), ``package`` (what ``save_model`` / ``log_model`` need).
"""
from __future__ import annotations

from tasks.serving.inputs import IMAGE_COLUMN, InvalidImageError
from tasks.serving.model import (
    BATCH,
    DEVICE_ENV,
    OUTPUT_COLUMNS,
    SPEC_FORMAT,
    ImageClassifier,
    spec_from_checkpoint,
)
from tasks.serving.package import (
    SERVING_PACKAGES,
    encode_png,
    input_example,
    package,
    pip_requirements,
    save,
    signature,
)
from tasks.serving.pyfunc import SPEC_ARTIFACT, WEIGHTS_ARTIFACT, pyfunc_class

__all__ = ["BATCH", "DEVICE_ENV", "IMAGE_COLUMN", "OUTPUT_COLUMNS", "SERVING_PACKAGES", "SPEC_ARTIFACT", "SPEC_FORMAT",
           "WEIGHTS_ARTIFACT", "ImageClassifier", "InvalidImageError", "encode_png",
           "input_example", "package", "pip_requirements", "pyfunc_class", "save", "signature",
           "spec_from_checkpoint"]


def __getattr__(name: str):
    if name == "KeelImageClassifier":  # created (importing MLflow) on first access; see tasks.serving.pyfunc
        return pyfunc_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
