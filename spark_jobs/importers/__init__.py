"""Raw sources -> bronze (and bronze -> silver) lake tables.

* :mod:`.movielens`: MovieLens-100K raw files + posters + item_extra.tsv.
* :mod:`.amazon`: Amazon Reviews 2023 review and item-metadata JSONL.
* :mod:`.generic`: the documented bring-your-own format (CSV, Parquet or JSONL).
* :mod:`.synthetic`: generator of planted-structure data in the generic format (numpy, no Spark).
* :mod:`.silver`: bronze -> silver (int64 ids, labels, deduplication, MERGE).
* :mod:`.common`: quarantine and reconciliation machinery shared by all of them.
"""
