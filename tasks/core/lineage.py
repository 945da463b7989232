"""Lineage every result carries: git SHA (+ dirty flag), environment hash, data versions."""
from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from pathlib import Path

from tasks.core import io


def git(*args: str, root: str | Path = ".") -> str | None:
    """stdout of a git command, or None when git is missing, times out or fails (e.g. not a repository)."""
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


# Written by `dvc repro` itself while the pipeline runs (data versions are recorded by their own hashes), so a
# change there does not make the code dirty: otherwise every model trained by `dvc repro` would be "dirty".
DVC_WRITTEN = ("dvc.lock",)


# Set by the image build (infra/Dockerfile: `--build-arg KEEL_GIT_SHA=$(git rev-parse HEAD)`): the commit the image's
# code came from, for where there is no repository (the image has no .git).
IMAGE_SHA_ENV = "KEEL_GIT_SHA"
IMAGE_SHA_SOURCE = "KEEL_GIT_SHA (image build)"


def git_state(root: str | Path = ".") -> dict:
    """``git_sha`` (HEAD) and ``git_dirty`` (uncommitted changes to tracked files, dvc.lock aside) of the repository
    at ``root``.  With no repository there (or no git), ``KEEL_GIT_SHA`` from the environment when it is set: then
    ``git_dirty`` is None (unknown: the build context's state is not recorded) and ``git_sha_source`` says where the
    SHA came from.  Neither: ``git_sha`` "unknown"."""
    sha = git("rev-parse", "HEAD", root=root)
    if sha is None:
        built = os.environ.get(IMAGE_SHA_ENV, "").strip()
        if built and built != "unknown":  # the Dockerfile's default when no --build-arg was given
            return {"git_sha": built, "git_dirty": None, "git_sha_source": IMAGE_SHA_SOURCE}
    changed = dirty_files(root) if sha is not None else None
    return {"git_sha": sha or "unknown", "git_dirty": bool(changed) if changed is not None else None}


def dirty_files(root: str | Path = ".") -> list[str] | None:
    """Tracked files with uncommitted changes (staged or not) under ``root``, the DVC-written files aside (the one
    definition of "dirty" for lineage and preflight); None when there is no repository or no git."""
    out = git("diff", "--name-only", "HEAD", "--", ".", *(f":(exclude){f}" for f in DVC_WRITTEN), root=root)
    return None if out is None else [line for line in out.splitlines() if line.strip()]


def code_version(root: str | Path = ".", under: str = "tasks") -> dict:
    """Short commit plus uncommitted changes under ``under`` (what a benchmark figure was measured on)."""
    dirty = git("status", "--porcelain", "--", under, root=root)
    return {"commit": git("rev-parse", "--short", "HEAD", root=root),
            f"{under}_dirty": None if dirty is None else bool(dirty),
            f"{under}_changes": dirty.splitlines() if dirty else []}


def environment_hash(root: str | Path = ".") -> str:
    """sha256 over the lock file, the Python version and torch's build (CUDA version included)."""
    h = hashlib.sha256()
    lock = Path(root) / "requirements.lock"
    h.update(lock.read_bytes() if lock.exists() else b"no-lock-file")
    h.update(platform.python_version().encode())
    try:
        import torch

        h.update(f"{torch.__version__}|{torch.version.cuda}".encode())
    except ImportError:
        pass
    return h.hexdigest()


def data_versions(shards_dir: str | Path, manifest: str | Path) -> dict:
    index = Path(shards_dir) / "index.json"
    return {"shard_index_sha256": io.sha256_file(index) if index.exists() else None,
            "split_manifest_sha256": io.sha256_file(manifest) if Path(manifest).exists() else None}


def model_sha256(state_dict: dict, model_name: str) -> str:
    """A model's identity, independent of the lineage stored beside its weights in best.pt: sha256 over the state
    dict (sorted keys; per key: the key's utf-8 bytes, ``str(dtype)``, ``str(tuple(shape))`` and the tensor's
    bytes in C order) followed by the model name's utf-8 bytes.  The evaluate stage records it in the test ledger
    and test metrics; register checks it and tags the registered version with it."""
    import hashlib

    import torch

    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} is a {type(t).__name__}, not a tensor")
        h.update(key.encode("utf-8"))
        h.update(str(t.dtype).encode("utf-8"))
        h.update(str(tuple(t.shape)).encode("utf-8"))
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    h.update(model_name.encode("utf-8"))
    return h.hexdigest()
