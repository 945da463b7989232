"""The register stage: gate the candidate, then publish it in the MLflow registry as a pyfunc that takes raw images.

Reads ``models/best.pt`` (weights + preprocessing + training lineage), ``paths.test_metrics`` (written by the
evaluate stage; its ``model_sha256`` must be this checkpoint's, see ``model_sha256``) and ``paths.train_metrics``.

Gate (every threshold from ``params.yaml:register``):
    val_accuracy     best_val_accuracy  >= min_val_accuracy
    test_accuracy    test_accuracy      >= min_test_accuracy
    test_macro_f1    test_macro_f1      >= min_test_macro_f1
    test_not_reused  test_reused is false, unless allow_reused_test
    champion         candidate[champion_metric] >= champion's + min_improvement, where the champion's value is its
                     version tag ``keel.<champion_metric>``, compared only when its ``keel.manifest_sha256`` equals
                     the candidate's (the same frozen test split: the champion is never re-scored on test).
                     ``min_improvement: 0`` means "at least as good": a retrain of equal quality replaces the
                     champion.  A champion scored on another split cannot be compared: the gate fails and says so
                     (promote by hand through the alias if that is intended).  No champion: passes.
A failed gate writes ``paths.register_report`` (status ``gate_failed``) and prints the table; the registry is left
exactly as it was and the stage exits 0.

Registering (gate passed):
    * idempotent: a version of ``register.model_name`` tagged ``keel.model_sha256`` = this model is reused
      (status ``already_registered``; its recorded lineage tags are kept, missing ones added, values that differ
      today are listed in the report as ``tag_drift``); otherwise the pyfunc (``tasks.serving``) is logged under
      the training run (``run_info.tracking_run_id`` when that run exists on this server, else a new run
      "register" in ``register.experiment``) with the test metrics and the evaluate figures, and a version is
      created with the ``keel.*`` lineage tags (``TAG_KEYS``);
    * alias ``challenger`` -> the version; the version is loaded back from the registry and must predict the input
      example exactly as the in-process model does; only then alias ``champion`` -> the version (an alias names one
      version, so the previous champion loses it);
    * the report (status ``registered`` / ``already_registered``) says how to serve ``models:/<name>@champion``.

Every tracking/registry call that can fail on IO is retried (``register.retries`` times, exponential backoff from
``register.retry_backoff_s``) on connection-type errors only; MLflow's own HTTP retries are switched off and its
request timeout bounded for the duration of the stage (unless the user set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` /
``MLFLOW_HTTP_REQUEST_TIMEOUT``), so an unreachable server fails in bounded time with a ``RegisterError``.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

from tasks.core import io, lineage, tracking
from tasks.core.config import Paths, RegisterConfig
from tasks.core.io import DataError
from tasks.core.lineage import model_sha256  # the one definition of a model's identity (shared with evaluate)

CHALLENGER, CHAMPION = "challenger", "champion"
TAG = "keel."
TAG_KEYS = ("git_sha", "git_dirty", "environment_hash", "dvc_lock_sha256", "manifest_sha256", "shard_index_sha256",
            "ge_validation", "params_sha256", "training_run_id", "model_sha256", "test_ledger", "test_accuracy",
            "test_macro_f1", "val_accuracy", "model_name")
TEST_METRIC_KEYS = ("test_accuracy", "test_macro_f1", "test_loss", "test_ece", "test_rows", "test_looks",
                    "test_reused", "model_sha256", "manifest_sha256")
LOGGED_METRICS = ("test_accuracy", "test_macro_f1", "test_loss", "test_ece", "test_rows", "test_looks")
SERVE_PORT = 5001
# MLflow's own HTTP retries (7 by default, minutes of backoff) would hide an unreachable server behind a long
# hang; the stage retries itself, so they are off unless the user configured them.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
_TRANSIENT = re.compile(
    r"connection refused|failed to establish a new connection|max retries exceeded|timed out|timeout|"
    r"connection aborted|connection reset|remotedisconnected|broken pipe|name or service not known|"
    r"temporary failure in name resolution|database is locked|error code (429|502|503|504)|"
    r"too many (429|500|502|503|504) error responses", re.IGNORECASE)
_EPS = 1e-9  # float slack in threshold comparisons (0.9 + 0.05 is 0.9500000000000001)


class RegisterError(DataError):
    """The candidate cannot be registered (inconsistent inputs, registry unreachable); the message says why."""


@dataclass
class Check:
    name: str
    value: float | bool | None
    threshold: float | bool | None
    passed: bool
    detail: str


@dataclass
class Champion:
    version: str
    model_sha256: str | None
    manifest_sha256: str | None
    metric: str
    value: float | None
    run_id: str | None


@dataclass
class RegisterResult:
    status: str  # registered | already_registered | gate_failed
    model_name: str
    version: str | None
    aliases: list[str]
    model_uri: str
    report_path: str
    checks: list[Check]
    tags: dict[str, str] = field(default_factory=dict)
    tracking_uri: str = ""
    run_id: str | None = None
    tag_drift: dict[str, dict[str, str]] = field(default_factory=dict)  # already_registered: recorded vs today


@dataclass
class _Candidate:
    blob: dict
    model_sha256: str
    test: dict
    train: dict
    manifest_sha256: str


# ---------------------------------------------------------------- model identity


# ---------------------------------------------------------------- public entry point
def run(cfg: RegisterConfig, paths: Paths, tracking_uri: str | None = None) -> RegisterResult:
    uri = tracking_uri or tracking.tracking_uri(Path.cwd())
    cand = _load_candidate(paths)
    from mlflow.exceptions import MlflowException

    # MLflow's fluent calls (Model.log, pyfunc.load_model of models:/) and the SQL registry store itself (it
    # resolves a models:/ source through MlflowClient()) read the global tracking URI: point it here meanwhile.
    with _http_limits(), _use_tracking_uri(uri):
        reg = _Registry(uri, cfg)
        try:
            return _register(cfg, paths, cand, reg)
        except MlflowException as exc:
            raise RegisterError(f"MLflow at {_redact(uri)} refused a registry call: {exc.message}") from exc


def gate(cfg: RegisterConfig, test: dict, val_accuracy: float, candidate_sha: str, manifest_sha: str,
         champion: Champion | None) -> list[Check]:
    """The gate's checks (see the module docstring); pure, no IO."""
    checks = [
        _threshold("val_accuracy", val_accuracy, cfg.min_val_accuracy, "best val accuracy (metrics/train.json)"),
        _threshold("test_accuracy", test["test_accuracy"], cfg.min_test_accuracy, "register.min_test_accuracy"),
        _threshold("test_macro_f1", test["test_macro_f1"], cfg.min_test_macro_f1, "register.min_test_macro_f1"),
    ]
    reused = bool(test["test_reused"])
    if cfg.allow_reused_test:
        detail = (f"test set reused ({test.get('test_looks')} looks); allowed by register.allow_reused_test"
                  if reused else "first look at this test split")
        checks.append(Check("test_not_reused", reused, None, True, detail))
    else:
        checks.append(Check("test_not_reused", reused, False, not reused,
                            f"test set reused ({test.get('test_looks')} looks) and register.allow_reused_test is false"
                            if reused else "first look at this test split"))
    metric = cfg.champion_metric
    value = float(test[metric])
    if champion is None:
        checks.append(Check("champion", value, None, True, "no current @champion: the first version becomes it"))
    elif champion.model_sha256 == candidate_sha:
        checks.append(Check("champion", value, champion.value, True,
                            f"this model is the current @champion (version {champion.version})"))
    elif champion.manifest_sha256 != manifest_sha or champion.value is None:
        why = (f"has no {TAG}{metric} tag" if champion.manifest_sha256 == manifest_sha
               else f"was scored on another test split (manifest {_short(champion.manifest_sha256)}, candidate "
                    f"{_short(manifest_sha)})")
        checks.append(Check("champion", value, None, False,
                            f"cannot compare with @champion version {champion.version}: it {why}; evaluating both on "
                            f"one split would be a second look at the test set. Decide as a team; to promote this "
                            f"model anyway, register it and move the alias by hand (MlflowClient."
                            f"set_registered_model_alias)"))
    else:
        need = champion.value + cfg.min_improvement
        checks.append(Check("champion", value, need, value + _EPS >= need,
                            f"{metric} vs @champion version {champion.version} ({champion.value:.4f}) + "
                            f"register.min_improvement ({cfg.min_improvement:g}), same test split"))
    return checks


# ---------------------------------------------------------------- the stage
def _register(cfg: RegisterConfig, paths: Paths, cand: _Candidate, reg: _Registry) -> RegisterResult:
    name = cfg.model_name
    existing = reg.version_with_hash(name, cand.model_sha256)
    champion = reg.champion(name, cfg.champion_metric)
    checks = gate(cfg, cand.test, float(cand.train["best_val_accuracy"]), cand.model_sha256, cand.manifest_sha256,
                  champion)
    if not all(c.passed for c in checks):
        result = RegisterResult("gate_failed", name, existing.version if existing else None,
                                reg.aliases_of(name, existing.version) if existing else [], _champion_uri(name),
                                str(paths.register_report), checks, tracking_uri=reg.uri)
        _write_report(paths, result, cand, champion, reg)
        _print(result, cand, champion)
        return result

    tags = _lineage_tags(cfg, paths, cand)
    examples = _example_images(paths)
    run_id, drift = None, {}
    if existing is not None:
        version, status = existing.version, "already_registered"
        run_id = existing.run_id or None
        tags, drift = reg.ensure_tags(name, version, tags)
    else:
        version, run_id = _log_and_register(cfg, paths, cand, reg, tags, examples)
        status = "registered"
    reg.call("set alias @challenger", reg.client.set_registered_model_alias, name, CHALLENGER, version)
    if CHAMPION not in reg.aliases_of(name, version):
        _verify(reg, name, version, cand, cfg, examples)
        reg.call("set alias @champion", reg.client.set_registered_model_alias, name, CHAMPION, version)
    reg.call("set description", reg.client.update_model_version, name, version,
             description=_description(name, reg.uri, cand, tags))
    result = RegisterResult(status, name, version, reg.aliases_of(name, version), _champion_uri(name),
                            str(paths.register_report), checks, tags=tags, tracking_uri=reg.uri, run_id=run_id,
                            tag_drift=drift)
    _write_report(paths, result, cand, champion, reg)
    _print(result, cand, champion)
    return result


def _log_and_register(cfg: RegisterConfig, paths: Paths, cand: _Candidate, reg: _Registry, tags: dict,
                      examples: list[bytes]) -> tuple[str, str]:
    """Log the pyfunc + test metrics + evaluate figures under a run, then create the model version."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from tasks import serving

    run_id, created = reg.target_run(cfg, (cand.blob.get("run_info") or {}).get("tracking_run_id"))
    status = "FAILED"
    try:
        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(cand.test[k]), ts, 0) for k in LOGGED_METRICS if _is_number(cand.test.get(k))]
        reg.call("log test metrics", reg.client.log_batch, run_id, metrics=metrics, synchronous=True)
        ev = Path(paths.evaluate_dir)
        for f in sorted([*ev.glob("*.png"), ev / "summary.md", Path(paths.test_metrics)]):
            if f.is_file():
                reg.call(f"log artifact {f.name}", reg.client.log_artifact, run_id, str(f), "evaluate")
        experiment_id = reg.call("get run", reg.client.get_run, run_id).info.experiment_id
        with tempfile.TemporaryDirectory(prefix="keel-register-") as work:
            kw = serving.package(cand.blob, work, max_image_bytes=cfg.max_image_bytes, max_pixels=cfg.max_pixels,
                                 example_images=examples)

            def log_model():
                # The LoggedModel is created here, in the run's experiment (Model.log alone would put it in the
                # default experiment, whose artifacts an embedded store keeps in ./mlruns of the cwd).
                logged = reg.client.create_logged_model(experiment_id, name="model", source_run_id=run_id,
                                                        tags={f"{TAG}model_sha256": cand.model_sha256})
                saved_path = list(sys.path)
                try:
                    return Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
                                     model_id=logged.model_id, **kw)
                finally:
                    sys.path[:] = saved_path  # its serving-input check loads the model (prepends code/ to sys.path)

            info = reg.call("log the pyfunc model", log_model)
        version = reg.create_version(cfg.model_name, f"models:/{info.model_id}", run_id, info.model_id, tags)
        status = "FINISHED"
        return version, run_id
    finally:
        if created:
            try:
                reg.call("end the register run", reg.client.set_terminated, run_id, status)
            except (RegisterError, MlflowException):
                if status == "FINISHED":  # otherwise the error that got us here is the one to report
                    raise


def _verify(reg: _Registry, name: str, version: str, cand: _Candidate, cfg: RegisterConfig,
            examples: list[bytes]) -> None:
    """Load ``models:/<name>/<version>`` back from the registry and compare it with the in-process model."""
    import mlflow.pyfunc
    import numpy as np

    from tasks import serving

    frame = serving.input_example(examples)
    local = serving.ImageClassifier.from_checkpoint(cand.blob, max_image_bytes=cfg.max_image_bytes,
                                                    max_pixels=cfg.max_pixels).predict(frame)
    saved_path = list(sys.path)
    with tempfile.TemporaryDirectory(prefix="keel-verify-") as dst:
        try:
            model = reg.call(f"load models:/{name}/{version}", mlflow.pyfunc.load_model, f"models:/{name}/{version}",
                             dst_path=dst)
            served = model.predict(frame)
        finally:
            sys.path[:] = saved_path  # load_model prepends the model's code/ folder, about to be deleted
    same = served["label"].tolist() == local["label"].tolist() and np.allclose(
        np.stack(served["probabilities"].to_numpy()), np.stack(local["probabilities"].to_numpy()), atol=1e-4)
    if not same:
        raise RegisterError(f"models:/{name}/{version} loaded from the registry predicts {served['label'].tolist()} "
                            f"on the input example, the checkpoint predicts {local['label'].tolist()}; @champion was "
                            f"not moved (the version keeps @{CHALLENGER}). Check the packaged code and weights.")


# ---------------------------------------------------------------- inputs
def _load_candidate(paths: Paths) -> _Candidate:
    import torch

    best = Path(paths.models_dir) / "best.pt"
    if not best.is_file():
        raise RegisterError(f"{best}: no checkpoint; run `keel train` (dvc repro train) first")
    try:
        blob = torch.load(best, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # corrupt / foreign file
        raise RegisterError(f"{best}: unreadable checkpoint ({type(exc).__name__}: {exc}); re-run `keel train`") \
            from None
    missing = [k for k in ("model", "model_name", "index") if k not in blob]
    if missing:
        raise RegisterError(f"{best}: not a keel best checkpoint (missing {missing}); re-run `keel train`")
    test = _read_json(Path(paths.test_metrics), "keel evaluate")
    absent = [k for k in TEST_METRIC_KEYS if k not in test]
    if absent:
        raise RegisterError(f"{paths.test_metrics}: missing {absent}; re-run `keel evaluate`")
    train = _read_json(Path(paths.train_metrics), "keel train")
    if not _is_number(train.get("best_val_accuracy")):
        raise RegisterError(f"{paths.train_metrics}: no best_val_accuracy; re-run `keel train`")
    sha = model_sha256(blob["model"], blob["model_name"])
    if test["model_sha256"] != sha:
        raise RegisterError(
            f"{paths.test_metrics} belongs to another model: its model_sha256 is {_short(test['model_sha256'])}, "
            f"{best} is {_short(sha)}. The test metrics must be of this checkpoint: run `keel evaluate` "
            f"(dvc repro evaluate) after training, then register.")
    return _Candidate(blob, sha, test, train, str(test["manifest_sha256"]))


def _read_json(path: Path, stage: str) -> dict:
    if not path.is_file():
        raise RegisterError(f"{path}: not found; run `{stage}` first")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise RegisterError(f"{path}: not valid JSON ({exc}); re-run `{stage}`") from None
    if not isinstance(data, dict):
        raise RegisterError(f"{path}: expected a JSON object; re-run `{stage}`")
    return data


def _lineage_tags(cfg: RegisterConfig, paths: Paths, cand: _Candidate) -> dict[str, str]:
    info = cand.blob.get("run_info") or {}
    git = {"git_sha": info["git_sha"], "git_dirty": info.get("git_dirty")} if info.get("git_sha") \
        else lineage.git_state()  # the code that trained the weights; the checkout's when best.pt lacks it
    test = cand.test
    looks = test.get("test_looks")
    tags = {
        "git_sha": git["git_sha"],
        "git_dirty": git["git_dirty"],
        "environment_hash": lineage.environment_hash(),
        "dvc_lock_sha256": _sha_or_absent(Path.cwd() / "dvc.lock"),
        "manifest_sha256": cand.manifest_sha256,
        "shard_index_sha256": _sha_or_absent(Path(paths.shards_dir) / "index.json"),
        "ge_validation": _ge_status(Path(paths.validate_dir) / "summary.json"),
        "params_sha256": _sha_or_absent(Path.cwd() / "params.yaml"),
        "training_run_id": info.get("tracking_run_id") or "none",
        "model_sha256": cand.model_sha256,
        "test_ledger": f"test set reused, {looks} looks" if test["test_reused"] else "first look",
        "test_accuracy": repr(float(test["test_accuracy"])),
        "test_macro_f1": repr(float(test["test_macro_f1"])),
        "val_accuracy": repr(float(cand.train["best_val_accuracy"])),
        "model_name": cand.blob["model_name"],
    }
    return {f"{TAG}{k}": str(v) for k, v in tags.items()}


def _sha_or_absent(path: Path) -> str:
    return io.sha256_file(path) if path.is_file() else "absent"


def _ge_status(summary: Path) -> str:
    if not summary.is_file():
        return "absent"
    try:
        return "passed" if json.loads(summary.read_text()).get("success") else "failed"
    except (ValueError, AttributeError):
        return "failed"


def _example_images(paths: Paths, n: int = 2, max_bytes: int = 256_000) -> list[bytes]:
    """A couple of real encoded images for the model's input example: original bytes of train items (never test);
    else train shard pixels as PNG; else a plain grey PNG at the model resolution."""
    import numpy as np

    from tasks import serving

    with contextlib.suppress(DataError, OSError, KeyError):
        manifest, _ = io.read_manifest(paths.split_manifest)
        train = {i for i, s in zip(manifest.column("id").to_pylist(), manifest.column("split").to_pylist(),
                                   strict=True) if s == "train"}
        found: list[bytes] = []
        for batch in io.iter_raw_batches(paths.raw_items, columns=["id", "image"], batch_rows=256):
            for i, b in zip(batch.column("id").to_pylist(), batch.column("image").to_pylist(), strict=True):
                if i in train and len(b) <= max_bytes:
                    found.append(b)
                    if len(found) == n:
                        return found
    with contextlib.suppress(DataError, OSError, KeyError):
        x, _, _ = next(io.ShardReader(paths.shards_dir, "train").iter_batches(batch_rows=n))
        if len(x):
            return [serving.encode_png(p) for p in x[:n]]
    return [serving.encode_png(np.full((32, 32), 128, np.uint8))]


# ---------------------------------------------------------------- MLflow access (retried)
class _Registry:
    def __init__(self, uri: str, cfg: RegisterConfig):
        from mlflow.tracking import MlflowClient

        self.uri, self.cfg = uri, cfg
        db = tracking.sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)  # SQLAlchemy creates the file but not its folder
        self.client = MlflowClient(tracking_uri=uri)

    def call(self, what: str, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)``, retried on connection-type errors; RegisterError when they persist."""
        attempts = self.cfg.retries + 1
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if not _transient(exc):
                    raise
                last = exc
                if attempt + 1 < attempts:
                    time.sleep(self.cfg.retry_backoff_s * 2 ** attempt)
        raise RegisterError(
            f"MLflow tracking server {_redact(self.uri)} unreachable: {what} failed {attempts} time(s) "
            f"(register.retries={self.cfg.retries}, backoff from {self.cfg.retry_backoff_s:g} s): "
            f"{_first_line(last)}. Check that the server is running and reachable from here "
            f"(curl {_redact(self.uri)}/health), that MLFLOW_TRACKING_URI is the one intended, and any proxy "
            f"settings (NO_PROXY); the registry was not changed by this attempt.") from None

    def registered_model(self, name: str):
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

        try:
            return self.call(f"get registered model {name!r}", self.client.get_registered_model, name)
        except MlflowException as exc:
            if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                return None
            raise

    def aliases_of(self, name: str, version: str) -> list[str]:
        rm = self.registered_model(name)
        return sorted(a for a, v in (rm.aliases if rm else {}).items() if str(v) == str(version))

    def versions(self, name: str) -> list:
        out, token = [], None
        escaped = name.replace("'", "\\'")
        while True:
            page = self.call(f"search versions of {name!r}", self.client.search_model_versions,
                             f"name = '{escaped}'", page_token=token)
            out.extend(page)
            token = page.token
            if not token:
                return out

    def version_with_hash(self, name: str, sha: str):
        hits = [v for v in self.versions(name) if v.tags.get(f"{TAG}model_sha256") == sha]
        return min(hits, key=lambda v: int(v.version)) if hits else None

    def champion(self, name: str, metric: str) -> Champion | None:
        rm = self.registered_model(name)
        if rm is None or CHAMPION not in (rm.aliases or {}):
            return None
        version = str(rm.aliases[CHAMPION])
        mv = self.call(f"get version {version}", self.client.get_model_version, name, version)
        raw = mv.tags.get(f"{TAG}{metric}")
        try:
            value = float(raw) if raw is not None else None
        except ValueError:
            value = None
        return Champion(version, mv.tags.get(f"{TAG}model_sha256"), mv.tags.get(f"{TAG}manifest_sha256"), metric,
                        value, mv.run_id or None)

    def target_run(self, cfg: RegisterConfig, training_run_id: str | None) -> tuple[str, bool]:
        """(run id, created): the training run when this server has it, else a new run "register"."""
        from mlflow.exceptions import MlflowException

        if training_run_id:
            try:
                run = self.call("get the training run", self.client.get_run, training_run_id)
                if run.info.lifecycle_stage != "deleted":
                    return training_run_id, False
            except MlflowException:  # another server's run (or deleted for good): log to a run of our own
                pass
        exp = self.call("get experiment", self.client.get_experiment_by_name, cfg.experiment)
        if exp is None:
            exp_id = self.call("create experiment", self.client.create_experiment, cfg.experiment,
                               artifact_location=tracking.default_artifact_location(self.uri))
        elif exp.lifecycle_stage == "deleted":
            raise RegisterError(f"MLflow experiment {cfg.experiment!r} is deleted; restore it (mlflow experiments "
                                f"restore) or set register.experiment")
        else:
            exp_id = exp.experiment_id
        run = self.call("create run", self.client.create_run, exp_id, run_name="register",
                        tags={f"{TAG}stage": "register"})
        return run.info.run_id, True

    def create_version(self, name: str, source: str, run_id: str, model_id: str, tags: dict) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode

        try:
            self.call(f"create registered model {name!r}", self.client.create_registered_model, name)
        except MlflowException as exc:
            if exc.error_code not in (ErrorCode.Name(RESOURCE_ALREADY_EXISTS), ErrorCode.Name(ALREADY_EXISTS)):
                raise

        def create():  # a retry after a lost response must not create a second version: tags are set atomically
            done = self.version_with_hash(name, tags[f"{TAG}model_sha256"])
            if done is not None:
                return done
            return self.client.create_model_version(name, source, run_id=run_id, tags=tags, model_id=model_id)

        return str(self.call("create model version", create).version)

    def ensure_tags(self, name: str, version: str, tags: dict) -> tuple[dict, dict]:
        """Add the lineage tags a version lacks; a recorded value is kept (it is the lineage at registration: e.g.
        dvc.lock changes once the register stage itself is locked).  Returns (the version's keel tags, the keys
        whose value today differs: {key: {"registered": old, "now": new}})."""
        mv = self.call(f"get version {version}", self.client.get_model_version, name, version)
        current = dict(mv.tags)
        for k, v in tags.items():
            if k not in current:
                self.call(f"set tag {k}", self.client.set_model_version_tag, name, version, k, v)
                current[k] = v
        drift = {k: {"registered": current[k], "now": v} for k, v in tags.items() if current[k] != v}
        return {k: v for k, v in current.items() if k.startswith(TAG)}, drift


def _transient(exc: BaseException) -> bool:
    import requests

    seen = exc
    while seen is not None:
        if isinstance(seen, requests.exceptions.ConnectionError | requests.exceptions.Timeout | ConnectionError
                      | TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and bool(_TRANSIENT.search(exc.message or ""))


@contextlib.contextmanager
def _http_limits() -> Iterator[None]:
    set_here = {k: v for k, v in HTTP_ENV.items() if k not in os.environ}
    os.environ.update(set_here)
    try:
        yield
    finally:
        for k in set_here:
            os.environ.pop(k, None)


@contextlib.contextmanager
def _use_tracking_uri(uri: str) -> Iterator[None]:
    """Set MLflow's global tracking URI for the block (restored afterwards)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri as use

    with use(uri):
        yield


# ---------------------------------------------------------------- report
def _champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


def _serve_command(name: str) -> str:
    return f"mlflow models serve -m {_champion_uri(name)} --env-manager local -p {SERVE_PORT}"


def _description(name: str, uri: str, cand: _Candidate, tags: dict) -> str:
    classes = cand.blob["index"]["classes"]
    return (f"keel image classifier ({cand.blob['model_name']}, {len(classes)} classes), test accuracy "
            f"{float(cand.test['test_accuracy']):.4f}, macro F1 {float(cand.test['test_macro_f1']):.4f} "
            f"({tags[f'{TAG}test_ledger']}); lineage in the keel.* tags.\n\n"
            f"Serve: `MLFLOW_TRACKING_URI={_redact(uri)} {_serve_command(name)}`\n\n"
            "Request: POST /invocations, Content-Type: application/json, "
            '`{"dataframe_split": {"columns": ["image"], "data": [["<base64 of a PNG/JPEG file>"]]}}` '
            "(one row per image). Answer: label, label_index, probability, probabilities (in class order). "
            "In Python: `mlflow.pyfunc.load_model(\"" + _champion_uri(name) + "\").predict(pd.DataFrame("
            "{\"image\": [png_bytes]}))`. A bad image gets HTTP 400 naming the row and the reason.")


def _write_report(paths: Paths, result: RegisterResult, cand: _Candidate, champion: Champion | None,
                  reg: _Registry) -> None:
    report = {
        "status": result.status,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_name": result.model_name,
        "version": result.version,
        "aliases": result.aliases,
        "model_uri": result.model_uri,
        "version_uri": f"models:/{result.model_name}/{result.version}" if result.version else None,
        "tracking_uri": _redact(reg.uri),
        "run_id": result.run_id,
        "candidate": {"model_sha256": cand.model_sha256, "manifest_sha256": cand.manifest_sha256,
                      "model": cand.blob["model_name"],
                      **{k: cand.test.get(k) for k in ("test_accuracy", "test_macro_f1", "test_looks",
                                                       "test_reused")},
                      "val_accuracy": cand.train.get("best_val_accuracy")},
        "gate": {"passed": all(c.passed for c in result.checks), "checks": [asdict(c) for c in result.checks]},
        "champion_before": asdict(champion) if champion else None,
        "tags": result.tags,
        "tag_drift": result.tag_drift,
        "serve": {"command": _serve_command(result.model_name), "env": {"MLFLOW_TRACKING_URI": _redact(reg.uri)},
                  "request": {"method": "POST", "path": "/invocations", "content_type": "application/json",
                              "body": {"dataframe_split": {"columns": ["image"],
                                                           "data": [["<base64 of an encoded image>"]]}}}},
    }
    io.write_json(paths.register_report, report)


def _print(result: RegisterResult, cand: _Candidate, champion: Champion | None) -> None:
    lines = [(f"register: gate for {result.model_name} (model {_short(cand.model_sha256)}, test split "
              f"{_short(cand.manifest_sha256)})")]
    if champion is not None:
        lines.append(f"  current @champion: version {champion.version} ({champion.metric} "
                     f"{_fmt(champion.value)}, test split {_short(champion.manifest_sha256)})")
    lines.append(f"  {'check':<16} {'value':>10} {'threshold':>11}  result  detail")
    for c in result.checks:
        lines.append(f"  {c.name:<16} {_fmt(c.value):>10} {_fmt(c.threshold, '>= '):>11}  "
                     f"{'pass' if c.passed else 'FAIL':<6}  {c.detail}")
    if result.status == "gate_failed":
        failed = ", ".join(c.name for c in result.checks if not c.passed)
        lines.append(f"register: gate failed ({failed}); the registry is unchanged. Report: {result.report_path}")
    else:
        verb = "registered" if result.status == "registered" else "already registered as"
        lines += [(f"register: {verb} {result.model_name} version {result.version} "
                   f"(aliases: {', '.join('@' + a for a in result.aliases) or 'none'})"),
                  f"  report: {result.report_path}",
                  f"  serve:  MLFLOW_TRACKING_URI={_redact(result.tracking_uri)} {_serve_command(result.model_name)}"]
    print("\n".join(lines))


def _fmt(v: Any, prefix: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{prefix}{v:.4f}"
    return f"{prefix}{v}"


def _threshold(name: str, value: float, threshold: float, what: str) -> Check:
    value = float(value)
    return Check(name, value, float(threshold), value + _EPS >= threshold, what)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _short(sha: str | None) -> str:
    return f"{sha[:12]}…" if sha else "unknown"


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _redact(uri: str) -> str:
    """The URI without a password (http://user:secret@host -> http://user:***@host)."""
    p = urlparse(uri)
    if p.password is None:
        return uri
    netloc = f"{p.username}:***@{p.hostname}" + (f":{p.port}" if p.port else "")
    return urlunparse(p._replace(netloc=netloc))
