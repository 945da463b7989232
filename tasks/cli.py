"""The `keel` command: one subcommand per stage, each reading only its own section of params.yaml.

Errors that a user can fix (bad params, a missing input, a failed data gate) print one readable message and
exit non-zero without a traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys

from tasks.config import DEFAULT_PARAMS, ConfigError, load_params

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
    "stability": "Is the recipe well behaved? Trains N reseeds, another shuffle, batch x2 (LR by the scaling rule) "
                 "and LR x1.1 on train/val only; reports stable or fragile with the numbers and a plot "
                 "(reports/stability.json/.png) and tags the registered version keel.stability.",
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
        if name == "split":
            sp.add_argument("--refreeze", action="store_true",
                            help="deliberately re-split, discarding the frozen assignment (voids earlier test results)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a progress bar is noise in stage logs
    from tasks.io import DataError
    from tasks.sources import SourceError
    from tasks.split import FrozenSplitError, LeakageError

    user_errors: tuple[type[BaseException], ...] = (ConfigError, DataError, SourceError, LeakageError,
                                                    FrozenSplitError)
    try:
        params = load_params(args.params)
        if args.stage == "ingest":
            from tasks import ingest
            ingest.run(params.ingest, params.paths)
        elif args.stage == "split":
            from tasks import split
            split.run(params.split, params.paths, refreeze=args.refreeze)
        elif args.stage == "validate":
            from tasks import validate
            try:
                validate.run(params.validate_, params.paths)
            except validate.ValidationFailed as exc:
                raise DataError(str(exc)) from None
        elif args.stage == "shard":
            from tasks import shard
            shard.run(params.shard, params.paths)
        elif args.stage in ("train", "preflight"):
            import os

            from tasks import preflight
            from tasks.train import loop
            from tasks.train.model import ModelConfigError

            try:
                checked = args.stage == "preflight" or (params.train.preflight and os.environ.get("RANK", "0") == "0")
                if checked:
                    preflight.require(params)  # PreflightFailed (a DataError) stops the stage
                if args.stage == "train":
                    tracker = _tracker(params, args.stage)
                    if checked and tracker is not None:  # the checklist this run passed, on its MLflow run
                        tracker.log_artifact(preflight.report_path(params.paths))
                    loop.run(params.train, params.paths, logger=tracker)
            except (loop.TrainError, ModelConfigError) as exc:
                raise DataError(str(exc)) from None
        elif args.stage == "evaluate":
            from tasks import evaluate
            evaluate.run(params.evaluate, params.paths)
        elif args.stage == "register":
            from tasks import register
            register.run(params.register_, params.paths)
        elif args.stage == "stability":
            from tasks import stability
            stability.run(params)
        elif args.stage == "reproduce":
            from tasks import reproduce
            report = reproduce.run(params.reproduce, params.paths, args.model)
            if report["reproduced"] != "yes":
                raise DataError(f"{args.model} was NOT reproduced (see the table above and reports/reproduce.json)")
    except user_errors as exc:
        print(f"keel {args.stage}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _tracker(params, stage: str):
    """The MLflow logger for rank 0, when keel.tracking is available; the loop itself never imports MLflow."""
    import os

    if int(os.environ.get("RANK", "0")) != 0 or os.environ.get("KEEL_TRACKING", "mlflow") == "off":
        return None
    try:
        from tasks import tracking
    except ImportError:
        return None
    from pathlib import Path

    return tracking.MlflowLogger(experiment="keel", run_name=stage, tracking_uri=tracking.tracking_uri(Path.cwd()),
                                 tags={"keel.stage": stage})


if __name__ == "__main__":
    sys.exit(main())
