"""The discipline commands beside the DAG: preflight (the checklist before a long run), reproduce (retrain a
registered model from its lineage) and stability (is the recipe well behaved)."""
