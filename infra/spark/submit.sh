#!/usr/bin/env bash
# Run one spark_jobs entry point on a cluster, unchanged from local runs:
#   infra/spark/submit.sh import_movielens --data-dir /mnt/raw/movielens-100k --lake-root s3://bucket/lake
# (the name of a module in spark_jobs/entrypoints/; its --help lists the arguments). Raw inputs are
# read from a path the driver can list (a mounted volume); the lake root may be object storage.
# Needs SPARK_MASTER (e.g. yarn, k8s://https://..., spark://host:7077). The cluster settings of
# spark-defaults.conf apply to these jobs; Spark sessions inside Airflow tasks use HISAM_SPARK_MASTER
# and HISAM_SPARK_CONF instead (spark_jobs/session.py).
set -euo pipefail
job="$1"; shift
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
# a fresh archive per submit: zip would update an existing one, keeping modules since removed
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
(cd "$root" && zip -qr "$src/hisam_src.zip" hisam_core spark_jobs -x '*/__pycache__/*')
spark-submit \
  --master "${SPARK_MASTER:?set SPARK_MASTER}" \
  --properties-file "$here/spark-defaults.conf" \
  --py-files "$src/hisam_src.zip" \
  "$root/spark_jobs/entrypoints/$job.py" "$@"
