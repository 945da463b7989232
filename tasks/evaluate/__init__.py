"""keel evaluate: the only reader of the sealed test split, and the test-access ledger that keeps it honest.

The stage scores ``<models_dir>/best.pt`` on the test shards once per model and records every access decision.

Model identity
    ``model_sha256`` = sha256 over the checkpoint's state dict (keys sorted; per tensor: key, dtype, shape, bytes)
    then the model name (see ``model_sha256``).  It is not the file hash: best.pt also embeds git SHA, timings and lineage, which change
    without the weights changing.

Ledger  (``paths.test_ledger``; deliberately NOT a DVC output: DVC deletes a stage's outputs before it runs, and
this record must outlive every run)
    ``ledger.jsonl``   append-only, one JSON object per access decision, appended and fsync'd while holding an
                       exclusive ``fcntl.flock`` on ``ledger.lock`` (the lock is held from the decision until the
                       entry is written, so two concurrent evaluations cannot both take "the first look").
    ``results/<model_sha256>.json``               the full result of a read (all metrics, confusion matrix,
                                                  per-class table, reliability bins, lineage, the feature-space
                                                  audit with the pixels of its closest pairs)
    ``results/<model_sha256>.predictions.parquet`` id, label, pred, probs (list<float32>)

    Entry fields: ``time`` (UTC ISO), ``action`` (``read`` | ``recorded_result_returned`` | ``refused``),
    ``model_sha256``, ``model_name``, ``checkpoint``, ``tracking_run_id``, ``train_git_sha``/``train_git_dirty``
    (from the checkpoint), ``git_sha``/``git_dirty`` (now), ``manifest_sha256`` (which frozen test split),
    ``shard_index_sha256``, ``test_rows``, ``looks`` (distinct models that have read this manifest's test split,
    this one included when it read), ``policy`` (evaluate.second_look), and for reads ``metrics`` (headline),
    ``test_reused``, ``result_sha256``/``predictions_sha256`` (of the two result files: a recorded result is
    only returned when both still match) and ``note``; for recorded returns ``returned_read_time``; for refusals
    ``reason``.

Decisions (all taken under the lock)
    * same model_sha256 with a ``read`` on the same manifest: the test shards are not opened; the outputs are
      rebuilt from the recorded result and a ``recorded_result_returned`` entry is appended.
    * a first model on a manifest: read, record the result, append ``read``.
    * a different model on a manifest another model has read (a second look): ``strict`` appends ``refused`` and
      raises ``SecondLookRefused``; ``warn`` reads and marks the result ``test_reused: true, test_looks: N``.

A result is always recorded (results/*) before its ``read`` entry, so every ``read`` entry has a result to return.
Should a recorded result be missing or altered (checksums in the entry), the same model is scored again: another
``read`` entry with a ``note``, the same look number as its first read, no refusal (it is not a new look).

Outputs (``paths.evaluate_dir``, every one rendered from the recorded result, see ``report``)
    ``confusion.csv``/``.png``, ``per_class.csv``, ``reliability.png``, ``predictions.parquet``, ``summary.md``,
    ``feature_duplicates.json``/``.png``; then ``paths.test_metrics`` (the headline, written last).

Feature-space audit  (``evaluate.feature_audit``, default on; see ``feature_audit``)
    After training, one more leakage look, in the trained model's own penultimate features (the input of its final
    classifier, plain view; cosine distance): a test item whose nearest train item is at distance <= a threshold is
    a near-duplicate. The threshold is calibrated on train-vs-train: the ``evaluate.feature_dup_quantile`` (0.01)
    quantile of each train item's distance to its nearest other train item, so about that share of test items is
    flagged by chance when test and train are alike; more is leakage. The train split is embedded first (only
    train: never val, never a second test pass); the test features come from the same single pass that computes
    the predictions. ``paths.test_metrics`` gains ``test_accuracy_dedup`` (accuracy on the unflagged items, as
    ciFAIR reports), ``feature_dup_count``, ``feature_dup_fraction``, ``feature_dup_threshold`` and
    ``feature_audit`` (``on``, or why not: then the four are null). ``feature_duplicates.json`` lists every
    flagged item (id, label, pred, nearest train id and label, distance; by distance) with the threshold, counts
    and both accuracies; ``feature_duplicates.png`` shows the closest pairs side by side. The audit is part of the
    recorded result: a returned result rebuilds it without reading test, and keeps the settings of its one read.

Modules
    ``stage``       ``run``: checks, the decision under the lock, the read, the outputs
    ``decide``      the second-look policy (strict | warn; a re-score is not a new look)
    ``ledger``      ``Ledger`` (append, lock, recorded results), ``readers``, ``latest_read``
    ``checkpoint``  load best.pt, check it against the shards, rebuild the network
    ``metrics``     ``predict`` (with an optional per-batch feature callback) and ``compute_metrics``
    ``feature_audit`` the feature-space near-duplicate audit: pure compute (normalise, nearest, calibrate,
                    summarise), the classifier tap, the train embedding, the picture
    ``report``      the files under ``paths.evaluate_dir`` and ``paths.test_metrics``
    ``errors``      ``EvaluateError``, ``SecondLookRefused``
The test split is opened with ``io.TEST_READER`` (see ``tasks.core.io``), by ``stage`` only.
"""
from __future__ import annotations

from tasks.core.lineage import model_sha256
from tasks.evaluate.errors import EvaluateError, SecondLookRefused
from tasks.evaluate.ledger import Ledger, latest_read, readers
from tasks.evaluate.metrics import compute_metrics, predict
from tasks.evaluate.report import OUTPUT_FILES, write_outputs
from tasks.evaluate.stage import EvaluateResult, run

__all__ = ["OUTPUT_FILES", "EvaluateError", "EvaluateResult", "Ledger", "SecondLookRefused", "compute_metrics",
           "latest_read", "model_sha256", "predict", "readers", "run", "write_outputs"]
