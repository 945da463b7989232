"""split (freeze): assign every raw item to train/val/test before anything else touches the data.

Leakage units.  Items are joined into one unit when they share a caller-provided group, have identical decoded
pixels, or are verified near duplicates (``tasks.core.neardup``: found under a flip, a shift of a few pixels, a
small crop, a re-encode or a change of light).  A unit is assigned as a whole, so no group, exact or near
duplicate straddles splits.

Stable and frozen.  A unit's split is a pure function of the seed and the unit's key (its caller group, else its
smallest member id): adding items never changes the key of an untouched unit.  On top of that the split is
frozen: every id of the previous manifest keeps its split or its exclusion, whatever is added and under every
policy (``assign``); changing the seed, fractions or policy of a frozen split is refused; re-splitting is
deliberate (``keel split --refreeze``), because it changes what the test set is.

Source-provided splits are honoured: the source's test set stays the test set and validation is carved from the
source's train set.  When a unit has members on both sides of the source's test split, or ingest found the same
bytes in both, ``cross_split_duplicates`` decides (drop the train side, move it to test, or fail).  An
independent check (``check``) then fails the stage if any link joins two different splits.

Modules: ``links`` (find: group, identical pixels, near duplicates), ``assign`` (the rules), ``check`` (the
independent check), ``report`` (leakage.json pairs and leakage.png), ``stage`` (``run``).
"""
from __future__ import annotations

from tasks.split.assign import ORDER, assign
from tasks.split.check import check
from tasks.split.links import Links, find
from tasks.split.stage import FrozenSplitError, LeakageError, SplitResult, run

__all__ = ["ORDER", "FrozenSplitError", "LeakageError", "Links", "SplitResult", "assign", "check", "find", "run"]
