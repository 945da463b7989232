"""Lineage every result carries: git SHA (+ dirty flag), environment hash, data versions."""
from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path

from tasks import io


def git(*args: str, root: str | Path = ".") -> str | None:
    """stdout of a git command, or None when git is missing, times out or fails (e.g. not a repository)."""
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_state(root: str | Path = ".") -> dict:
    sha = git("rev-parse", "HEAD", root=root)
    status = git("status", "--porcelain", "--untracked-files=no", root=root)
    return {"git_sha": sha or "unknown", "git_dirty": bool(status) if status is not None else None}


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
