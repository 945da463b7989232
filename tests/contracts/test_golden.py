"""The train stage's weights, bit for bit, through any restructuring: the golden runs recorded before it."""
from __future__ import annotations

import pytest

from tests.contracts.golden import GOLDEN, record_for_this_machine, record_key, records, run_all


@pytest.mark.slow
def test_golden_training_runs_are_bitwise_identical(tmp_path):
    rec = record_for_this_machine()
    if rec is None:
        pytest.skip(f"{GOLDEN.name} has no record for this CPU ({record_key()!r}; recorded: {sorted(records())}): "
                    "bitwise weights depend on the CPU's kernels. Record one on a commit whose weights you trust: "
                    "python -m tests.contracts.golden --record")
    want = rec["runs"]
    got = run_all(tmp_path)
    assert got.keys() == want.keys()
    diff = {name: (got[name], want[name]) for name in want if got[name] != want[name]}
    assert not diff, f"model_sha256 changed on {record_key()} for {sorted(diff)}: {diff}"
