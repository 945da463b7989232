"""The train stage's one error type (kept apart so every piece of the stage can raise it without import cycles)."""
from __future__ import annotations

from tasks.core.errors import UserError


class TrainError(UserError):
    """A training problem a user can act on (bad params for this data, a halted run)."""
