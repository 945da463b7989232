"""Items 7 and 8 of the checklist, proved on the real code path: one optimiser step and one validation through
``tasks.train.loop.run`` in a temporary folder, logged to a temporary MLflow store (SQLite) and read back."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

from tasks.core import checkpoint
from tasks.core.config import TrainConfig
from tasks.discipline.preflight.report import CheckItem
from tasks.train import loop

DRY_STEP_METRICS = ("train_loss", "lr", "grad_norm")
# the lineage item 9 wants to see logged with the run (a subset of what the loop logs)
LINEAGE_PARAMS = ("git_sha", "git_dirty", "environment_hash", "shard_index_sha256", "split_manifest_sha256",
                  "config.seed", "config.deterministic", "config.model", "config.lr", "scaled_lr", "effective_batch")
RUN_INFO_KEYS = ("git_sha", "git_dirty", "environment_hash", "shard_index_sha256", "split_manifest_sha256")


@contextlib.contextmanager
def _single_process_env():
    """A one-process torch environment for the dry step, even when preflight itself runs under torchrun."""
    keys = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _RecordingLogger:
    """Records every call (used when MLflow is not installed)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.run_id = None

    def __getattr__(self, name):
        def call(*a, **kw):
            self.calls.append((name, a, kw))
        return call


def dry_step(params) -> dict:
    """One optimiser step + one validation through ``tasks.train.loop.run`` in a temp dir, logged to a temporary
    MLflow store (SQLite) and read back. Returns what was seen (or the error)."""
    cfg = params.train.model_copy(update={"devices": 1, "effective_batch": None, "max_steps": 1, "epochs": 1,
                                          "log_every_steps": 1, "compile": False, "probe_batch": False,
                                          "preflight": False, "strategy": "ddp"})
    out: dict = {"ran": False}
    with tempfile.TemporaryDirectory(prefix="keel-preflight-") as tmp:
        t = Path(tmp)
        paths = params.paths.model_copy(update={"models_dir": str(t / "models"), "train_metrics": str(t / "train.json"),
                                                "train_plots_dir": str(t / "reports" / "train"),
                                                "checkpoints_dir": str(t / "checkpoints")})
        logger = _logger(t, out)
        t0 = time.perf_counter()
        try:
            with _single_process_env():
                loop.run(cfg, paths, logger=logger)
        except Exception as exc:  # noqa: BLE001 - the evidence: what broke in the real code path
            out["error"] = f"{type(exc).__name__}: {exc}"
            return out
        out.update(ran=True, seconds=round(time.perf_counter() - t0, 2))
        _read_checkpoints(Path(paths.models_dir), out)
        _read_back(logger, out)
    return out


def _logger(tmp: Path, out: dict):
    """A logger on a temporary MLflow store in ``tmp``, or a recording one without MLflow; names it in ``out``."""
    try:
        from tasks.core import tracking

        logger = tracking.MlflowLogger(experiment="keel-preflight", run_name="dry-step",
                                       tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", flush_interval_s=0.0)
        out["tracker"] = "mlflow (temporary SQLite store)"
    except ImportError:
        logger = _RecordingLogger()
        out["tracker"] = "recording logger (mlflow not installed)"
    return logger


def _read_checkpoints(models_dir: Path, out: dict) -> None:
    """Which checkpoints the dry step wrote, and the lineage best.pt carries (items 8 and 9 judge them)."""
    best, last = models_dir / "best.pt", models_dir / "last.pt"
    out["best_pt"], out["last_pt"] = best.is_file(), last.is_file()
    if best.is_file():
        blob = checkpoint.load(best, what="best checkpoint")
        out["best_keys"] = sorted(k for k in blob if k != "model")
        out["run_info"] = {k: blob["run_info"].get(k) for k in RUN_INFO_KEYS}
        out["run_info"]["config_seed"] = blob["run_info"].get("config", {}).get("seed")


def _read_back(logger, out: dict) -> None:
    """The metrics and params as the tracker stored them (not as the loop meant to send them)."""
    wanted = (*DRY_STEP_METRICS, "val_accuracy", "val_loss")
    if isinstance(logger, _RecordingLogger):
        seen: dict = {}
        params_logged: set = set()
        for name, a, _kw in logger.calls:
            if name == "log_metrics":
                for k, v in a[0].items():
                    seen.setdefault(k, []).append(float(v))
            if name == "log_params":
                params_logged |= set(a[0])
    else:
        client = logger.client
        seen = {k: [m.value for m in client.get_metric_history(logger.run_id, k)] for k in wanted}
        params_logged = set(client.get_run(logger.run_id).data.params)
        out["run_id"] = logger.run_id
    out["metrics_read_back"] = {k: v for k, v in seen.items() if k in wanted and v}
    out["params_logged"] = sorted(k for k in params_logged if k in LINEAGE_PARAMS)


def logging_dry_step(dry: dict | None, enabled: bool, have_data: bool) -> CheckItem:
    name = "logging_dry_step"
    if not enabled:
        return CheckItem(name, "skip", {"preflight.dry_step": False}, "set preflight.dry_step: true to prove that "
                         "loss, metric, grad norm and LR reach the tracker")
    if not have_data or dry is None:
        return CheckItem(name, "fail", {}, "no train shards to take a dry step on: run `keel shard`")
    if not dry.get("ran"):
        return CheckItem(name, "fail", {"error": dry.get("error")}, "one real training step failed (see error): fix "
                         "it before a long run")
    seen = dry["metrics_read_back"]
    need = [*DRY_STEP_METRICS, "val_accuracy" if "val_accuracy" in seen else "val_loss"]
    missing = [k for k in need if k not in seen]
    ev = {"tracker": dry["tracker"], "run_id": dry.get("run_id"), "seconds": dry.get("seconds"),
          "metrics_read_back": {k: round(v[-1], 6) for k, v in seen.items()}, "missing": missing}
    tracking_off = os.environ.get("KEEL_TRACKING", "mlflow") == "off"
    ev["keel_tracking"] = "off" if tracking_off else "mlflow"
    if missing:
        return CheckItem(name, "fail", ev, f"the dry step did not log {missing} to the tracker: check "
                         "train.log_every_steps and the loop's logger calls")
    if tracking_off:
        return CheckItem(name, "fail", ev, "KEEL_TRACKING=off: the run's metrics would reach only the local "
                         "events.jsonl; unset it (or point MLFLOW_TRACKING_URI at your server)")
    return CheckItem(name, "pass", ev, "none")


def checkpoint_selection(cfg: TrainConfig, dry: dict | None) -> CheckItem:
    name = "checkpoint_selection"
    policy = (f"early stopping after {cfg.early_stopping_patience} epochs without improvement"
              if cfg.early_stopping_patience else "run the whole schedule and keep the best-val checkpoint")
    ev = {"monitor": cfg.monitor, "early_stopping_patience": cfg.early_stopping_patience, "policy": policy,
          "dry_step_best_pt": (dry or {}).get("best_pt"), "dry_step_last_pt": (dry or {}).get("last_pt"),
          "best_pt_keys": (dry or {}).get("best_keys")}
    if not cfg.monitor:
        return CheckItem(name, "fail", ev, "set train.monitor (val_accuracy or val_loss)")
    if dry is not None and dry.get("ran") and not (dry.get("best_pt") and dry.get("last_pt")):
        return CheckItem(name, "fail", ev, "the dry step did not write best.pt and last.pt: best-checkpoint "
                         "selection is not wired")
    return CheckItem(name, "pass", ev, "none")

