"""What the register stage's parts share: names (aliases, tag prefix, metric keys), the error, the records."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.core.errors import DataError

CHALLENGER, CHAMPION = "challenger", "champion"
TAG = "keel."
TAG_KEYS = ("git_sha", "git_dirty", "environment_hash", "dvc_lock_sha256", "manifest_sha256", "shard_index_sha256",
            "ge_validation", "params_sha256", "training_run_id", "model_sha256", "test_ledger", "test_accuracy",
            "test_macro_f1", "val_accuracy", "model_name", "test_accuracy_dedup", "feature_dup_count")
# test_accuracy_dedup / feature_dup_count: evaluate's feature-space audit (None in test.json when it was off; its
# ``feature_audit`` key then says why, and the tags carry that reason instead of a number)
TEST_METRIC_KEYS = ("test_accuracy", "test_macro_f1", "test_loss", "test_ece", "test_rows", "test_looks",
                    "test_reused", "model_sha256", "manifest_sha256", "test_accuracy_dedup", "feature_dup_count")
LOGGED_METRICS = ("test_accuracy", "test_macro_f1", "test_loss", "test_ece", "test_rows", "test_looks",
                  "test_accuracy_dedup", "feature_dup_count", "feature_dup_fraction", "feature_dup_threshold")
SERVE_PORT = 5001


class RegisterError(DataError):
    """The candidate cannot be registered (inconsistent inputs, registry unreachable); the message says why."""


@dataclass
class Check:
    name: str
    value: float | bool | None
    threshold: float | bool | None
    passed: bool
    detail: str


@dataclass
class Champion:
    version: str
    model_sha256: str | None
    manifest_sha256: str | None
    metric: str
    value: float | None
    run_id: str | None


@dataclass
class RegisterResult:
    status: str  # registered | already_registered | gate_failed
    model_name: str
    version: str | None
    aliases: list[str]
    model_uri: str
    report_path: str
    checks: list[Check]
    tags: dict[str, str] = field(default_factory=dict)
    tracking_uri: str = ""
    run_id: str | None = None
    tag_drift: dict[str, dict[str, str]] = field(default_factory=dict)  # already_registered: recorded vs today


@dataclass
class Candidate:
    blob: dict
    model_sha256: str
    test: dict
    train: dict
    manifest_sha256: str


def is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def short(sha: str | None) -> str:
    return f"{sha[:12]}…" if sha else "unknown"
