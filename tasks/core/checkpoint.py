"""The one way keel writes and reads a checkpoint (best.pt, last.pt, an init checkpoint, served weights).

``save`` is atomic (temp file, then rename: a killed process never leaves a half-written checkpoint that looks
finished). ``load`` only ever uses torch's safe loader (``weights_only=True``): a checkpoint holds tensors and
plain values (dicts, lists, numbers, strings), never a pickled object. Unpickling runs whatever code the file
names, and a checkpoint may come from a user, a colleague or a DVC remote, so keel has no unsafe path at all: a
file the safe loader refuses is an :class:`UnsafeCheckpointError` naming the file and what it tried to load.
Everything keel itself saves is plain by construction (RNG states are stored as tensors and lists of ints:
``tasks.train.callbacks.last_checkpoint.rng_state``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.core.errors import DataError


class UnsafeCheckpointError(DataError):
    """torch's safe loader refused the file: it holds pickled Python objects, not only tensors and plain values."""


def save(path: str | Path, blob: Any) -> None:
    import torch

    from tasks.core import io  # here, not at import: the served model loads weights without pyarrow

    with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
        # through a file object: given a path, torch names the zip's records after it (the random temp name),
        # so two saves of the same blob would differ in bytes and in dvc.lock's md5
        torch.save(blob, f)


def load(path: str | Path, map_location: Any = "cpu", *, what: str = "checkpoint") -> Any:
    """``torch.load(..., weights_only=True)``; a refusal becomes an :class:`UnsafeCheckpointError`."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():
            raise  # not a refused object but an unreadable file (garbage, truncated): the caller's "unreadable"
        # torch's message names the offending global ("Unsupported global: GLOBAL posix.system ...") and then
        # advises turning the safe loader off: quote the first part only
        said = next((line.strip() for line in str(exc).splitlines() if "global" in line.lower()),
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__).split(". Please")[0]
        said = said.removeprefix("WeightsUnpickler error: ")
        raise UnsafeCheckpointError(
            f"{path}: refused to load this {what}: it holds pickled Python objects, not only tensors and plain "
            f"values (torch's safe loader said: {said[:300]}). keel never unpickles a checkpoint, because "
            "unpickling runs whatever code the file names. If you made it: save tensors only, e.g. "
            "torch.save(model.state_dict(), path); a keel checkpoint from before safe checkpoints: delete it and "
            "re-run `keel train`.") from None
