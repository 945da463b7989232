"""``keel preflight``: the ten-item checklist before a long run, as a table walked in order.

Each row is (number, name, what a pass shows, the check); initial_loss and overfit_tiny_subset are both item 4.
A check returns a ``CheckItem`` (pass/fail/skip, evidence, what to do); the report goes to
``report_path(paths)``, atomically, and ``require`` turns a failed item into ``PreflightFailed``
(``train.preflight: true`` calls it before training).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.core.config import Params, Paths
from tasks.core.errors import DataError
from tasks.discipline.preflight import checks_data, checks_dry_step, checks_model, checks_run, context
from tasks.discipline.preflight.report import CheckItem, PreflightReport, publish


class PreflightFailed(DataError):
    """At least one checklist item failed; the message names them and the report."""


class _Walk:
    """What the checks of one checklist walk read: the params, the git tree, the prepared train split (None
    when the shards are unusable) and the dry step, taken once, when the first item that needs it runs."""

    def __init__(self, params: Params, root: str | Path, ctx: context.Ctx | None):
        self.params, self.root, self.ctx = params, root, ctx
        self.cfg, self.paths, self.pf = params.train, params.paths, params.preflight

    @functools.cached_property
    def dry(self) -> dict | None:
        return checks_dry_step.dry_step(self.params) if (self.pf.dry_step and self.ctx is not None) else None


@dataclass(frozen=True)
class Item:
    number: int
    name: str
    shows: str  # what a pass shows
    check: Callable[[_Walk], CheckItem]
    needs_shards: bool = False  # fails, naming the shards, when they cannot be loaded


# The checks are looked up on their modules at call time (not bound here), so a test can replace one.
CHECKLIST: tuple[Item, ...] = (
    Item(1, "data_audit", "the ingest audit has the class and condition distributions and the labelled contact "
         "sheet", lambda w: checks_data.data_audit(w.paths)),
    Item(2, "splits_frozen", "the split manifest exists, its .sha256 matches it, the leakage report passed",
         lambda w: checks_data.splits_frozen(w.paths)),
    Item(3, "input_pipeline_vs_step", "device busy share step / (step + input) > preflight.min_busy_fraction "
         "(goal preflight.busy_goal)", lambda w: checks_model.input_pipeline_vs_step(w.ctx), needs_shards=True),
    Item(4, "initial_loss", "a fresh model scores a loss near ln(num_classes) on train batches",
         lambda w: checks_model.initial_loss(w.ctx), needs_shards=True),
    Item(4, "overfit_tiny_subset", "the model memorises preflight.subset train items in preflight.overfit_steps",
         lambda w: checks_model.overfit_tiny_subset(w.ctx, w.pf.subset, w.pf.overfit_steps), needs_shards=True),
    Item(5, "pretrained_weights", "with train.pretrained != none, the loaded weights differ from a fresh init and "
         "change the initial loss/accuracy", lambda w: checks_model.pretrained_weights(w.ctx), needs_shards=True),
    Item(6, "batch_lr_schedule", "LR scaled to the effective batch, warmup when that batch exceeds the reference, "
         "LR floor > 0", lambda w: checks_run.batch_lr_schedule(w.cfg)),
    Item(7, "logging_dry_step", "one real optimiser step reaches a temporary MLflow store: loss, metric, grad norm "
         "and LR are read back",
         lambda w: checks_dry_step.logging_dry_step(w.dry, w.pf.dry_step, w.ctx is not None)),
    Item(8, "checkpoint_selection", "a monitor and early stopping (or run the schedule, keep the best), and the dry "
         "step wrote best.pt / last.pt", lambda w: checks_dry_step.checkpoint_selection(w.cfg, w.dry)),
    Item(9, "reproducibility", "seeded, deterministic, lineage logged (config, git SHA, environment hash, data "
         "versions) and a clean working tree (or preflight.allow_dirty)",
         lambda w: checks_run.reproducibility(w.cfg, w.pf.allow_dirty, w.root, w.dry)),
    Item(10, "distributed", "backend, world size, accumulation consistent with the effective batch (skip with one "
         "device)", lambda w: checks_run.distributed(w.cfg)),
)
ITEM_NUMBERS = {i.name: i.number for i in CHECKLIST}


def report_path(paths: Paths) -> Path:
    return Path(paths.train_plots_dir).parent / "preflight.json"


def checklist(params: Params, *, root: str | Path = ".") -> PreflightReport:
    """Walk ``CHECKLIST`` for ``params``; ``root`` is the git working tree whose state item 9 checks. Writes
    ``report_path(params.paths)`` and prints the table."""
    assert isinstance(params, Params)
    cfg, paths, pf = params.train, params.paths, params.preflight
    ctx, why = None, ""
    try:
        report, ctx = context.prepare(cfg, paths, pf.min_busy_fraction, pf.busy_goal)
    except (DataError, OSError) as exc:  # no shards is one failed item per model check, not a crash
        report = PreflightReport("checklist", cfg.model, cfg.device, cfg.precision, 0, 0, cfg.seed)
        why = f"no usable train shards ({exc}); run `keel shard` (dvc repro shard)"
    report.stage, report.numbers = "checklist", ITEM_NUMBERS
    walk = _Walk(params, root, ctx)
    report.items = [CheckItem(i.name, "fail", {"shards_dir": paths.shards_dir}, why)
                    if i.needs_shards and ctx is None else i.check(walk) for i in CHECKLIST]
    publish(report, report_path(paths))
    return report


def require(params: Params, *, root: str | Path = ".") -> PreflightReport:
    """``checklist`` that raises ``PreflightFailed`` (a user error) when an item failed."""
    report = checklist(params, root=root)
    if not report.passed:
        failed = [f"{ITEM_NUMBERS.get(i.name, '?')}. {i.name}" for i in report.items if i.status == "fail"]
        raise PreflightFailed(f"preflight failed: {', '.join(failed)} (see the table above and "
                              f"{report_path(params.paths)})")
    return report
