"""Shared building blocks that know no stage: errors, configuration, storage contracts and atomic writes,
lineage, imaging, dedup, parallel maps, tracking, retry, text. Nothing here imports a stage."""
