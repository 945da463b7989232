"""The gate: thresholds from ``params.yaml:register`` and the comparison with the current @champion (see the
``tasks.register`` docstring).  Pure, no IO."""
from __future__ import annotations

from tasks.core.config import RegisterConfig
from tasks.register.records import TAG, Champion, Check, short

_EPS = 1e-9  # float slack in threshold comparisons (0.9 + 0.05 is 0.9500000000000001)


def gate(cfg: RegisterConfig, test: dict, val_accuracy: float, candidate_sha: str, manifest_sha: str,
         champion: Champion | None) -> list[Check]:
    """The gate's checks (see the module docstring); pure, no IO."""
    return [
        _threshold("val_accuracy", val_accuracy, cfg.min_val_accuracy, "best val accuracy (metrics/train.json)"),
        _threshold("test_accuracy", test["test_accuracy"], cfg.min_test_accuracy, "register.min_test_accuracy"),
        _threshold("test_macro_f1", test["test_macro_f1"], cfg.min_test_macro_f1, "register.min_test_macro_f1"),
        _not_reused(cfg, test),
        _champion(cfg, float(test[cfg.champion_metric]), candidate_sha, manifest_sha, champion),
    ]


def _not_reused(cfg: RegisterConfig, test: dict) -> Check:
    reused = bool(test["test_reused"])
    if cfg.allow_reused_test:
        detail = (f"test set reused ({test.get('test_looks')} looks); allowed by register.allow_reused_test"
                  if reused else "first look at this test split")
        return Check("test_not_reused", reused, None, True, detail)
    return Check("test_not_reused", reused, False, not reused,
                 f"test set reused ({test.get('test_looks')} looks) and register.allow_reused_test is false"
                 if reused else "first look at this test split")


def _champion(cfg: RegisterConfig, value: float, candidate_sha: str, manifest_sha: str,
              champion: Champion | None) -> Check:
    metric = cfg.champion_metric
    if champion is None:
        return Check("champion", value, None, True, "no current @champion: the first version becomes it")
    if champion.model_sha256 == candidate_sha:
        return Check("champion", value, champion.value, True,
                     f"this model is the current @champion (version {champion.version})")
    if champion.manifest_sha256 != manifest_sha or champion.value is None:
        why = (f"has no {TAG}{metric} tag" if champion.manifest_sha256 == manifest_sha
               else f"was scored on another test split (manifest {short(champion.manifest_sha256)}, candidate "
                    f"{short(manifest_sha)})")
        return Check("champion", value, None, False,
                     f"cannot compare with @champion version {champion.version}: it {why}; evaluating both on "
                     f"one split would be a second look at the test set. Decide as a team; to promote this "
                     f"model anyway, register it and move the alias by hand (MlflowClient."
                     f"set_registered_model_alias)")
    need = champion.value + cfg.min_improvement
    return Check("champion", value, need, value + _EPS >= need,
                 f"{metric} vs @champion version {champion.version} ({champion.value:.4f}) + "
                 f"register.min_improvement ({cfg.min_improvement:g}), same test split")


def _threshold(name: str, value: float, threshold: float, what: str) -> Check:
    value = float(value)
    return Check(name, value, float(threshold), value + _EPS >= threshold, what)
