"""Prepare the DVC project directory a cluster pod works in, from the project files baked into the image.

    python -m flows.workspace --source /opt/keel --workspace /workspace

On the cluster the keel image holds the code and the recipe at ``/opt/keel`` (read-only, no ``.git``), and the
``keel-workspace`` volume (mounted at ``/workspace``) holds everything that must outlive a pod: the stage outputs
(``data/``, ``models/``, ``metrics/``, ``reports/``), the test-access ledger (``data/test_ledger``), ``dvc.lock``
(the cluster's record of what each stage last ran on) and the DVC cache (``.dvc/cache``).  The workspace is the
DVC project root the flow runs in; ``init_workspace`` makes it one:

- the image is the source of truth for code and recipe: ``dvc.yaml``, ``params.yaml``, ``pyproject.toml``,
  ``requirements.lock`` (the environment hash reads it), ``.dvcignore``, ``.dvc/config`` and the folders
  ``tasks/`` and ``flows/`` are copied in and overwritten; files in those folders that the image no longer has are
  removed (DVC hashes ``tasks/train`` as a folder, and a stale module must not be importable);
- ``dvc.lock`` is seeded from the image only when the workspace has none (the workspace's own is the record);
- with no ``.git`` in the workspace, ``.dvc/config.local`` gets ``[core] no_scm = true`` (DVC otherwise refuses a
  project outside a git repository); the committed ``.dvc/config`` never does, and other settings already in
  ``config.local`` (e.g. the flow's ``keel-env`` remote) are kept;
- ``data/``, ``models/``, ``metrics/``, ``reports/``, ``mlruns/``, ``.dvc/cache``, ``.dvc/tmp`` and an existing
  ``dvc.lock`` are never touched.

Every file is written to a temporary name in its folder and renamed into place (``os.replace``); ``dvc.lock`` is
seeded with a hard link that fails if one appeared meanwhile, so a concurrent ``dvc repro`` is never overwritten.
One line per action is printed.  Errors name the path (``WorkspaceError``; exit 1 on the command line).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

FILES = ("dvc.yaml", "params.yaml", "pyproject.toml", "requirements.lock", ".dvcignore", ".dvc/config")
FOLDERS = ("tasks", "flows")
LOCK = "dvc.lock"
LOCAL_CONFIG = ".dvc/config.local"
_TMP_PREFIX = ".keel-ws-"           # temporary files of this module (skipped when pruning stale files)
_SKIP = ("__pycache__",)


class WorkspaceError(RuntimeError):
    """The workspace cannot be prepared; the message names the path and what to check."""


def _temp_copy(dest: Path, data: bytes, mode: int) -> str:
    """``data`` in a new temporary file beside ``dest`` (same folder, so a rename is atomic); returns its path."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f"{_TMP_PREFIX}{dest.name}.", suffix=".tmp")
    except OSError as exc:
        raise WorkspaceError(f"{dest.parent}: cannot create a file there ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), mode)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise WorkspaceError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    return tmp


def _write_atomic(dest: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = _temp_copy(dest, data, mode)
    try:
        os.replace(tmp, dest)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise WorkspaceError(f"{dest}: cannot write ({exc.strerror or exc})") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise WorkspaceError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _mode(src: Path) -> int:
    """The source file's permission bits, writable by the owner (the image's files are root's, read-only)."""
    return (src.stat().st_mode & 0o777) | 0o600


def _same(dest: Path, data: bytes) -> bool:
    try:
        return dest.is_file() and dest.read_bytes() == data
    except OSError:
        return False


def _tree(root: Path) -> set[str]:
    """Files under ``root`` (relative posix paths), without caches and this module's temporary files."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if (p.is_file() or p.is_symlink()) and not set(p.relative_to(root).parts) & set(_SKIP)
            and not p.name.endswith(".pyc") and not p.name.startswith(_TMP_PREFIX)}


def _sync_folder(src: Path, dest: Path) -> tuple[int, int, int]:
    """Make ``dest`` hold exactly the files of ``src``; returns (written, removed, unchanged)."""
    if dest.exists() and not dest.is_dir():
        raise WorkspaceError(f"{dest}: exists and is not a directory (the image's {src.name}/ goes there)")
    want = _tree(src)
    written = unchanged = removed = 0
    for rel in sorted(want):
        data = _read(src / rel)
        if _same(dest / rel, data):
            unchanged += 1
        else:
            _write_atomic(dest / rel, data, _mode(src / rel))
            written += 1
    if dest.is_dir():
        for rel in sorted(_tree(dest) - want):
            try:
                (dest / rel).unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise WorkspaceError(f"{dest / rel}: cannot remove a file the image no longer has "
                                     f"({exc.strerror or exc})") from None
            removed += 1
        # folders left empty by the removal (deepest first), unless the image has them
        for d in sorted((p for p in dest.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            if not (src / d.relative_to(dest)).is_dir():
                try:
                    d.rmdir()
                except OSError:
                    pass  # not empty (a cache folder): leave it
    return written, removed, unchanged


def _seed_lock(src: Path, dest: Path) -> str:
    if dest.exists():
        return f"kept {LOCK} (the workspace's record of what each stage ran on)"
    if not src.is_file():
        return f"no {LOCK} in the image or the workspace: dvc repro will write one"
    tmp = _temp_copy(dest, _read(src), 0o644)
    try:
        os.link(tmp, dest)  # no-clobber: fails if a dvc.lock appeared since the check above
    except FileExistsError:
        return f"kept {LOCK} (written meanwhile by another process)"
    except OSError as exc:  # a volume without hard links: rename, unless one appeared meanwhile
        if dest.exists():
            return f"kept {LOCK} (written meanwhile by another process)"
        try:
            os.replace(tmp, dest)
        except OSError:
            raise WorkspaceError(f"{dest}: cannot write ({exc.strerror or exc})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return f"seeded {LOCK} from the image (none in the workspace yet)"


def _no_scm(workspace: Path) -> str:
    path = workspace / LOCAL_CONFIG
    if (workspace / ".git").exists():
        return f"{workspace} is a git repository: core.no_scm not set"
    from configobj import ConfigObj, ConfigObjError  # DVC's own config format (a dependency of dvc)

    try:
        conf = ConfigObj(str(path), encoding="utf-8", file_error=False)
    except (ConfigObjError, OSError) as exc:
        raise WorkspaceError(f"{path}: not a readable DVC config ({exc}); fix or delete it") from None
    core = conf.get("core")
    if isinstance(core, dict) and str(core.get("no_scm", "")).strip().lower() == "true":
        return f"unchanged {LOCAL_CONFIG} (core.no_scm = true)"
    if core is not None and not isinstance(core, dict):
        raise WorkspaceError(f"{path}: 'core' is a value, not a section; fix or delete the file")
    conf.setdefault("core", {})["no_scm"] = "true"
    conf.filename = None
    lines = [ln.decode("utf-8") if isinstance(ln, bytes) else ln for ln in conf.write()]
    _write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return f"set core.no_scm = true in {LOCAL_CONFIG} (no .git in the workspace)"


def init_workspace(source: str | os.PathLike, workspace: str | os.PathLike,
                   echo: Callable[[str], None] | None = print) -> list[str]:
    """Make ``workspace`` a DVC project with ``source``'s code and recipe, keeping its data, outputs, cache and
    ``dvc.lock`` (see the module docstring); returns the action lines (also passed to ``echo``)."""
    src = Path(source).absolute()
    ws = Path(workspace).absolute()
    if not src.is_dir():
        raise WorkspaceError(f"source {src}: no such directory (the image's project root, e.g. /opt/keel)")
    missing = [rel for rel in (*FILES, *FOLDERS) if not (src / rel).exists()]
    if missing:
        raise WorkspaceError(f"source {src}: {', '.join(missing)} missing: not a keel project root (the image "
                             "copies them to /opt/keel; infra/Dockerfile.dockerignore must let them in)")
    if ws.exists() and not ws.is_dir():
        raise WorkspaceError(f"workspace {ws}: exists and is not a directory")
    if ws.resolve() == src.resolve() or ws.resolve().is_relative_to(src.resolve()) \
            or src.resolve().is_relative_to(ws.resolve()):
        raise WorkspaceError(f"workspace {ws} and source {src} overlap: the workspace must be a separate directory "
                             "(e.g. the keel-workspace volume at /workspace)")
    try:
        ws.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(f"workspace {ws}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(ws, os.W_OK | os.X_OK):
        raise WorkspaceError(f"workspace {ws}: not writable by uid {os.getuid()} (on Kubernetes: the pod's "
                             "fsGroup must own the volume)")

    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if echo is not None:
            echo(line)

    say(f"workspace {ws} from {src}")
    _populate(src, ws, say)
    return lines


def _populate(src: Path, ws: Path, say: Callable[[str], None]) -> None:
    """The image's files, folders and (when absent) dvc.lock into ``ws``; core.no_scm when it has no .git."""
    for rel in FILES:
        data = _read(src / rel)
        dest = ws / rel
        if dest.is_dir():
            raise WorkspaceError(f"{dest}: is a directory (the image's {rel} goes there)")
        if _same(dest, data):
            say(f"unchanged {rel}")
        else:
            existed = dest.exists()
            _write_atomic(dest, data, _mode(src / rel))
            say(f"{'updated' if existed else 'wrote'} {rel}")
    for rel in FOLDERS:
        written, removed, unchanged = _sync_folder(src / rel, ws / rel)
        say(f"synced {rel}/: {written} written, {removed} removed, {unchanged} unchanged")
    say(_seed_lock(src / LOCK, ws / LOCK))
    say(_no_scm(ws))


def trial_copy(root: str | os.PathLike, dest: str | os.PathLike, cache_dir: str | os.PathLike) -> list[str]:
    """A fresh DVC project at ``dest`` for one sweep trial run as a job (``flows.sweep_trial``): ``root``'s code,
    recipe and ``dvc.lock`` (what ``init_workspace`` copies from an image), core.no_scm, and the DVC cache (with its
    run-cache) at ``cache_dir``, ``root``'s: stages restored from it are not run again, and the trial's training
    lands in it, so promoting the trial in ``root`` later restores it instead of training again. ``dest`` must not
    exist yet (it is inside ``root``'s ``.dvc/tmp``, as ``dvc exp run --temp`` keeps its copies)."""
    src, out = Path(root).absolute(), Path(dest).absolute()
    if out.exists():
        raise WorkspaceError(f"{out}: exists already (a trial's copy is made once; remove it to run the trial again)")
    out.mkdir(parents=True)
    lines: list[str] = []
    _populate(src, out, lines.append)
    from configobj import ConfigObj

    conf = ConfigObj(str(out / LOCAL_CONFIG), encoding="utf-8", file_error=False)
    conf.setdefault("cache", {})["dir"] = str(Path(cache_dir).absolute())
    conf.setdefault("cache", {})["type"] = "reflink,hardlink,copy"   # the shards linked, not copied, per trial
    conf.filename = None
    lines_ = [ln.decode("utf-8") if isinstance(ln, bytes) else ln for ln in conf.write()]
    _write_atomic(out / LOCAL_CONFIG, ("\n".join(lines_) + "\n").encode("utf-8"))
    lines.append(f"cache.dir = {cache_dir}, cache.type = reflink,hardlink,copy in {LOCAL_CONFIG}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.workspace", description=(
        "Prepare a DVC workspace from the image's project files: code and recipe copied in (overwritten), "
        "dvc.lock seeded only if absent, core.no_scm in .dvc/config.local when there is no .git; data, outputs, "
        "the DVC cache and an existing dvc.lock are kept."))
    p.add_argument("--source", default="/opt/keel", help="the image's project root (default: /opt/keel)")
    p.add_argument("--workspace", default="/workspace", help="the workspace directory (default: /workspace)")
    args = p.parse_args(argv)
    try:
        init_workspace(args.source, args.workspace)
    except WorkspaceError as exc:
        print(f"keel workspace: error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
