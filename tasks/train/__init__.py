"""The train stage: a short loop plus callbacks (see callbacks/__init__.py for the loop as pseudocode).

``entry.main`` (the edge of ``keel train``) -> ``loop.run`` (launch checks, device, precision) -> ``setup`` builds
data, model, optimiser, schedule and ``BatchPlan`` -> ``Trainer.fit``. Needs torch, timm, numpy, pyarrow and,
through ``tasks.core.config``, pydantic and PyYAML; matplotlib is optional (only the curves PNG). Never imports
MLflow or Prefect: metrics go to the ``MetricLogger`` interface (logger.py)."""
