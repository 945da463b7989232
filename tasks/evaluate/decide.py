"""The second-look policy: where a model's read stands among the reads of one test split, and what
``evaluate.second_look`` (``strict`` | ``warn``) makes of a different model asking for a split already used.

Every extra look at the same test set biases the estimate toward models that happen to fit it, so ``strict``
refuses a second model and ``warn`` reads but marks the result ``test_reused``. Re-scoring a model whose recorded
result went missing is not a new look: it keeps the look number of its first read and is never refused."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

RESCORE_NOTE = "recorded result missing or altered; the same model re-scored (not a new look)"


@dataclass(frozen=True)
class Look:
    """One model's read of a manifest's test split, placed among the earlier reads of that split."""
    others: dict[str, dict]  # model_sha256 -> first read entry, of each model that read the split before this one
    number: int  # this read's look number on the split
    rescore: bool  # this model read the split before and its recorded result is gone or altered

    @property
    def reused(self) -> bool:
        return bool(self.others)

    def refused(self, policy: str) -> bool:
        """Only a new look by a different model is refused, and only under ``strict``."""
        return self.reused and not self.rescore and policy == "strict"

    @property
    def note(self) -> str | None:
        return RESCORE_NOTE if self.rescore else None


def next_look(prior: dict[str, dict], sha: str) -> Look:
    """The look ``sha`` would take, given ``prior`` (``ledger.readers`` of the manifest, in order of first read)."""
    rescore = sha in prior
    order = list(prior)
    others = {k: prior[k] for k in order[:order.index(sha)]} if rescore else prior  # looked before it
    return Look(others=others, number=len(others) + 1, rescore=rescore)


def refusal_reason(look: Look) -> str:
    """The ``reason`` of a ``refused`` ledger entry."""
    return f"second look (would be look #{look.number}); earlier readers: {[k[:12] for k in look.others]}"


def refusal_message(look: Look, sha: str, name: str, manifest_sha: str, ledger: Path) -> str:
    """Why a strict second look is refused, and the three honest ways forward."""
    prior = look.others
    first = next(iter(prior.values()))
    others = len(prior) - 1
    run = f", tracking run {first['tracking_run_id']}" if first.get("tracking_run_id") else ""
    return (
        f"second look at the sealed test split refused (evaluate.second_look: strict). The test split of manifest "
        f"{manifest_sha[:12]}… was already used to score model {first['model_sha256'][:12]}… ({first['model_name']}, "
        f"{first['checkpoint']}{run}) at {first['time']}"
        + (f", and {others} other model(s) since" if others else "")
        + f". This model ({sha[:12]}…, {name}) would be look #{len(prior) + 1}: every extra look at the same test "
        "set biases the estimate toward models that happen to fit that test set, so its number stops measuring "
        "generalisation.\nHow to proceed:\n"
        "  - select between models on the val split (train's best_val_accuracy) and evaluate only the one you pick;\n"
        "  - or carve a fresh held-out set: add new data (or a new source test split) and run `keel split "
        "--refreeze`, then shard/train/evaluate again (a refreeze voids earlier test results);\n"
        "  - or knowingly accept a reused test set: set evaluate.second_look: warn (the result is marked "
        "test_reused with the number of looks).\n"
        f"The refusal is recorded in {ledger}.")


def warn(look: Look, policy: str, manifest_sha: str) -> None:
    """Say on stderr that a read re-scores a model, and that it reuses a test set other models were scored on."""
    if look.note:
        print(f"evaluate: warning: {look.note}", file=sys.stderr)
    if look.others:
        earlier = ", ".join(f"{k[:12]}… ({v['model_name']}, {v['time']})" for k, v in look.others.items())
        print(f"evaluate: warning: test set reused (evaluate.second_look: {policy}): look #{look.number} "
              f"at the test split of manifest {manifest_sha[:12]}…, already used to score {earlier}; "
              "this estimate is biased toward models that happen to fit this test set", file=sys.stderr)
