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


def test_every_reject_code_is_documented_with_its_meaning():
    """docs/contracts.md's reject-code table is tasks.ingest.REASONS, row for row: a code added, renamed or reworded
    in the code without the page (or the other way round) fails here."""
    import re

    from tasks.ingest import REASONS

    text = (REPO / "docs" / "contracts.md").read_text()
    table = dict(re.findall(r"^\| `([a-z_]+)` \| (.+) \|$", text, flags=re.MULTILINE))
    assert table == REASONS, {k: (table.get(k), REASONS.get(k)) for k in set(table) | set(REASONS)
                              if table.get(k) != REASONS.get(k)}
    assert "At least two classes" in text and "One layout" in text
