"""keel preflight: the checklist before a long run (``checklist``/``require``), and its train-stage model checks
(``run``).

``checklist(params)`` walks the ten items of ``items.CHECKLIST`` (data audit, frozen splits, input pipeline vs
step, initial loss + overfitting a tiny subset, pretrained weights, batch/LR schedule, a logged dry step,
checkpoint selection, reproducibility, distributed), each pass/fail/skip with evidence and what to do, prints the
table and writes ``<parent of paths.train_plots_dir>/preflight.json`` atomically; ``require`` raises
``PreflightFailed`` when an item failed (``train.preflight: true`` runs it before training).

``run(cfg, paths)`` is the model checks alone (initial loss, overfit, input pipeline), on the train split only,
written to ``<parent of paths.train_plots_dir>/preflight_train.json``.

Modules: ``items`` (the checklist table), ``checks_data`` (1-2), ``checks_model`` (3-5 and ``run``),
``checks_run`` (6, 9, 10), ``checks_dry_step`` (7-8), ``context`` (the train split and model the model checks
share), ``report`` (CheckItem, PreflightReport, the table, the JSON).
"""
from __future__ import annotations

from tasks.discipline.preflight.checks_model import run
from tasks.discipline.preflight.items import (
    CHECKLIST,
    ITEM_NUMBERS,
    PreflightFailed,
    checklist,
    report_path,
    require,
)
from tasks.discipline.preflight.report import CheckItem, PreflightReport, format_table

__all__ = ["CHECKLIST", "ITEM_NUMBERS", "CheckItem", "PreflightFailed", "PreflightReport", "checklist",
           "format_table", "report_path", "require", "run"]
