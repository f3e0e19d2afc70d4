"""Thin command-line mains, one per job, runnable as ``python -m spark_jobs.entrypoints.<job>`` or
with ``spark-submit`` (ship the packages with ``--py-files``; spark-submit's ``--master`` and
properties hold unless ``--master`` / ``HISAM_SPARK_MASTER`` or ``HISAM_SPARK_CONF`` set them). Each has ``--help``; each
prints a one-line JSON summary (counts, Delta versions) on stdout for the orchestrator.
"""
