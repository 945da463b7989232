"""The train stage. Public entry: ``tasks.train.loop.run``. Needs torch, timm, numpy, pyarrow and, through
``tasks.core.config``, pydantic and PyYAML; matplotlib is optional (only the curves PNG)."""
