"""keel stability: is the training recipe well behaved, or did one lucky seed make the model?

On the validation split only (the train stage never opens test), it trains the configured recipe several times:

* ``reseed k``  for k in 0..N-1: ``train.seed + k`` (N = ``stability.reseeds``): the spread of the val metric;
* ``shuffle``   the same init, another data order and augmentation draw (``train.shuffle_seed``);
* ``batch x2``  twice the per-device batch; the LR follows the linear scaling rule (it is given at the reference
                batch, so the scaled LR doubles);
* ``lr x1.1``   the base LR 10% higher;

and checks that validation improved near-monotonically in every run (no epoch-to-epoch fall larger than
``stability.max_val_dip``).  Verdict ``stable`` when the reseed std is at most ``max_reseed_std``, no perturbation
loses more than ``max_variant_drop`` against the reseed mean, and every curve is near-monotonic; otherwise
``fragile``, with each reason.  Cost is set by ``stability.epochs`` (default: ``train.epochs``).

Writes ``<reports>/stability.json`` and ``stability.png`` (the val metric per run, and every run's val curve) and,
when a registered version is found (``stability.model``, else ``@champion`` of ``register.model_name``), tags it
``keel.stability`` (stable/fragile) and ``keel.stability_val`` (mean ± std) and logs the report to its run.
"""
from __future__ import annotations

import itertools
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tasks.core import io, text
from tasks.core.config import Params, Paths, TrainConfig
from tasks.core.errors import DataError


class StabilityError(DataError):
    """A problem the user can act on (no shards, a registered model that cannot be found)."""


@dataclass
class RunResult:
    name: str
    seed: int
    shuffle_seed: int | None
    batch_size: int
    lr: float
    best_val_accuracy: float
    best_val_loss: float
    val_curve: list[float]
    largest_val_dip: float
    seconds: float


@dataclass
class StabilityReport:
    verdict: str  # "stable" | "fragile"
    reasons: list[str]
    reseed_mean: float
    reseed_std: float
    runs: list[RunResult]
    variant_deltas: dict[str, float]
    thresholds: dict[str, float]
    model_tagged: str | None = None
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def variants(train: TrainConfig, reseeds: int, epochs: int | None) -> list[tuple[str, TrainConfig]]:
    """The runs: N reseeds, then the three perturbations of the k=0 run."""
    base = {"epochs": epochs or train.epochs, "preflight": False, "probe_batch": False}
    out = [(f"reseed {k}", train.model_copy(update={**base, "seed": train.seed + k})) for k in range(reseeds)]
    out.append(("shuffle", train.model_copy(update={**base, "shuffle_seed": train.seed + 1_000_003})))
    two = {**base, "batch_size": train.batch_size * 2}
    if train.effective_batch is not None:
        two["effective_batch"] = train.effective_batch * 2
    out.append(("batch x2", train.model_copy(update=two)))
    out.append(("lr x1.1", train.model_copy(update={**base, "lr": train.lr * 1.1})))
    return out


def _largest_dip(curve: list[float]) -> float:
    return max((a - b for a, b in itertools.pairwise(curve)), default=0.0)


def _train_one(name: str, cfg: TrainConfig, paths: Paths, work: Path) -> RunResult:
    from tasks.train import loop

    d = work / name.replace(" ", "_")
    run_paths = paths.model_copy(update={"models_dir": str(d / "models"), "train_metrics": str(d / "train.json"),
                                         "train_plots_dir": str(d / "plots"), "checkpoints_dir": str(d / "ckpt")})
    t0 = time.monotonic()
    print(f"stability: {name}: seed {cfg.seed}, shuffle seed {cfg.shuffle_seed}, batch {cfg.batch_size}, "
          f"lr {cfg.lr:g}, {cfg.epochs} epochs", file=sys.stderr, flush=True)
    result = loop.run(cfg, run_paths, logger=None)
    curve = [float(r["val_accuracy"]) for r in _epochs_csv(Path(run_paths.train_plots_dir) / "epochs.csv")]
    return RunResult(name, cfg.seed, cfg.shuffle_seed, cfg.batch_size, cfg.lr, result.best_val_accuracy,
                     result.best_val_loss, curve, _largest_dip(curve), time.monotonic() - t0)


def _epochs_csv(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


def judge(runs: list[RunResult], reseeds: int, max_reseed_std: float, max_variant_drop: float,
          max_val_dip: float) -> tuple[str, list[str], float, float, dict[str, float]]:
    """(verdict, reasons, reseed mean, reseed std, variant deltas vs the reseed mean)."""
    seeds = np.array([r.best_val_accuracy for r in runs[:reseeds]])
    mean, std = float(seeds.mean()), float(seeds.std(ddof=1))
    reasons = []
    if std > max_reseed_std:
        reasons.append(f"val accuracy varies over {reseeds} reseeds: std {std:.4f} > {max_reseed_std:g} "
                       f"({', '.join(f'{v:.4f}' for v in seeds)})")
    deltas = {r.name: r.best_val_accuracy - mean for r in runs[reseeds:]}
    for name, d in deltas.items():
        if d < -max_variant_drop:
            reasons.append(f"{name}: val accuracy {mean + d:.4f} is {-d:.4f} below the reseed mean {mean:.4f} "
                           f"(allowed {max_variant_drop:g})")
    for r in runs:
        if r.largest_val_dip > max_val_dip:
            reasons.append(f"{r.name}: val accuracy fell by {r.largest_val_dip:.4f} between epochs (allowed "
                           f"{max_val_dip:g}): curve {', '.join(f'{v:.3f}' for v in r.val_curve)}")
    return ("fragile" if reasons else "stable"), reasons, mean, std, deltas


def run(params: Params, *, root: str | Path = ".", tracking_uri: str | None = None) -> StabilityReport:
    cfg, paths = params.stability, params.paths
    index_path = Path(paths.shards_dir) / "index.json"
    if not index_path.is_file():
        raise StabilityError(f"{index_path}: no shards; run `dvc repro shard` (or `keel shard`) first")
    if params.train.devices != 1:
        raise StabilityError(f"train.devices={params.train.devices}: keel stability trains in this process; set "
                             "train.devices: 1 for it (the recipe's stability does not depend on the device count)")
    plan = variants(params.train, cfg.reseeds, cfg.epochs)
    with tempfile.TemporaryDirectory(prefix="keel-stability-") as tmp:
        runs = [_train_one(name, c, paths, Path(tmp)) for name, c in plan]
    verdict, reasons, mean, std, deltas = judge(runs, cfg.reseeds, cfg.max_reseed_std, cfg.max_variant_drop,
                                                cfg.max_val_dip)
    report = StabilityReport(verdict, reasons, mean, std, runs, deltas,
                             {"max_reseed_std": cfg.max_reseed_std, "max_variant_drop": cfg.max_variant_drop,
                              "max_val_dip": cfg.max_val_dip})
    out_dir = Path(paths.train_plots_dir).parent
    _plot(out_dir / "stability.png", report)
    report.model_tagged = _tag(params, report, out_dir, root, tracking_uri)
    io.write_json(out_dir / "stability.json", asdict(report))
    print(format_table(report), file=sys.stderr)
    return report


def format_table(report: StabilityReport) -> str:
    rows = [("run", "seed", "batch", "lr", "best val", "max dip", "seconds")]
    rows += [(r.name, r.seed, r.batch_size, text.fmt(r.lr, ".3g"), text.fmt(r.best_val_accuracy),
              text.fmt(r.largest_val_dip), text.fmt(r.seconds, ".1f")) for r in report.runs]
    lines = text.table(rows, indent="", gap=" ", align="<>>>>>>")
    lines.append(f"reseeds: mean {report.reseed_mean:.4f} std {report.reseed_std:.4f}; variants vs mean: "
                 + ", ".join(f"{k} {v:+.4f}" for k, v in report.variant_deltas.items()))
    lines.append(f"verdict: {report.verdict.upper()}" + "".join(f"\n  - {r}" for r in report.reasons))
    if report.model_tagged:
        lines.append(f"tagged {report.model_tagged}")
    return "\n".join(lines)


def _plot(path: Path, report: StabilityReport) -> None:
    plt = text.pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.name for r in report.runs]
    vals = [r.best_val_accuracy for r in report.runs]
    colours = ["tab:blue" if n.startswith("reseed") else "tab:orange" for n in names]
    a.bar(names, vals, color=colours)
    a.axhline(report.reseed_mean, color="k", lw=1, label=f"reseed mean {report.reseed_mean:.4f}")
    a.axhspan(report.reseed_mean - report.reseed_std, report.reseed_mean + report.reseed_std, color="k", alpha=0.1)
    lo = min(vals) - 0.02
    a.set_ylim(max(0.0, lo), min(1.0, max(vals) + 0.01))
    a.set_ylabel("best val accuracy")
    a.tick_params(axis="x", rotation=30)
    a.legend(loc="lower right")
    a.set_title(f"{report.verdict}: reseed std {report.reseed_std:.4f}")
    for r in report.runs:
        b.plot(range(1, len(r.val_curve) + 1), r.val_curve, marker="o", ms=3, label=r.name)
    b.set_xlabel("epoch")
    b.set_ylabel("val accuracy")
    b.legend(fontsize=7)
    b.set_title("validation curves (near-monotonic?)")
    fig.tight_layout()
    text.save_png(path, fig, dpi=110)


def _tag(params: Params, report: StabilityReport, out_dir: Path, root: str | Path,
         tracking_uri: str | None) -> str | None:
    """Tag the registered version (when there is one) and log the report on its run; returns models:/name/v."""
    from tasks.core import tracking
    from tasks.discipline.reproduce import ReproduceError, resolve_version

    model = params.stability.model or f"models:/{params.register_.model_name}@champion"
    uri = tracking_uri or tracking.tracking_uri(Path(root))
    db = tracking.sqlite_path(uri)
    if params.stability.model is None and db is not None and not db.exists():
        print("stability: no registry yet; nothing to tag", file=sys.stderr)
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        mv = resolve_version(client, model)
    except ReproduceError as exc:
        if params.stability.model is not None:  # asked for explicitly: a missing model is an error
            raise StabilityError(str(exc)) from None
        print(f"stability: {model} not found; nothing to tag", file=sys.stderr)
        return None
    client.set_model_version_tag(mv.name, mv.version, "keel.stability", report.verdict)
    client.set_model_version_tag(mv.name, mv.version, "keel.stability_val",
                                 f"{report.reseed_mean:.4f} ± {report.reseed_std:.4f} over "
                                 f"{params.stability.reseeds} reseeds")
    if report.reasons:
        client.set_model_version_tag(mv.name, mv.version, "keel.stability_reasons", "; ".join(report.reasons)[:5000])
    if mv.run_id:
        with tempfile.TemporaryDirectory() as d:
            f = Path(d) / "stability.json"
            f.write_text(json.dumps(asdict(report), indent=2, default=lambda o: None if
                                    isinstance(o, float) and math.isnan(o) else str(o)))
            client.log_artifact(mv.run_id, str(f), "stability")
        if (out_dir / "stability.png").exists():
            client.log_artifact(mv.run_id, str(out_dir / "stability.png"), "stability")
    return f"models:/{mv.name}/{mv.version}"
