"""The tracking interface the training loop talks to (it never imports MLflow or Prefect).

``MetricLogger`` is what the loop calls; ``JsonlLogger`` writes the same stream to files (always on, rank 0 only);
the MLflow implementation lives in ``tasks.core.tracking`` and is plugged in by the CLI when a tracking URI is set.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from tasks.core.secrets import redact


class MetricLogger(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_event(self, name: str, detail: str, step: int) -> None: ...
    def log_artifact(self, path: str | Path) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def close(self, status: str = "FINISHED") -> None: ...


class OpenTracker(Protocol):
    """Opens the tracking run for rank 0 once set-up knows what it resumes: ``resume_run_id`` is the run last.pt
    recorded (None for a fresh start), ``run_info`` the run's lineage (config, data versions, git). The stage
    closes the logger it returns."""

    def __call__(self, resume_run_id: str | None, run_info: dict[str, Any]) -> MetricLogger: ...


class NullLogger:
    """For ranks other than 0: every call is a no-op."""

    def log_params(self, params): pass
    def log_metrics(self, metrics, step): pass
    def log_event(self, name, detail, step): pass
    def log_artifact(self, path): pass
    def set_tags(self, tags): pass
    def close(self, status="FINISHED"): pass


class JsonlLogger:
    """Appends every metric/event as one JSON line; events are also printed to the console."""

    def __init__(self, path: str | Path, echo=sys.stderr):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)  # noqa: SIM115 - held open for the run; line-buffered
        self.echo = echo

    def _write(self, rec: dict) -> None:
        rec["time"] = time.time()
        self._f.write(json.dumps(redact(rec)) + "\n")

    def log_params(self, params):
        self._write({"kind": "params", "params": params})

    def log_metrics(self, metrics, step):
        self._write({"kind": "metrics", "step": step, **{k: float(v) for k, v in metrics.items()}})

    def log_event(self, name, detail, step):
        self._write({"kind": "event", "step": step, "name": name, "detail": detail})
        if self.echo is not None:
            print(f"train: [{name}] step {step}: {redact(str(detail))}", file=self.echo, flush=True)

    def log_artifact(self, path):
        self._write({"kind": "artifact", "path": str(path)})

    def set_tags(self, tags):
        self._write({"kind": "tags", "tags": tags})

    def close(self, status="FINISHED"):
        if not self._f.closed:
            self._write({"kind": "end", "status": status})
            self._f.close()


class MultiLogger:
    def __init__(self, *loggers: MetricLogger):
        self.loggers = loggers

    def __getattr__(self, name):
        def call(*a, **kw):
            for lg in self.loggers:
                getattr(lg, name)(*a, **kw)
        return call
