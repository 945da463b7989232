"""The served model as MLflow *models-from-code*: MLflow executes this file when it saves the registered model
and again when it loads it (``mlflow.pyfunc.load_model``, ``mlflow models serve``).  The model therefore holds
readable code, this file plus the ``tasks`` package under ``code/``, and weights as a plain tensor file; no
cloudpickled Python object, so serving can run with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

Nothing in keel imports this module: it is a script for MLflow, which is why its one statement runs at import.
"""
import mlflow.models

from tasks.serving.pyfunc import pyfunc_class

mlflow.models.set_model(pyfunc_class()())
