"""``loop.run`` ends the tracking run in every case: FINISHED, FAILED (an error, a halt) or KILLED (SIGTERM)."""
from __future__ import annotations

import signal
from types import SimpleNamespace

import pytest

from tasks.core.config import Paths, TrainConfig
from tasks.train import loop, setup


class Recorder:
    def __init__(self):
        self.closed: list[str] = []

    def close(self, status="FINISHED"):
        self.closed.append(status)


def _run_with(monkeypatch, fit, cfg=None):
    files, tracker = Recorder(), Recorder()
    monkeypatch.setattr(setup, "build", lambda *a, **kw: SimpleNamespace(files=files, fit=fit))
    try:
        return loop.run(cfg or TrainConfig(device="cpu"), Paths(), logger=tracker)
    finally:
        assert files.closed == tracker.closed and len(tracker.closed) == 1
        _run_with.status = tracker.closed[0]


def _raise(exc):
    def fit():
        raise exc
    return fit


@pytest.mark.parametrize(("fit", "status", "raises"), [
    (lambda: "result", "FINISHED", None),
    (_raise(SystemExit(128 + signal.SIGTERM)), "KILLED", SystemExit),
    (_raise(KeyboardInterrupt()), "KILLED", KeyboardInterrupt),
    (_raise(loop.TrainError("non-finite loss")), "FAILED", loop.TrainError),
    (_raise(RuntimeError("a bug")), "FAILED", RuntimeError),
])
def test_the_tracking_run_is_always_closed(monkeypatch, fit, status, raises):
    if raises is None:
        assert _run_with(monkeypatch, fit) == "result"
    else:
        with pytest.raises(raises):
            _run_with(monkeypatch, fit)
    assert _run_with.status == status


def test_a_bad_launch_closes_the_tracking_run_failed():
    tracker = Recorder()
    with pytest.raises(loop.TrainError, match="train.devices=2 but the launcher started 1 process"):
        loop.run(TrainConfig(devices=2), Paths(), logger=tracker)
    assert tracker.closed == ["FAILED"]
