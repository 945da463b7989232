"""tasks.core.parallel.bounded_map on the local process pool: order, and what happens when a task raises."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from tasks.core.parallel import bounded_map


def _square_or_fail(job: tuple[str, int]) -> int:
    folder, k = job
    if k == 0:
        raise ValueError("item 0 is broken")
    time.sleep(0.2)
    Path(folder, f"ran-{k}").touch()
    return k * k


def test_results_come_in_order(tmp_path):
    jobs = [(str(tmp_path), k) for k in range(1, 13)]
    assert list(bounded_map(_square_or_fail, jobs, workers=2, max_in_flight=3)) == [k * k for k in range(1, 13)]


def test_a_failing_task_cancels_the_queued_ones(tmp_path):
    """The error reaches the caller, and the tasks still queued behind it are cancelled rather than run to the
    end (on a stage's S3 outage that is minutes of fetches for nothing): of 23 queued tasks, only those already
    handed to the two processes run (the pool passes a few ahead), not all."""
    jobs = [(str(tmp_path), k) for k in range(24)]
    with pytest.raises(ValueError, match="item 0 is broken"):
        list(bounded_map(_square_or_fail, jobs, workers=2, max_in_flight=24))
    ran = len(list(tmp_path.glob("ran-*")))
    assert ran <= 8, f"{ran} of the 23 tasks queued behind the failure ran"
