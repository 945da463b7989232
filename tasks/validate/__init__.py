"""The validate stage: a Great Expectations gate between ``split`` and ``shard``.

Reads the raw item metadata (no image bytes) joined on ``id`` with the split manifest, builds an expectation
suite from ``params.yaml:validate`` and runs it per split (train, val, test), so every failure names its split.
Checks that GX has no expectation for (class imbalance, label-distribution distance) are computed here in pandas
and still run through a GX expectation on a small derived frame, so that *every* check shows up in the GX
results and the Data Docs.

Writes, atomically, under ``paths.validate_dir``:
    results.json   the GX validation results, one entry per batch
    summary.json   success, per-split stats, each failed expectation with split, type, column, count, sample ids
    summary.md     the same for people
    docs/          Data Docs HTML (``docs/index.html``)
If an expectation fails the reports are still written, then ``ValidationFailed`` is raised with a readable list.

Great Expectations is imported inside functions only: importing it costs about 3 s.

Modules: ``inputs`` (the joined frame, per-split statistics), ``expectations`` (the suite per batch), ``gx``
(context, checkpoints, Data Docs), ``report`` (failures in words, the message, the files), ``result`` (the types).
"""
from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

from tasks.core import progress
from tasks.core.config import Paths, ValidateConfig
from tasks.core.io import SPLITS, atomic_dir
from tasks.validate import expectations, report
from tasks.validate.gx import run_gx
from tasks.validate.inputs import declared_classes, load, split_stats
from tasks.validate.result import ValidateResult, ValidationFailed

__all__ = ["ValidateResult", "ValidationFailed", "run"]


def run(cfg: ValidateConfig, paths: Paths) -> ValidateResult:
    t0 = time.perf_counter()
    frame, excluded, not_in_manifest = load(paths)
    classes, classes_source = declared_classes(cfg, frame)
    stats = split_stats(frame, classes)
    batches = expectations.batches(frame, classes, stats, cfg)
    out_dir = Path(paths.validate_dir)

    with atomic_dir(out_dir) as tmp:
        # Data Docs are built straight into the temporary directory, so a killed run leaves no half site.
        results = run_gx(batches, (tmp / "docs").resolve(), cfg.sample_ids)
        failures = [f for batch, vr in results for f in report.failures(batch, vr, cfg.sample_ids)]
        result = ValidateResult(
            success=not failures, splits=stats, failures=failures, classes=classes,
            classes_source=classes_source, excluded=excluded, not_in_manifest=not_in_manifest,
            expectations=sum(len(vr.results) for _, vr in results),
            report_dir=str(out_dir), docs_index=str(out_dir / "docs" / "index.html"))
        report.write(tmp, result, results)

    if failures:
        _summary(len(frame), failures, t0)
        raise ValidationFailed(report.message(result), result)
    for split in SPLITS:
        print(f"validate: {report.split_line(split, stats[split], classes, cfg)}")
    print(f"validate: {result.expectations} expectations passed; Data Docs at {result.docs_index}")
    _summary(len(frame), failures, t0)
    return result


def _summary(rows: int, failures: list, t0: float) -> None:
    """The stage's last line (stderr, also in CI): rows checked, failed expectations by split and type."""
    progress.summary("validate", rows, Counter(f"{f.split} {f.expectation}" for f in failures),
                     time.perf_counter() - t0, rejects_word="failed expectations")
