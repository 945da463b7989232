"""Raw input cells -> PIL images, with the guards the served model applies before any compute.

A cell is encoded image bytes, a base64 string of them (``data:image/...;base64,`` accepted) or a ``uint8``
HxW / HxWx1 / HxWx3 / HxWx4 array; anything else, or a cell over ``max_image_bytes`` / ``max_pixels``, corrupt or
missing, or encoded in a format the model was not trained with, raises :class:`InvalidImageError` naming the row
and a stable reason code.  Bytes go through the same guarded opener as ingest (``tasks.core.imaging.open_image``),
which leaves Pillow's process-wide ``Image.MAX_IMAGE_PIXELS`` alone.
"""
from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import numpy as np
from PIL import Image

from tasks.core.errors import UserError
from tasks.core.imaging import ImageRejected, open_image

IMAGE_COLUMN = "image"
# imaging's reason codes -> the served model's (kept from before the opener was shared)
_REASONS = {"empty_file": "empty", "decompression_bomb": "too_many_pixels"}


class InvalidImageError(UserError, ValueError):
    """One input row that cannot be classified; ``row`` is its 0-based position, ``reason`` a stable code."""

    def __init__(self, row: int, reason: str, detail: str):
        super().__init__(f"row {row}: {reason}: {detail}")
        self.row, self.reason, self.detail = row, reason, detail


def image(value: Any, row: int, *, max_image_bytes: int, max_pixels: int,
          allowed_formats: list[str] | None = None, draft_to: int | None = None) -> Image.Image:
    """One input cell -> a decoded PIL image (not yet preprocessed; ``preprocess`` makes it upright).

    ``draft_to``: the model's resolution when its shards were made with ``shard.decode: scaled`` (encoded JPEGs
    then decode at the same reduced DCT scale as there; an array is used as it is, as shard never saw one)."""
    if isinstance(value, np.ndarray):
        return from_array(value, row, max_pixels=max_pixels)
    if isinstance(value, str):
        data = from_base64(value, row, max_image_bytes=max_image_bytes)
    elif isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    elif value is None or (isinstance(value, float) and math.isnan(value)) or _is_na(value):
        raise InvalidImageError(row, "missing", f"no value in column {IMAGE_COLUMN!r}")
    else:
        raise InvalidImageError(row, "unsupported_type",
                                f"{type(value).__name__}; send encoded image bytes (base64 strings in JSON) or a "
                                "uint8 HxW / HxWxC array")
    return decode(data, row, max_image_bytes=max_image_bytes, max_pixels=max_pixels,
                  allowed_formats=allowed_formats, draft_to=draft_to)


def from_base64(text: str, row: int, *, max_image_bytes: int) -> bytes:
    if text.startswith("data:") and "," in text[:200]:
        text = text.split(",", 1)[1]
    text = "".join(text.split())
    if len(text) * 3 // 4 > max_image_bytes + 3:
        raise InvalidImageError(row, "too_many_bytes", f"about {len(text) * 3 // 4} bytes (base64 of "
                                f"{len(text)} characters) > max_image_bytes={max_image_bytes}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(row, "bad_base64", f"a string that is not base64-encoded image bytes ({exc})") \
            from None


def decode(data: bytes, row: int, *, max_image_bytes: int, max_pixels: int,
           allowed_formats: list[str] | None = None, draft_to: int | None = None) -> Image.Image:
    """Encoded bytes -> a loaded image, through ingest's own guarded opener (``tasks.core.imaging.open_image``).

    ``allowed_formats``: the formats the model was trained with (``None``: any Pillow opens).
    """
    if len(data) > max_image_bytes:
        raise InvalidImageError(row, "too_many_bytes", f"{len(data)} bytes > max_image_bytes={max_image_bytes}")
    try:
        return open_image(data, max_pixels=max_pixels, allowed_formats=allowed_formats, setting="",
                          draft_to=draft_to)
    except ImageRejected as exc:
        detail = exc.detail
        if exc.reason == "format_not_allowed":
            detail += ": the formats this model was trained with"
        raise InvalidImageError(row, _REASONS.get(exc.reason, exc.reason), detail) from None


def from_array(arr: np.ndarray, row: int, *, max_pixels: int) -> Image.Image:
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
    if h * w > max_pixels:
        raise InvalidImageError(row, "too_many_pixels", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}")
    return Image.fromarray(np.ascontiguousarray(arr))


def _is_na(value: Any) -> bool:
    try:
        import pandas as pd

        return value is pd.NA or value is pd.NaT
    except ImportError:  # pragma: no cover - pandas is a serving requirement
        return False
