"""The train stage. Public entry: ``tasks.train.loop.run``. Runs with torch + timm + pyarrow alone."""
