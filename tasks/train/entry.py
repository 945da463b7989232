"""``keel train``: the preflight gate (``train.preflight``), the MLflow logger for rank 0, then the train stage.

The loop itself never imports MLflow: it receives the logger through the small ``MetricLogger`` interface.
"""
from __future__ import annotations

import os
from pathlib import Path

from tasks.core.config import Params
from tasks.train import loop


def main(params: Params) -> loop.TrainResult:
    checked = params.train.preflight and os.environ.get("RANK", "0") == "0"
    if checked:
        from tasks.discipline import preflight

        preflight.require(params)  # PreflightFailed (a DataError) stops the stage
    tracker = _tracker()
    if checked and tracker is not None:  # the checklist this run passed, on its MLflow run
        tracker.log_artifact(preflight.report_path(params.paths))
    return loop.run(params.train, params.paths, logger=tracker)


def _tracker():
    """The MLflow logger for rank 0, when keel's tracking module (and so MLflow) is available."""
    if int(os.environ.get("RANK", "0")) != 0 or os.environ.get("KEEL_TRACKING", "mlflow") == "off":
        return None
    try:
        from tasks.core import tracking
    except ImportError:
        return None
    return tracking.MlflowLogger(experiment="keel", run_name="train", tracking_uri=tracking.tracking_uri(Path.cwd()),
                                 tags={"keel.stage": "train"})
