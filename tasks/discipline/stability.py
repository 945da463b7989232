"""keel stability: is the training recipe well behaved, or did one lucky seed make the model?

On the validation split only (the train stage never opens test), it trains the configured recipe several times:

* ``reseed k``  for k in 0..N-1: ``train.seed + k`` (N = ``stability.reseeds``): the spread of the val metric;
* ``shuffle``   the same init, another data order and augmentation draw (``train.shuffle_seed``);
* ``batch x2``  twice the per-device batch; the LR follows the linear scaling rule (it is given at the reference
                batch, so the scaled LR doubles);
* ``lr x1.1``   the base LR 10% higher;

and checks that validation improved near-monotonically in every run.  Verdict ``stable`` when the reseed std is
within its allowance, no perturbation loses more than ``max_variant_drop`` against the reseed mean, and every curve
is near-monotonic; otherwise ``fragile``, with each reason.  Cost is set by ``stability.epochs`` (default:
``train.epochs``).

No threshold is applied finer than the validation split can resolve.  With ``n`` val items a val accuracy ``p`` is
known to about ``sqrt(p(1-p)/n)`` (digits: n = 185, one item = 0.0054, 0.016 at p = 0.95), so:

* a dip: a fall between consecutive epochs from ``a`` to ``b`` counts only when it exceeds
  ``max(max_val_dip, DIP_Z * sqrt(2 p (1-p) / n))`` with ``p = (a + b) / 2`` (the two-proportion z-test of "the
  two epochs are equally good").  ``DIP_Z = 3``: the check makes (runs x epoch transitions) comparisons, 42 by
  default, and z = 3 (one-sided 0.13% each) keeps the chance that a recipe whose curves only wobble by val noise is
  called fragile near 5% (Bonferroni).  The formula treats the two epochs as independent samples, which errs
  lenient when both are scored on the same items; a real collapse still fails (0.95 -> 0.75 on 185 items is
  allowed 0.111; at most 0.156 is ever allowed there, at p = 0.5).  On a large val set it is ``max_val_dip``.
* the reseed spread: the std over N reseeds is fragile above ``max(max_reseed_std, q * sqrt(m(1-m)/n))`` with m
  the reseed mean and ``q = sqrt(chi2_0.95(N-1) / (N-1))`` (1.73 for N = 3): the spread that N reseeds of one
  equally good recipe exceed only 5% of the time from val sampling alone.

The report's ``thresholds`` carries ``n_val``, ``dip_z`` and the allowance actually applied to the reseed std.
``keel stability`` exits non-zero on a fragile verdict (:func:`main`) unless ``--report-only`` is given.

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

DIP_Z = 3.0  # one-sided z of a counted dip; see the module docstring
STD_CONFIDENCE = 0.95  # the reseed spread val noise alone stays under this often


class StabilityError(DataError):
    """A problem the user can act on (no shards, a registered model that cannot be found)."""


class FragileError(StabilityError):
    """The verdict is fragile (the report is written and the version tagged before this is raised)."""


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
    """The largest fall between consecutive epochs; 0 for a curve that never falls."""
    return max([0.0, *(a - b for a, b in itertools.pairwise(curve))])


def dip_allowance(a: float, b: float, n_val: int, max_val_dip: float) -> float:
    """The largest fall from val accuracy a to b (next epoch) that n_val items cannot tell from noise."""
    p = (a + b) / 2
    return max(max_val_dip, DIP_Z * math.sqrt(2 * p * (1 - p) / n_val))


def falls(curve: list[float], n_val: int, max_val_dip: float) -> list[tuple[int, float, float]]:
    """Every fall between epochs as (epoch it fell to, fall, allowance), worst (fall - allowance) first."""
    out = [(i + 1, a - b, dip_allowance(a, b, n_val, max_val_dip))
           for i, (a, b) in enumerate(itertools.pairwise(curve)) if b < a]
    return sorted(out, key=lambda x: x[2] - x[1])


def reseed_std_allowance(mean: float, reseeds: int, n_val: int, max_reseed_std: float) -> float:
    """The largest reseed std that val sampling alone would stay under (STD_CONFIDENCE), or max_reseed_std."""
    from scipy.stats import chi2

    q = math.sqrt(chi2.ppf(STD_CONFIDENCE, reseeds - 1) / (reseeds - 1))
    return max(max_reseed_std, q * math.sqrt(max(mean * (1 - mean), 0.0) / n_val))


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
          max_val_dip: float, *, n_val: int) -> tuple[str, list[str], float, float, dict[str, float]]:
    """(verdict, reasons, reseed mean, reseed std, variant deltas vs the reseed mean); n_val: val items scored."""
    seeds = np.array([r.best_val_accuracy for r in runs[:reseeds]])
    mean, std = float(seeds.mean()), float(seeds.std(ddof=1))
    reasons = []
    allowed_std = reseed_std_allowance(mean, reseeds, n_val, max_reseed_std)
    if std > allowed_std:
        reasons.append(f"val accuracy varies over {reseeds} reseeds: std {std:.4f} > {allowed_std:.4f} "
                       f"(max_reseed_std {max_reseed_std:g}, or what {n_val} val items resolve) "
                       f"({', '.join(f'{v:.4f}' for v in seeds)})")
    deltas = {r.name: r.best_val_accuracy - mean for r in runs[reseeds:]}
    for name, d in deltas.items():
        if d < -max_variant_drop:
            reasons.append(f"{name}: val accuracy {mean + d:.4f} is {-d:.4f} below the reseed mean {mean:.4f} "
                           f"(allowed {max_variant_drop:g})")
    for r in runs:
        for epoch, fall, allowed in falls(r.val_curve, n_val, max_val_dip):
            if fall > allowed:
                reasons.append(f"{r.name}: val accuracy fell by {fall:.4f} at epoch {epoch} "
                               f"({r.val_curve[epoch - 1]:.4f} -> {r.val_curve[epoch]:.4f}), more than the "
                               f"{allowed:.4f} allowed (max_val_dip {max_val_dip:g}; z {DIP_Z:g} on {n_val} val items)")
    return ("fragile" if reasons else "stable"), reasons, mean, std, deltas


def run(params: Params, *, root: str | Path = ".", tracking_uri: str | None = None) -> StabilityReport:
    cfg, paths = params.stability, params.paths
    index_path = Path(paths.shards_dir) / "index.json"
    if not index_path.is_file():
        raise StabilityError(f"{index_path}: no shards; run `dvc repro shard` (or `keel shard`) first")
    n_val = io.ShardIndex.load(paths.shards_dir).rows("val")
    if n_val == 0:
        raise StabilityError(f"{index_path}: the val split is empty; keel stability judges on val only")
    if params.train.devices != 1:
        raise StabilityError(f"train.devices={params.train.devices}: keel stability trains in this process; set "
                             "train.devices: 1 for it (the recipe's stability does not depend on the device count)")
    plan = variants(params.train, cfg.reseeds, cfg.epochs)
    with tempfile.TemporaryDirectory(prefix="keel-stability-") as tmp:
        runs = [_train_one(name, c, paths, Path(tmp)) for name, c in plan]
    verdict, reasons, mean, std, deltas = judge(runs, cfg.reseeds, cfg.max_reseed_std, cfg.max_variant_drop,
                                                cfg.max_val_dip, n_val=n_val)
    report = StabilityReport(verdict, reasons, mean, std, runs, deltas,
                             {"max_reseed_std": cfg.max_reseed_std, "max_variant_drop": cfg.max_variant_drop,
                              "max_val_dip": cfg.max_val_dip, "n_val": n_val, "dip_z": DIP_Z,
                              "reseed_std_allowed": reseed_std_allowance(mean, cfg.reseeds, n_val,
                                                                         cfg.max_reseed_std)})
    out_dir = Path(paths.train_plots_dir).parent
    _plot(out_dir / "stability.png", report)
    report.model_tagged = _tag(params, report, out_dir, root, tracking_uri)
    io.write_json(out_dir / "stability.json", asdict(report))
    print(format_table(report), file=sys.stderr)
    return report


def main(params: Params, *, report_only: bool = False) -> StabilityReport:
    """`keel stability`: run(); a fragile verdict raises FragileError (exit 1) unless report_only."""
    report = run(params)
    if report.verdict == "fragile" and not report_only:
        out = Path(params.paths.train_plots_dir).parent / "stability.json"
        raise FragileError(f"verdict FRAGILE ({len(report.reasons)} reason(s)):"
                           + "".join(f"\n  - {r}" for r in report.reasons)
                           + f"\nthe numbers are in {out}; `keel stability --report-only` reports without failing")
    return report


def _worst_fall(curve: list[float], thresholds: dict[str, float]) -> tuple[str, str]:
    """(fall, allowance) of the run's fall nearest (or furthest over) its allowance; ("0", "-") if it never falls."""
    if "n_val" not in thresholds:  # a report built without run() (no val size): the raw fall only
        return text.fmt(_largest_dip(curve)), "-"
    worst = falls(curve, int(thresholds["n_val"]), thresholds["max_val_dip"])
    return (text.fmt(worst[0][1]), text.fmt(worst[0][2])) if worst else ("0", "-")


def format_table(report: StabilityReport) -> str:
    rows = [("run", "seed", "batch", "lr", "best val", "dip", "allowed", "seconds")]
    rows += [(r.name, r.seed, r.batch_size, text.fmt(r.lr, ".3g"), text.fmt(r.best_val_accuracy),
              *_worst_fall(r.val_curve, report.thresholds), text.fmt(r.seconds, ".1f")) for r in report.runs]
    lines = text.table(rows, indent="", gap=" ", align="<>>>>>>>")
    allowed = report.thresholds.get("reseed_std_allowed")
    lines.append(f"reseeds: mean {report.reseed_mean:.4f} std {report.reseed_std:.4f}"
                 + (f" (allowed {allowed:.4f} on {int(report.thresholds['n_val'])} val items)" if allowed is not None else "")
                 + "; variants vs mean: " + ", ".join(f"{k} {v:+.4f}" for k, v in report.variant_deltas.items()))
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
