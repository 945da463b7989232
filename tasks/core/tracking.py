"""MLflow tracking for keel: the only module that imports ``mlflow`` (always inside functions, never at import).

``tracking_uri(root)`` picks the store: ``MLFLOW_TRACKING_URI`` when set, else an embedded SQLite file inside the
project (``<root>/mlruns/mlflow.db``, artifacts in ``<root>/mlruns/artifacts``).  ``MlflowLogger`` implements the
``tasks.train.logger.MetricLogger`` protocol with ``MlflowClient`` and explicit run ids, so it never touches
MLflow's global "active run" and two loggers can live in one process.

How each call shows up in the MLflow UI:

* ``log_params``: nested dicts are flattened with dots (``optim.lr``), values stringified; a value longer than
  MLflow's 6000-char limit is truncated (the untruncated set is also kept as the artifact ``params.json``).
  Re-logging an identical value (e.g. on resume) is a no-op; a changed value cannot overwrite a param in MLflow,
  so it is recorded as a ``param_changed`` event and a warning instead of crashing training.
* ``log_metrics``: buffered and sent with ``log_batch`` (at most every ``flush_interval_s`` seconds, when the
  buffer is full, before events/artifacts/tags, and at ``close``).
* ``log_event``: a line in the artifact ``events.jsonl`` (uploaded at close, carried over on resume), the metric
  ``events_count`` (a point on the charts at the step it happened) and the tag ``last_event`` (visible live in
  the run overview).
* ``close(status)``: FINISHED / FAILED / KILLED.
* a new run carries the tags ``mlflow.start_run`` would give it (``mlflow.user``, ``mlflow.source.name`` and
  ``.type``, ``mlflow.source.git.commit``: MLflow's own context providers, ``context_tags``), then keel's.
* ``log_dataset``: an MLflow dataset input (the run's "Datasets used"): name, digest, source and context.

``open_run`` is how a training gets its run: the one last.pt recorded when the server still has it (a resumed
training continues its own run), else a new one tagged ``keel.replaces_run_id``.

The fluent API's run context (``mlflow.start_run``/``mlflow.log_input``) is reproduced here on explicit run ids
rather than used: its active run is process-global, and keel has two runs in one process (``keel train`` with
``train.preflight`` logs its dry step to a run of its own before training).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlparse

from tasks.core.secrets import redact

MAX_PARAM_VAL_LENGTH = 6000      # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VAL_LENGTH = 8000        # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
MAX_KEY_LENGTH = 250             # mlflow.utils.validation.MAX_ENTITY_KEY_LENGTH
MAX_PARAMS_TAGS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_METRICS_PER_BATCH = 1000     # mlflow.utils.validation.MAX_METRICS_PER_BATCH
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
EVENTS_ARTIFACT = "events.jsonl"
PARAMS_ARTIFACT = "params.json"
TRUNCATED = "...[truncated]"
MAX_DATASET_DIGEST_LENGTH = 36   # mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE
REPLACES_TAG = "keel.replaces_run_id"

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


def tracking_uri(project_root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlruns/mlflow.db`` (absolute path)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{(Path(project_root).resolve() / 'mlruns' / 'mlflow.db').as_posix()}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (None for other schemes or an in-memory database)."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite" or parsed.path in ("", "/", "/:memory:"):
        return None
    return Path(unquote(parsed.path[1:] if parsed.path.startswith("//") else parsed.path))


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside the SQLite file for an embedded store (MLflow's own default
    for a bare sqlite URI is ``./mlruns`` in the *current* folder); None (the server decides) otherwise."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.resolve().parent / "artifacts").as_uri()


def _sanitize_key(key: str) -> str:
    k = _BAD_KEY_CHARS.sub("_", str(key))
    # MLflow also refuses keys that are not a normalised relative path ("a//b", "/a", "a/", "..").
    norm = k.replace("/", "_") if ("//" in k or k.startswith("/") or k.endswith("/") or "/./" in k) else k
    if norm in ("", ".") or norm.startswith(".."):
        norm = "_" + norm
    return norm[:MAX_KEY_LENGTH]


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float) or value is None:
        return str(value)
    if isinstance(value, Path):
        return value.as_posix()
    try:
        return json.dumps(value, default=str, sort_keys=True)
    except (TypeError, ValueError):
        return str(value)


def _as_mapping(value: Any) -> Mapping | None:
    if isinstance(value, Mapping):
        return value
    if hasattr(value, "model_dump") and callable(value.model_dump):  # pydantic models (tasks.core.config)
        return value.model_dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return None


def _leaves(params: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(MLflow-safe dotted key, leaf value) pairs; pydantic models and dataclasses are expanded like dicts."""
    for k, v in params.items():
        key = f"{prefix}{k}"
        sub = _as_mapping(v)
        if sub is not None and len(sub) > 0:
            yield from _leaves(sub, prefix=f"{key}.")
        else:
            yield _sanitize_key(key), dict(sub) if sub is not None else v


def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": "0.1"}``; values are strings cut to MLflow's 6000-char
    limit."""
    out: dict[str, str] = {}
    for key, v in _leaves(params):
        s = _stringify(v)
        if len(s) > MAX_PARAM_VAL_LENGTH:
            s = s[: MAX_PARAM_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED
        out[key] = s
    return out


def _truncate_tag(value: Any) -> str:
    s = _stringify(value)
    return s if len(s) <= MAX_TAG_VAL_LENGTH else s[: MAX_TAG_VAL_LENGTH - len(TRUNCATED)] + TRUNCATED


def context_tags(tags: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The tags ``mlflow.start_run`` gives a new run in this process (MLflow's run context providers: user, entry
    script, source type, its git commit, ...), with ``tags`` on top; credentials in a repo URL are redacted."""
    from mlflow.tracking.context.registry import resolve_tags

    return redact(resolve_tags(dict(tags or {})))


def open_run(experiment: str, run_name: str | None, tracking_uri: str, tags: dict[str, Any] | None = None,
             resume_run_id: str | None = None, **kw: Any) -> MlflowLogger:
    """The tracking run of a training: ``resume_run_id`` (from last.pt) reopened when this tracking server still
    has it, so one training is one run however often it resumes; when the run is gone (deleted, another server)
    a new one tagged ``keel.replaces_run_id``, said on stderr. ``kw``: ``MlflowLogger``'s."""
    if resume_run_id is None:
        return MlflowLogger(experiment, run_name, tracking_uri, tags, **kw)
    gone = _gone(tracking_uri, resume_run_id)
    if gone is None:
        return MlflowLogger(experiment, run_name, tracking_uri, tags, resume_run_id=resume_run_id, **kw)
    lg = MlflowLogger(experiment, run_name, tracking_uri, {**(tags or {}), REPLACES_TAG: resume_run_id}, **kw)
    print(f"tracking: run {resume_run_id} (recorded in last.pt) {gone} on {redact(tracking_uri)}; the resumed "
          f"training logs to a new run {lg.run_id}, tagged {REPLACES_TAG}={resume_run_id}", file=sys.stderr)
    return lg


def _gone(tracking_uri: str, run_id: str) -> str | None:
    """Why ``run_id`` cannot be continued on this server ("does not exist", "is deleted"), None when it can."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return "does not exist"
        raise
    return "is deleted" if run.info.lifecycle_stage == "deleted" else None


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i : i + n]


class MlflowLogger:
    """``MetricLogger`` backed by MLflow (see the module docstring for what lands where).

    ``resume_run_id`` reopens an existing run (status back to RUNNING; its experiment wins over ``experiment``);
    otherwise a new run is created in ``experiment`` (created if missing, with artifacts under the project for an
    embedded SQLite store).  Usable as a context manager: an exception closes the run as FAILED (KILLED for
    Ctrl-C).
    """

    def __init__(self, experiment: str, run_name: str | None, tracking_uri: str,
                 tags: dict[str, Any] | None = None, resume_run_id: str | None = None, *,
                 artifact_location: str | None = None, flush_interval_s: float = 5.0,
                 max_buffered_metrics: int = MAX_METRICS_PER_BATCH):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        db = sqlite_path(tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)  # SQLAlchemy creates the file but not its folder
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.flush_interval_s = float(flush_interval_s)
        self.max_buffered_metrics = max(1, int(max_buffered_metrics))
        self._metrics: list = []  # buffered mlflow.entities.Metric
        self._last_flush = time.monotonic()
        self._events: list[str] = []  # JSON lines
        self._logged: dict[str, str] = {}  # flat params as MLflow holds them
        self._params: dict[str, Any] = {}  # the same, untruncated, for params.json
        self._closed = False
        self.resumed = resume_run_id is not None

        if resume_run_id is not None:
            run = self._reopen(resume_run_id)
            self.experiment_id = run.info.experiment_id
        else:
            self.experiment_id = self._experiment_id(experiment, artifact_location)
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags={_sanitize_key(k): _truncate_tag(v)
                                               for k, v in context_tags(redact(dict(tags or {}))).items()})
        self.run_id: str = run.info.run_id
        self.run_name: str = run.info.run_name
        self.artifact_uri: str = run.info.artifact_uri
        if resume_run_id is not None and tags:
            self.set_tags(tags)

    # ---- set-up -------------------------------------------------------------------------------------------
    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            location = artifact_location or default_artifact_location(self.tracking_uri)
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException:  # created concurrently by another process: use theirs
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow experiment {name!r} ({exp.experiment_id}) is deleted; restore it "
                             f"(mlflow experiments restore) or pick another name")
        return exp.experiment_id

    def _reopen(self, run_id: str):
        run = self.client.get_run(run_id)  # raises MlflowException (RESOURCE_DOES_NOT_EXIST) for a bad id
        if run.info.lifecycle_stage == "deleted":
            raise ValueError(f"MLflow run {run_id} is deleted; cannot resume it")
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        # Carry over the params already logged and the event log written by the earlier segment(s).
        self._logged.update(run.data.params)
        self._params.update(run.data.params)
        params_json = self._download_text(run_id, PARAMS_ARTIFACT)
        if params_json:
            self._params.update(json.loads(params_json))
        events = self._download_text(run_id, EVENTS_ARTIFACT) or ""
        self._events = [ln for ln in events.splitlines() if ln.strip()]
        return run

    def _download_text(self, run_id: str, name: str) -> str | None:
        import tempfile

        if name not in {f.path for f in self.client.list_artifacts(run_id)}:
            return None
        with tempfile.TemporaryDirectory(prefix="keel-mlflow-") as d:
            return Path(self.client.download_artifacts(run_id, name, d)).read_text()

    # ---- MetricLogger -------------------------------------------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = redact(params)  # a tracking URI or S3 endpoint in the config must not carry its password here
        flat = flatten_params(params)
        full = _untruncated(params)
        new = {k: v for k, v in flat.items() if k not in self._logged}
        changed = {k: (self._logged[k], v) for k, v in flat.items() if k in self._logged and self._logged[k] != v}
        for batch in _chunks([Param(k, v) for k, v in new.items()], MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch, synchronous=True)
        self._logged.update(new)
        self._params.update({k: full.get(k, v) for k, v in new.items()})
        if changed:
            detail = "; ".join(f"{k}: {old!r} -> {nv!r}" for k, (old, nv) in changed.items())
            warnings.warn(f"MLflow params cannot be overwritten; keeping the first value for {detail}",
                          stacklevel=2)
            self.log_event("param_changed", detail, step=-1)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            try:
                value = float(v)
            except (TypeError, ValueError):
                warnings.warn(f"metric {k!r} is not a number ({v!r}); skipped", stacklevel=2)
                continue
            self._metrics.append(Metric(_sanitize_key(k), value, ts, int(step)))
        if (len(self._metrics) >= self.max_buffered_metrics
                or time.monotonic() - self._last_flush >= self.flush_interval_s):
            self.flush()

    def log_event(self, name: str, detail: str, step: int) -> None:
        detail = redact(str(detail))
        self._events.append(json.dumps({"time": time.time(), "step": int(step), "name": str(name),
                                        "detail": detail}))
        self.log_metrics({"events_count": float(len(self._events))}, step=max(int(step), 0))
        self.set_tags({"last_event": f"step {step}: [{name}] {detail}"})  # flushes the metric above too

    def log_artifact(self, path: str | Path) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path=p.name)
        elif p.is_file():
            self.client.log_artifact(self.run_id, str(p))
        else:
            raise FileNotFoundError(f"artifact not found: {p}")

    def log_dataset(self, name: str, digest: str, source: str, context: str = "training",
                    tags: dict[str, Any] | None = None) -> None:
        """What ``mlflow.log_input(MetaDataset(...), context=...)`` records, on this run: metadata only, no rows
        are read or uploaded. ``digest`` is cut to MLflow's 36 characters (keep a full hash in ``tags``). Logging
        the same dataset again (a resume) adds nothing."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # MLflow registers its local source for "" and "file:" and says so
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            src = resolve_dataset_source(str(source))
        ds = MetaDataset(source=src, name=name, digest=str(digest)[:MAX_DATASET_DIGEST_LENGTH])
        input_tags = [InputTag(MLFLOW_DATASET_CONTEXT, context),
                      *(InputTag(_sanitize_key(k), _truncate_tag(v)) for k, v in redact(dict(tags or {})).items())]
        self.flush()
        self.client.log_inputs(self.run_id, datasets=[DatasetInput(ds._to_mlflow_entity(), tags=input_tags)])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.flush()
        items = [RunTag(_sanitize_key(k), _truncate_tag(v)) for k, v in redact(dict(tags)).items()]
        for batch in _chunks(items, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=batch, synchronous=True)

    def close(self, status: str = "FINISHED") -> None:
        """Flush, upload events.jsonl and params.json, and end the run with ``status``. Idempotent."""
        status = str(status).upper()
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, not {status!r}")
        if self._closed:
            return
        try:
            self.flush()
            if self._events:
                self.client.log_text(self.run_id, "\n".join(self._events) + "\n", EVENTS_ARTIFACT)
            if self._params:
                self.client.log_dict(self.run_id, self._params, PARAMS_ARTIFACT)
        finally:
            self._closed = True
            # MLflow prints "View run ... at: <tracking URI>" here, password included: print it redacted
            said = io.StringIO()
            with contextlib.redirect_stdout(said):
                self.client.set_terminated(self.run_id, status=status)
            if said.getvalue():
                sys.stdout.write(redact(said.getvalue()))

    # ---- extras -------------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Send buffered metrics now (one ``log_batch`` per 1000 metrics)."""
        pending, self._metrics = self._metrics, []
        self._last_flush = time.monotonic()
        for batch in _chunks(pending, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def __repr__(self) -> str:
        return f"MlflowLogger(run_id={self.run_id!r}, uri={self.tracking_uri!r})"


def _untruncated(params: Mapping[str, Any]) -> dict[str, Any]:
    """Like ``flatten_params`` but keeps the original (JSON-able) values, for the params.json artifact."""
    def keep(v: Any) -> bool:
        return isinstance(v, str | bool | int) or v is None or (isinstance(v, float) and math.isfinite(v))

    return {key: v if keep(v) else _stringify(v) for key, v in _leaves(params)}
