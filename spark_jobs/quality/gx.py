"""Great Expectations 1.x glue: one data context per configuration, a Spark data source,
one DataFrame asset / whole-batch definition / suite / validation definition / checkpoint per
quality suite, and a Data Docs site in ``QualityConfig.docs_dir``.

GX is imported lazily (it takes seconds), so importing :mod:`spark_jobs.quality` stays cheap.
Analytics are off (``GX_ANALYTICS_ENABLED=False``; the pipeline may run without internet) and so
are GX's progress bars. ``gx_mode="ephemeral"`` keeps suites and results in memory (the Data Docs
HTML is still written); ``"file"`` keeps a GX project under ``gx_project_dir``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame

from spark_jobs.quality.config import QualityConfig
from spark_jobs.quality.report import ExpectationOutcome
from spark_jobs.quality.rules import GxSpec

logger = logging.getLogger(__name__)

SITE_NAME = "hisam_quality"
DATASOURCE_NAME = "hisam_spark"
BATCH_DEFINITION = "whole_batch"
_CONTEXTS: dict[tuple[str, str, str], Any] = {}


def _site_config(docs_dir: str) -> dict[str, Any]:
    return {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": docs_dir},
    }


def get_context(config: QualityConfig) -> Any:
    """The GX data context for ``config`` (cached per mode, project and docs directory)."""
    docs_dir = str(Path(config.docs_dir).resolve())
    project = str(Path(config.gx_project_dir).resolve()) if config.gx_mode == "file" else ""
    key = (config.gx_mode, project, docs_dir)
    if key in _CONTEXTS:
        return _CONTEXTS[key]
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if config.gx_mode == "file":
        Path(project).mkdir(parents=True, exist_ok=True)
        context = gx.get_context(mode="file", project_root_dir=project)
    else:
        context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    sites = context.list_data_docs_sites()
    if SITE_NAME in sites:
        context.update_data_docs_site(SITE_NAME, _site_config(docs_dir))
    else:
        context.add_data_docs_site(SITE_NAME, _site_config(docs_dir))
    if config.gx_mode == "file":
        context.variables.save()
    _CONTEXTS[key] = context
    logger.info("GX %s context ready; Data Docs in %s", config.gx_mode, docs_dir)
    return context


def _batch_definition(context: Any, asset_name: str) -> Any:
    try:
        source = context.data_sources.get(DATASOURCE_NAME)
    except (KeyError, ValueError, LookupError):
        source = context.data_sources.add_spark(name=DATASOURCE_NAME)
    try:
        asset = source.get_asset(asset_name)
    except LookupError:
        asset = source.add_dataframe_asset(name=asset_name)
    try:
        return asset.get_batch_definition(BATCH_DEFINITION)
    except (KeyError, ValueError, LookupError):
        return asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION)


def build_expectation(spec: GxSpec, mostly: float) -> Any:
    """The GX expectation of ``spec``; tolerant column-map ones get ``mostly`` when below 1."""
    import great_expectations.expectations as gxe

    cls = getattr(gxe, spec.expectation, None)
    if cls is None:
        raise ValueError(f"unknown GX expectation {spec.expectation!r}")
    kwargs = dict(spec.kwargs)
    if spec.tolerant and mostly < 1.0 and "mostly" in cls.__fields__:
        kwargs["mostly"] = mostly
    if spec.rule:
        kwargs["meta"] = {"rule": spec.rule}
    return cls(**kwargs)


def _outcome(result: Any) -> ExpectationOutcome:
    config = result.expectation_config
    kwargs = {k: v for k, v in dict(config.kwargs).items() if k not in ("batch_id",)}
    body = result.result or {}
    info = result.exception_info or {}
    # GX 1.x reports a failed metric under its metric id: {"MetricConfigurationID(...)": {...}}
    found = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    raised = [str(i.get("exception_message")) for i in found if i.get("raised_exception")]
    exception = "; ".join(raised) or None
    meta = config.meta or {}
    unexpected = body.get("unexpected_count")
    return ExpectationOutcome(
        expectation_type=config.type,
        kwargs=kwargs,
        success=bool(result.success),
        rule=meta.get("rule"),
        unexpected_count=None if unexpected is None else int(unexpected),
        unexpected_percent=body.get("unexpected_percent"),
        observed_value=body.get("observed_value"),
        exception=exception,
    )


def validate(
    df: DataFrame,
    suite_name: str,
    specs: list[GxSpec],
    config: QualityConfig,
    mostly: list[float],
) -> tuple[list[ExpectationOutcome], str | None]:
    """Run the suite's expectations over ``df`` through a GX checkpoint; ``mostly``: one per spec
    (:func:`spark_jobs.quality.gate.tolerances`).

    Returns one outcome per expectation and the Data Docs index (``None`` when docs are off).
    """
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    context = get_context(config)
    batch_definition = _batch_definition(context, suite_name)
    expectations = [build_expectation(s, m) for s, m in zip(specs, mostly, strict=True)]
    suite = context.suites.add_or_update(gx.ExpectationSuite(name=suite_name, expectations=expectations))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=f"{suite_name}__validation", data=batch_definition, suite=suite)
    )
    actions = (
        [UpdateDataDocsAction(name="update_data_docs", site_names=[SITE_NAME])]
        if config.build_data_docs
        else []
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=f"{suite_name}__checkpoint",
            validation_definitions=[definition],
            actions=actions,
            result_format={"result_format": config.result_format},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": df})
    outcomes = [_outcome(r) for run in result.run_results.values() for r in run.results]
    index = Path(config.docs_dir).resolve() / "index.html"
    return outcomes, (str(index) if config.build_data_docs and index.exists() else None)
