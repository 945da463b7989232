"""The one way keel writes and reads a checkpoint (best.pt, last.pt, an init checkpoint, served weights).

``save`` is atomic (temp file, then rename: a killed process never leaves a half-written checkpoint that looks
finished). ``load`` uses torch's safe loader (``weights_only=True``) unless the caller passes
``unpickle=True``. The callers that still pass it are listed by ``grep -rn unpickle=True tasks``. They exist
because last.pt holds NumPy/Python RNG state and best.pt's ``run_info`` may hold objects outside the safe
allow-list. Making those safe too means storing plain types and then removing the flag; keeping the flag in this
one module keeps that work in one place.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def save(path: str | Path, blob: Any) -> None:
    import torch

    from tasks.core import io  # here, not at import: the served model loads weights without pyarrow

    with io.atomic_path(path) as tmp:
        torch.save(blob, tmp)


def load(path: str | Path, map_location: Any = "cpu", *, unpickle: bool = False) -> Any:
    """``torch.load`` with ``weights_only=not unpickle``; ``unpickle=True`` runs arbitrary pickled code."""
    import torch

    return torch.load(path, map_location=map_location, weights_only=not unpickle)


def load_with_fallback(path: str | Path, map_location: Any = "cpu") -> Any:
    """The safe loader first; the full unpickler only for a file the safe loader refuses (an older keel
    checkpoint with objects outside its allow-list)."""
    import pickle

    try:
        return load(path, map_location)
    except pickle.UnpicklingError:
        return load(path, map_location, unpickle=True)
