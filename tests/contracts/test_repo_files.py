"""What the repository itself must (not) hold."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dvc_lock_is_not_committed():
    """dvc.lock records one run's md5s (data, weights) on one machine; a committed copy goes stale with the next
    code change and was seeded into cluster workspaces as if it described them. `dvc repro` writes the user's own;
    they commit theirs with the data version it records."""
    tracked = subprocess.run(["git", "ls-files", "dvc.lock"], cwd=REPO, capture_output=True, text=True, check=True)
    assert tracked.stdout.strip() == "", ("dvc.lock is tracked: `git rm --cached dvc.lock` (it is the user's record, "
                                          "written by their `dvc repro`, not part of keel)")
