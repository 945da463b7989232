"""The `keel` command: a table {stage: runner}, each runner reading its own section of params.yaml.

Errors that a user can fix (:class:`tasks.core.errors.UserError`: bad params, a missing input, a failed data gate)
print ``keel <stage>: error: ...`` and exit 1 without a traceback; anything else is a bug and keeps its traceback.

A runner reads its own section (register also reads ``ingest.allowed_formats``: what its served model accepts).
A runner names the module it imports (``Runner.module``); cli.py imports no stage itself, so a stage's import
closure is cli.py's plus its runner module's (tests/contracts checks it against the stage's dvc.yaml deps).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from tasks.core.config import DEFAULT_PARAMS, Params, load_params
from tasks.core.errors import DataError, UserError

STAGES = {
    "ingest": "Read the source named by ingest.source (builtin:digits, an image folder, a CSV/parquet manifest or "
              "s3://bucket/prefix) into the raw items table; unreadable items go to the rejects table with a "
              "reason; writes the data audit (counts, distributions, duplicates, a labelled contact sheet).",
    "split": "Freeze the train/val/test assignment on the raw items: stable per item/group, exact and near "
             "duplicates kept in one split, source-provided test split honoured; writes the manifest (+ sha256) "
             "and the leakage report, and fails if anything leaks across splits.",
    "validate": "Gate the data with Great Expectations (schema, nulls, class set, sizes, duplicate ids, every "
                "class in every split, balance, label distribution); writes results and Data Docs and fails "
                "with a list of what failed, per split, with sample ids.",
    "shard": "Decode, normalise and resize each split to the training resolution into parquet shards with an "
             "index (rows, bytes, sha256 per shard, classes, train-only mean/std).",
    "train": "Train a timm model on the train shards, selecting on val (never test): LR scaled to the effective "
             "batch with warmup and a floored schedule, clipping, accumulation, mixed precision, EMA; logs loss, "
             "LR, grad norm and throughput; detects intervention signals; keeps best and last checkpoints and "
             "resumes from the last after a crash. Launch under torchrun for several devices.",
    "preflight": "The checklist before a long run: data audit, frozen splits, input pipeline vs step, initial loss "
                 "and overfitting a tiny subset, pretrained weights, batch/LR/warmup/schedule, a dry step that proves "
                 "logging, checkpoint selection, reproducibility (seeds, lineage, clean tree), distributed config; "
                 "prints a table with evidence and what to do and writes reports/preflight.json.",
    "evaluate": "The one reader of the sealed test split: scores the best-val checkpoint once (accuracy, macro F1, "
                "per-class report, confusion matrix, calibration), records the read in the test-access ledger and "
                "returns the recorded result for a model already evaluated; a second model on the same frozen test "
                "split is refused (evaluate.second_look: strict) or marked as a reused test set (warn).",
    "register": "Gate the candidate (thresholds, and beating @champion on the same frozen test split) and register "
                "it in MLflow as a pyfunc model that takes raw images, with lineage tags and the @challenger / "
                "@champion aliases; a failed gate writes a report and leaves the registry unchanged.",
    "reproduce": "Retrain a registered model from its lineage (models:/<name>/<version>, models:/<name>@<alias> or a "
                 "run id): the recorded commit in a temporary git worktree, the recorded data version from the DVC "
                 "cache/remote, the recorded config and seed; compares weights bitwise and val accuracy within "
                 "reproduce.val_tolerance, reports recorded test metrics without a new test read; writes "
                 "reports/reproduce.json and tags the version keel.reproduced.",
    "promote": "The one test read of an experiment loop: applies the chosen DVC experiment (compared with the "
               "others on validation only), runs the pipeline so evaluate reads the test split once and register "
               "gates it, and tags the registered version with the experiment and the number of candidates.",
    "sweep": "A hyperparameter search declared in params.yaml:sweep (Optuna: TPE, median pruning, a SQLite or "
             "Postgres study) as the Prefect flow keel-sweep: each trial a `dvc exp run --temp train` experiment "
             "(train and validate only), several at once; a failed or pruned trial does not stop it, a killed sweep "
             "resumes from its study; then only the best trial is promoted: one test read, one registration. With "
             "--trials-on DEPLOYMENT each trial is its own flow run of a keel-sweep-trial deployment (on the "
             "cluster: one Kubernetes GPU Job per trial).",
    "stability": "Is the recipe well behaved? Trains N reseeds, another shuffle, batch x2 (LR by the scaling rule) "
                 "and LR x1.1 on train/val only; reports stable or fragile with the numbers and a plot "
                 "(reports/stability.json/.png) and tags the registered version keel.stability.",
}


@dataclass(frozen=True)
class Runner:
    module: str                                                # imported only when this stage runs
    call: Callable[[ModuleType, Params, argparse.Namespace], object]


def _reproduce(m: ModuleType, params: Params, args: argparse.Namespace) -> None:
    report = m.run(params.reproduce, params.paths, args.model)
    if report["reproduced"] != "yes":
        raise DataError(f"{args.model} was NOT reproduced (see the table above and reports/reproduce.json)")


RUNNERS: dict[str, Runner] = {
    "ingest": Runner("tasks.ingest", lambda m, p, a: m.run(p.ingest, p.paths)),
    "split": Runner("tasks.split", lambda m, p, a: m.run(p.split, p.paths, refreeze=a.refreeze)),
    "validate": Runner("tasks.validate", lambda m, p, a: m.run(p.validate_, p.paths)),
    "shard": Runner("tasks.shard", lambda m, p, a: m.run(p.shard, p.paths)),
    "train": Runner("tasks.train.entry", lambda m, p, a: m.main(p)),
    "preflight": Runner("tasks.discipline.preflight", lambda m, p, a: m.require(p)),
    "evaluate": Runner("tasks.evaluate", lambda m, p, a: m.run(p.evaluate, p.paths)),
    "register": Runner("tasks.register", lambda m, p, a: m.run(p.register_, p.paths,
                                                              allowed_formats=p.ingest.allowed_formats)),
    "stability": Runner("tasks.discipline.stability", lambda m, p, a: m.main(p, report_only=a.report_only)),
    "reproduce": Runner("tasks.discipline.reproduce", _reproduce),
    "promote": Runner("tasks.discipline.promote", lambda m, p, a: m.run(p, a.experiment, a.sweep_report)),
    "sweep": Runner("tasks.discipline.sweep", lambda m, p, a: m.main(promote=a.promote, fresh=a.fresh,
                                                                        trials_on=a.trials_on)),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="keel", description="keel: a disciplined training pipeline for image "
                                "classifiers. Each subcommand runs one stage of dvc.yaml.")
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, text in STAGES.items():
        sp = sub.add_parser(name, help=text.split(";")[0], description=text)
        sp.add_argument("--params", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
        if name == "reproduce":
            sp.add_argument("model", metavar="MODEL", help="models:/<name>/<version>, models:/<name>@<alias> or a run id")
        if name == "promote":
            sp.add_argument("experiment", metavar="EXP", help="the experiment's name or rev (`dvc exp show`)")
            sp.add_argument("--sweep-report", metavar="JSON", help="keel sweep's report (reports/sweep.json) when "
                            "EXP is one of its trials: the version is tagged with the sweep and its trial count")
        if name == "stability":
            sp.add_argument("--report-only", action="store_true",
                            help="exit 0 even when the verdict is fragile (the report and the tag are written either way)")
        if name == "sweep":
            sp.add_argument("--no-promote", dest="promote", action="store_false",
                            help="search only: no test read; `keel promote <experiment>` later")
            sp.add_argument("--fresh", action="store_true", help="delete the study first and start over")
            sp.add_argument("--trials-on", metavar="DEPLOYMENT",
                            help="run each trial as a flow run of this keel-sweep-trial deployment, e.g. "
                                 "keel-sweep-trial/keel-gpu-sweep-trial (a Kubernetes GPU Job per trial; needs "
                                 "PREFECT_API_URL); default: `dvc exp run --temp` on this machine")
        if name == "split":
            sp.add_argument("--refreeze", action="store_true",
                            help="deliberately re-split, discarding the frozen assignment (voids earlier test results)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a progress bar is noise in stage logs
    runner = RUNNERS[args.stage]
    try:
        params = load_params(args.params)
        runner.call(importlib.import_module(runner.module), params, args)
    except UserError as exc:
        print(f"keel {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
