"""The register stage: gate the candidate, then publish it in the MLflow registry as a pyfunc that takes raw images.

Reads ``models/best.pt`` (weights + preprocessing + training lineage), ``paths.test_metrics`` (written by the
evaluate stage; its ``model_sha256`` must be this checkpoint's, see ``model_sha256``) and ``paths.train_metrics``.

Gate (every threshold from ``params.yaml:register``):
    val_accuracy     best_val_accuracy  >= min_val_accuracy
    test_accuracy    test_accuracy      >= min_test_accuracy
    test_macro_f1    test_macro_f1      >= min_test_macro_f1
    test_not_reused  test_reused is false, unless allow_reused_test
    champion         candidate[champion_metric] >= champion's + min_improvement, where the champion's value is its
                     version tag ``keel.<champion_metric>``, compared only when its ``keel.manifest_sha256`` equals
                     the candidate's (the same frozen test split: the champion is never re-scored on test).
                     ``min_improvement: 0`` means "at least as good": a retrain of equal quality replaces the
                     champion.  A champion scored on another split cannot be compared: the gate fails and says so
                     (promote by hand through the alias if that is intended).  No champion: passes.
A failed gate writes ``paths.register_report`` (status ``gate_failed``) and prints the table; the registry is left
exactly as it was and the stage exits 0.

Registering (gate passed):
    * idempotent: a version of ``register.model_name`` tagged ``keel.model_sha256`` = this model is reused
      (status ``already_registered``; its recorded lineage tags are kept, missing ones added, values that differ
      today are listed in the report as ``tag_drift``); otherwise the pyfunc (``tasks.serving``) is logged under
      the training run (``run_info.tracking_run_id`` when that run exists on this server, else a new run
      "register" in ``register.experiment``) with the test metrics and the evaluate figures, and a version is
      created with the ``keel.*`` lineage tags (``TAG_KEYS``). Both accuracies of evaluate's feature-space audit
      travel with it: ``test_accuracy`` (all test items) and ``test_accuracy_dedup`` (without the test items that
      are near-duplicates of train items in the model's own features), with ``feature_dup_count``, as run metrics
      and as version tags (a tag says ``none: feature audit <why>`` when the audit was off);
    * alias ``challenger`` -> the version; the version is loaded back from the registry and must predict the input
      example exactly as the in-process model does; only then alias ``champion`` -> the version (an alias names one
      version, so the previous champion loses it);
    * the report (status ``registered`` / ``already_registered``) says how to serve ``models:/<name>@champion``.

Every tracking/registry call that can fail on IO is retried (``register.retries`` times, exponential backoff from
``register.retry_backoff_s``) on connection-type errors only; MLflow's own HTTP retries are switched off and its
request timeout bounded for the duration of the stage (unless the user set ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` /
``MLFLOW_HTTP_REQUEST_TIMEOUT``), so an unreachable server fails in bounded time with a ``RegisterError``.

Modules: ``records`` (names, ``RegisterError``, the records), ``candidate`` (inputs, lineage tags, input example),
``gate`` (the checks), ``registry`` (MLflow calls, retried), ``report`` (register.json, the printed table, the
version description), ``stage`` (``run``).
"""
from __future__ import annotations

from tasks.core.lineage import model_sha256  # the one definition of a model's identity (shared with evaluate)
from tasks.register.gate import gate
from tasks.register.records import (
    CHALLENGER,
    CHAMPION,
    LOGGED_METRICS,
    SERVE_PORT,
    TAG,
    TAG_KEYS,
    TEST_METRIC_KEYS,
    Champion,
    Check,
    RegisterError,
    RegisterResult,
)
from tasks.register.registry import HTTP_ENV
from tasks.register.stage import run

__all__ = ["CHALLENGER", "CHAMPION", "HTTP_ENV", "LOGGED_METRICS", "SERVE_PORT", "TAG", "TAG_KEYS", "TEST_METRIC_KEYS",
           "Champion", "Check", "RegisterError", "RegisterResult", "gate", "model_sha256", "run"]
