"""The register stage's entry point: load the candidate, gate it, then register, verify and alias it (see the
``tasks.register`` docstring for the whole contract)."""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from tasks.core import tracking
from tasks.core.config import Paths, RegisterConfig
from tasks.core.project import experiment_refusal, project_home
from tasks.core.secrets import redact_uri
from tasks.register import report
from tasks.register.candidate import example_images, lineage_tags, load_candidate
from tasks.register.gate import gate
from tasks.register.records import (
    CHALLENGER,
    CHAMPION,
    LOGGED_METRICS,
    TAG,
    Candidate,
    RegisterError,
    RegisterResult,
    is_number,
)
from tasks.register.registry import Registry, http_limits, use_tracking_uri


def run(cfg: RegisterConfig, paths: Paths, tracking_uri: str | None = None,
        allowed_formats: list[str] | None = None) -> RegisterResult:
    """``allowed_formats``: ``ingest.allowed_formats``, the image formats the model was trained on; the served
    model refuses others (recorded with the training data's description, where the serving spec reads it)."""
    refusal = experiment_refusal("register")
    if refusal:
        raise RegisterError(refusal)
    uri = tracking_uri or tracking.tracking_uri(project_home())
    cand = load_candidate(paths)
    if allowed_formats is not None:
        cand.blob["index"] = {**cand.blob["index"], "allowed_formats": list(allowed_formats)}
    from mlflow.exceptions import MlflowException

    # MLflow's fluent calls (Model.log, pyfunc.load_model of models:/) and the SQL registry store itself (it
    # resolves a models:/ source through MlflowClient()) read the global tracking URI: point it here meanwhile.
    with http_limits(), use_tracking_uri(uri):
        reg = Registry(uri, cfg)
        try:
            return _register(cfg, paths, cand, reg)
        except MlflowException as exc:
            raise RegisterError(f"MLflow at {redact_uri(uri)} refused a registry call: {exc.message}") from exc


def _register(cfg: RegisterConfig, paths: Paths, cand: Candidate, reg: Registry) -> RegisterResult:
    name = cfg.model_name
    existing = reg.version_with_hash(name, cand.model_sha256)
    champion = reg.champion(name, cfg.champion_metric)
    checks = gate(cfg, cand.test, float(cand.train["best_val_accuracy"]), cand.model_sha256, cand.manifest_sha256,
                  champion)
    if not all(c.passed for c in checks):
        result = RegisterResult("gate_failed", name, existing.version if existing else None,
                                reg.aliases_of(name, existing.version) if existing else [], report.champion_uri(name),
                                str(paths.register_report), checks, tracking_uri=reg.uri)
        report.write_report(paths, result, cand, champion, reg.uri)
        report.print_result(result, cand, champion)
        return result

    tags = lineage_tags(cfg, paths, cand)
    examples = example_images(paths)
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
             description=report.description(name, reg.uri, cand, tags))
    result = RegisterResult(status, name, version, reg.aliases_of(name, version), report.champion_uri(name),
                            str(paths.register_report), checks, tags=tags, tracking_uri=reg.uri, run_id=run_id,
                            tag_drift=drift)
    report.write_report(paths, result, cand, champion, reg.uri)
    report.print_result(result, cand, champion)
    return result


def _log_and_register(cfg: RegisterConfig, paths: Paths, cand: Candidate, reg: Registry, tags: dict,
                      examples: list[bytes]) -> tuple[str, str]:
    """Log the pyfunc + test metrics + evaluate figures under a run, then create the model version."""
    from mlflow.exceptions import MlflowException

    run_id, created = reg.target_run(cfg, (cand.blob.get("run_info") or {}).get("tracking_run_id"))
    status = "FAILED"
    try:
        _log_evaluation(reg, run_id, cand, paths)
        info = _log_model(reg, run_id, cand, cfg, examples)
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


def _log_evaluation(reg: Registry, run_id: str, cand: Candidate, paths: Paths) -> None:
    """The test metrics and the evaluate stage's figures, summary and metrics file, under the run."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [Metric(k, float(cand.test[k]), ts, 0) for k in LOGGED_METRICS if is_number(cand.test.get(k))]
    reg.call("log test metrics", reg.client.log_batch, run_id, metrics=metrics, synchronous=True)
    ev = Path(paths.evaluate_dir)
    for f in sorted([*ev.glob("*.png"), ev / "summary.md", ev / "feature_duplicates.json", Path(paths.test_metrics)]):
        if f.is_file():
            reg.call(f"log artifact {f.name}", reg.client.log_artifact, run_id, str(f), "evaluate")


def _log_model(reg: Registry, run_id: str, cand: Candidate, cfg: RegisterConfig, examples: list[bytes]):
    """Log the pyfunc (``tasks.serving``) as a LoggedModel of the run; its ModelInfo."""
    import mlflow
    from mlflow.models import Model

    from tasks import serving

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

        return reg.call("log the pyfunc model", log_model)


def _verify(reg: Registry, name: str, version: str, cand: Candidate, cfg: RegisterConfig,
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
