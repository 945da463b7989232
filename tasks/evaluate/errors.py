"""The evaluate stage's errors: both are ``DataError`` (a ``UserError``), so the CLI prints them and exits 1."""
from __future__ import annotations

from tasks.core.errors import DataError


class EvaluateError(DataError):
    """A problem the user can act on (missing or mismatched checkpoint, wrong data version, ledger damage)."""


class SecondLookRefused(EvaluateError):
    """A different model asked for a test split that another model has already been scored on (strict policy)."""
