"""The one base of every error a user can act on.

``keel <stage>`` catches :class:`UserError` once and prints ``keel <stage>: error: <message>`` with no traceback;
anything else is a bug in keel and keeps its traceback. A message says what was wrong, where (file, key, row or
id) and what to do. Stage-specific errors subclass one of these; nothing else should.
"""
from __future__ import annotations


class UserError(Exception):
    """Something the user can fix: a bad param, a missing or malformed input, a failed gate, a halted run."""


class ConfigError(UserError):
    """params.yaml (or an override) is invalid; the message names the file and key."""


class DataError(UserError):
    """An input or stage output is missing, malformed or fails a data check; the message names the file."""
