"""The MLflow ``PythonModel`` wrapper around :class:`~tasks.serving.model.ImageClassifier`, created lazily.

A registered model is logged as models-from-code (``tasks/serving/model_code.py`` builds one instance and hands
it to ``mlflow.models.set_model``): no pickled object.  The class is still published as
``tasks.serving.KeelImageClassifier``, the name that models registered before that change carry in their
``python_model.pkl`` (cloudpickle stored it by reference), so they keep loading where pickles are allowed.
"""
from __future__ import annotations

import sys

from tasks.serving.inputs import InvalidImageError
from tasks.serving.model import ImageClassifier

WEIGHTS_ARTIFACT = "weights"        # context.artifacts key: torch state dict (weights.pt)
SPEC_ARTIFACT = "preprocessing"     # context.artifacts key: the JSON spec (preprocessing.json)
PUBLIC_MODULE = "tasks.serving"     # where the class is found by reference (see the module docstring)
_PYFUNC_CLASS = None


def pyfunc_class() -> type:
    """The ``mlflow.pyfunc.PythonModel`` subclass, created on first use (importing MLflow only then).

    It is published as ``tasks.serving.KeelImageClassifier`` (see the module docstring).
    """
    global _PYFUNC_CLASS
    if _PYFUNC_CLASS is not None:
        return _PYFUNC_CLASS
    import mlflow.pyfunc

    class KeelImageClassifier(mlflow.pyfunc.PythonModel):
        """Raw images -> class; see the ``tasks.serving`` module docstring for the input/output schema."""

        # The schema is the explicit signature (``signature()``), not predict's type hints: skip MLflow's
        # type-hint wrapper (and its "add type hints" warning).
        _skip_type_hint_validation = True

        def load_context(self, context):
            self._clf = ImageClassifier.from_files(context.artifacts[WEIGHTS_ARTIFACT], context.artifacts[SPEC_ARTIFACT])

        def predict(self, context, model_input, params=None):
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            try:
                return self._clf.predict(model_input)
            except InvalidImageError as exc:
                raise MlflowException(f"invalid input: {exc}", error_code=INVALID_PARAMETER_VALUE) from None

    KeelImageClassifier.__module__ = PUBLIC_MODULE
    KeelImageClassifier.__qualname__ = "KeelImageClassifier"
    _PYFUNC_CLASS = KeelImageClassifier
    sys.modules[PUBLIC_MODULE].KeelImageClassifier = KeelImageClassifier
    return KeelImageClassifier
