"""``keel train``: the preflight gate (``train.preflight``), the MLflow run for rank 0, then the train stage.

The loop itself never imports MLflow: it receives the logger through the small ``MetricLogger`` interface. The
run is opened by set-up, once last.pt has said whether this training resumes one (``tasks.train.logger.
OpenTracker``): a resumed training continues its own run. It is named ``<model>-<data version>``, carries
MLflow's run context tags and keel's lineage commit, and records the shards as its dataset input.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.core.config import Params
from tasks.train import loop
from tasks.train.logger import OpenTracker

EXPERIMENT = "keel"
RUN_TAGS_ENV = "KEEL_RUN_TAGS"  # JSON {tag: value} added to a new run's tags (flows/sweep.py sets it per trial)
DATASET_NAME = "shards (train+val)"


def main(params: Params) -> loop.TrainResult:
    checked = params.train.preflight and os.environ.get("RANK", "0") == "0"
    report = None
    if checked:
        from tasks.discipline import preflight

        preflight.require(params)  # PreflightFailed (a DataError) stops the stage
        report = preflight.report_path(params.paths)  # the checklist this run passed, on its MLflow run
    tracker = _tracker(params, report)
    if tracker is None:
        return loop.run(params.train, params.paths)
    with _sigterm_exits():
        return loop.run(params.train, params.paths, tracker=tracker)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM outside the fit (set-up, the final writes) would end the process at once and leave the MLflow run
    RUNNING: raise SystemExit(143) instead, which ``loop.run`` closes as KILLED. During the fit the SigTerm
    callback's handler takes over (a graceful stop after a last.pt) and puts this one back after. Rank 0 only:
    the other ranks have no run to close."""
    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)


def _tracker(params: Params, preflight_report: Path | None) -> OpenTracker | None:
    """What opens the MLflow run for rank 0, when keel's tracking module (and so MLflow) is available."""
    if int(os.environ.get("RANK", "0")) != 0 or os.environ.get("KEEL_TRACKING", "mlflow") == "off":
        return None
    try:
        from tasks.core import tracking
        from tasks.core.project import project_home
    except ImportError:
        return None

    def open_run(resume_run_id: str | None, run_info: dict[str, Any]):
        lg = tracking.open_run(EXPERIMENT, run_name(run_info), tracking.tracking_uri(project_home()),
                               tags=run_tags(run_info), resume_run_id=resume_run_id)
        try:
            digest = run_info.get("shard_index_sha256") or "unknown"
            lg.log_dataset(DATASET_NAME, digest, _source(params.paths.shards_dir), context="training",
                           tags={"keel.shard_index_sha256": digest,
                                 "keel.split_manifest_sha256": run_info.get("split_manifest_sha256")})
            if preflight_report is not None:
                lg.log_artifact(preflight_report)
        except BaseException as exc:  # the run exists now: end it, as loop.run would
            lg.close(loop.end_status(exc))
            raise
        return lg

    return open_run


def run_name(run_info: dict[str, Any]) -> str:
    """``<model>-<first 8 of the shard index sha256>``: which recipe on which data, readable in the runs table."""
    model = (run_info.get("config") or {}).get("model", "train")
    data = run_info.get("shard_index_sha256")
    return f"{model}-{data[:8]}" if data else model


def run_tags(run_info: dict[str, Any]) -> dict[str, str]:
    """keel's tags for a new run; ``mlflow.source.git.commit`` is keel's lineage commit (the project checkout, or
    ``KEEL_GIT_SHA`` in an image) when known, else MLflow's own guess from the entry script's checkout."""
    tags = {"keel.stage": "train"}
    sha = run_info.get("git_sha")
    if sha and sha != "unknown":
        tags["mlflow.source.git.commit"] = sha
    # a sweep trial: its parent run (mlflow.parentRunId nests it in the UI), the study and the trial number
    extra = json.loads(os.environ.get(RUN_TAGS_ENV) or "{}")
    return {**tags, **{str(k): str(v) for k, v in extra.items()}}


def _source(shards_dir: str) -> str:
    return shards_dir if "://" in shards_dir else str(Path(shards_dir).resolve())
