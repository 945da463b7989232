"""MLflow tracking/registry access for the register stage, every IO call retried (bounded) on connection-type
errors only (``tasks.core.retry``), with MLflow's own HTTP retries switched off meanwhile (``http_limits``)."""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from tasks.core import tracking
from tasks.core.config import RegisterConfig
from tasks.core.retry import transient_cause, transient_exception
from tasks.core.secrets import redact_uri
from tasks.register.records import CHAMPION, TAG, Champion, RegisterError

# MLflow's own HTTP retries (7 by default, minutes of backoff) would hide an unreachable server behind a long
# hang; the stage retries itself, so they are off unless the user configured them.
HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


class Registry:
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
                if not transient(exc):
                    raise
                last = exc
                if attempt + 1 < attempts:
                    time.sleep(self.cfg.retry_backoff_s * 2 ** attempt)
        raise RegisterError(
            f"MLflow tracking server {redact_uri(self.uri)} unreachable: {what} failed {attempts} time(s) "
            f"(register.retries={self.cfg.retries}, backoff from {self.cfg.retry_backoff_s:g} s): "
            f"{_first_line(last)}. Check that the server is running and reachable from here "
            f"(curl {redact_uri(self.uri)}/health), that MLFLOW_TRACKING_URI is the one intended, and any proxy "
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


def transient(exc: BaseException) -> bool:
    """Worth another try (``tasks.core.retry``): a network error in the cause chain, or an ``MlflowException``
    whose message names one.  Any other exception's message is not read: e.g. a ``RegisterError`` of a nested call
    that already gave up quotes the transient error, and must not make the outer call retry it all again."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return transient_exception(exc)
    return transient_cause(exc)


@contextlib.contextmanager
def http_limits() -> Iterator[None]:
    """MLflow's HTTP retries off and its request timeout bounded (``HTTP_ENV``) for the block, unless set."""
    set_here = {k: v for k, v in HTTP_ENV.items() if k not in os.environ}
    os.environ.update(set_here)
    try:
        yield
    finally:
        for k in set_here:
            os.environ.pop(k, None)


@contextlib.contextmanager
def use_tracking_uri(uri: str) -> Iterator[None]:
    """Set MLflow's global tracking URI for the block (restored afterwards)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri as use

    with use(uri):
        yield


def _first_line(exc: BaseException) -> str:
    text = getattr(exc, "message", None) or str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
