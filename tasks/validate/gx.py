"""Running the suite through Great Expectations: an in-memory context whose only Data Docs site is the stage's
``docs/`` folder, and one checkpoint per batch; the Data Docs are built once, after the last batch, for all of
them (an ``UpdateDataDocsAction`` per checkpoint rebuilt the site's index after every batch: about half of
validate's time after the import).

Great Expectations is imported inside functions only: importing it costs about 3 s.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.validate.result import Batch

_SITE = "keel"                       # the one Data Docs site; named so UpdateDataDocsAction touches only it


def _context(docs_dir: Path) -> Any:
    """An in-memory context whose only Data Docs site is ``docs_dir`` (nothing written anywhere else)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        # init_temp_docs_sites=False: the default "local_site" would build into a fresh /tmp folder.
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={_SITE: {
            "class_name": "SiteBuilder",
            "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }},
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def run_gx(batches: list[Batch], docs_dir: Path, sample_ids: int) -> list[tuple[Batch, Any]]:
    import great_expectations as gx
    from great_expectations.data_context.types.resource_identifiers import ExpectationSuiteIdentifier

    context = _context(docs_dir)
    source = context.data_sources.add_pandas("keel")
    results, built = [], []
    for batch in batches:
        definition = source.add_dataframe_asset(batch.name).add_batch_definition_whole_dataframe(batch.name)
        # the whole suite in one store write (add_expectation one by one re-serialised the suite 80 times)
        suite = context.suites.add(gx.ExpectationSuite(name=f"keel_{batch.name}", expectations=batch.expectations))
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"keel_{batch.name}", data=definition, suite=suite))
        # One checkpoint per batch: Checkpoint.run hands the same batch_parameters (one dataframe) to all of
        # its validation definitions, and each batch here is a different frame.
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"keel_{batch.name}",
            validation_definitions=[validation],
            actions=[],  # the Data Docs are built once, below
            result_format={
                "result_format": "SUMMARY",
                # Map each unexpected value back to its row: the id (or the split, for the derived frame).
                "unexpected_index_column_names": [batch.index_column],
                "partial_unexpected_count": max(sample_ids, 20),
            },
        ))
        outcome = checkpoint.run(batch_parameters={"dataframe": batch.frame})
        ((result_id, validation_result),) = outcome.run_results.items()
        results.append((batch, validation_result))
        built += [result_id, ExpectationSuiteIdentifier(name=suite.name)]
    # what each checkpoint's UpdateDataDocsAction did (its result and suite pages, then the index), for all at once
    context.build_data_docs(site_names=[_SITE], resource_identifiers=built, dry_run=False, build_index=True)
    return results
