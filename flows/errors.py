"""The flow's two failures, in a module of their own so that every flows module (and a CLI that has not imported
Prefect yet) raises and catches the same classes: the flow cannot start, or a stage failed."""
from __future__ import annotations


class FlowError(RuntimeError):
    """The flow cannot start (not a DVC project, bad overrides, inconsistent launch parameters)."""


class StageFailed(RuntimeError):
    """A stage (or dvc push) exited non-zero; the message is the stage's own error text."""

    def __init__(self, stage: str, returncode: int, detail: str, transient: bool = False):
        self.stage, self.returncode, self.detail, self.transient = stage, returncode, detail, transient
        super().__init__(f"stage '{stage}' failed (exit {returncode}): {detail}")

    def __reduce__(self):  # picklable with its fields (Prefect may serialise a task's exception)
        return (StageFailed, (self.stage, self.returncode, self.detail, self.transient))
