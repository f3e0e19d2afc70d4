#!/usr/bin/env bash
# Run one spark_jobs entry point on a cluster, unchanged from local runs:
#   infra/spark/submit.sh import_movielens --data-dir /mnt/raw/movielens-100k --logical-date 2026-11-22 \
#     --lake-root s3://bucket/lake
# (the name of a module in spark_jobs/entrypoints/; its --help lists the arguments). Raw inputs are
# read from a path the driver can list (a mounted volume); the lake root may be object storage.
# Needs SPARK_MASTER (e.g. yarn, k8s://https://..., spark://host:7077). The cluster settings of
# spark-defaults.conf apply to these jobs; Spark sessions inside Airflow tasks use HISAM_SPARK_MASTER
# and HISAM_SPARK_CONF instead (spark_jobs/session.py), which this script unsets for the job: they
# would override --master and the properties file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
jobs="$(cd "$root/spark_jobs/entrypoints" && ls [a-z]*.py | grep -v '^common\.py$' | sed 's/\.py$//' | tr '\n' ' ' | sed 's/ $//')"
if [ $# -eq 0 ] || ! tr ' ' '\n' <<<"$jobs" | grep -qxF -- "$1"; then
  [ $# -eq 0 ] || echo "$0: unknown job '$1'" >&2
  echo "usage: $0 JOB [ARGS...]" >&2
  echo "  JOB: one of $jobs" >&2
  echo "  ARGS: python spark_jobs/entrypoints/JOB.py --help lists them" >&2
  exit 2
fi
job="$1"; shift
# a fresh archive per submit: zip would update an existing one, keeping modules since removed
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
(cd "$root" && zip -qr "$src/hisam_src.zip" hisam_core spark_jobs -x '*/__pycache__/*')
env -u HISAM_SPARK_MASTER -u HISAM_SPARK_CONF spark-submit \
  --master "${SPARK_MASTER:?set SPARK_MASTER}" \
  --properties-file "$here/spark-defaults.conf" \
  --py-files "$src/hisam_src.zip" \
  "$root/spark_jobs/entrypoints/$job.py" "$@"
