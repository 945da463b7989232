"""The train stage's weights, bit for bit, through any restructuring: the golden runs recorded before it."""
from __future__ import annotations

import json

import pytest

from tests.contracts.golden import GOLDEN, run_all


@pytest.mark.slow
def test_golden_training_runs_are_bitwise_identical(tmp_path):
    want = json.loads(GOLDEN.read_text())
    got = run_all(tmp_path)
    assert got.keys() == want.keys()
    diff = {name: (got[name], want[name]) for name in want if got[name] != want[name]}
    assert not diff, f"model_sha256 changed for {sorted(diff)}: {diff}"
