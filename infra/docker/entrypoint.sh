#!/usr/bin/env bash
# The image's entry point. Spark on Kubernetes starts executor pods (and cluster-mode drivers) from
# spark.kubernetes.container.image with the argument `executor` or `driver`, which Spark's own images
# hand to their entrypoint; this one does the same with the pip-installed pyspark. `airflow ...`
# first checks that the environment sets every ${VAR} its airflow.cfg names (Airflow would keep an
# unset one as literal text: a JWT secret anyone can read in infra/airflow/airflow.cfg.production).
# Any other command (hisam, bash) runs as given.
set -euo pipefail

spark_home() { python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))'; }

case "${1:-}" in
  driver)
    shift
    SPARK_HOME="${SPARK_HOME:-$(spark_home)}"
    exec "$SPARK_HOME/bin/spark-submit" \
      --conf "spark.driver.bindAddress=${SPARK_DRIVER_BIND_ADDRESS:?}" \
      --conf "spark.executorEnv.SPARK_DRIVER_POD_IP=${SPARK_DRIVER_BIND_ADDRESS}" \
      --deploy-mode client "$@"
    ;;
  executor)
    shift
    SPARK_HOME="${SPARK_HOME:-$(spark_home)}"
    # the driver passes the executors' JVM options as SPARK_JAVA_OPT_0, SPARK_JAVA_OPT_1, ... in order
    java_opts=()
    while IFS= read -r name; do
      java_opts+=("${!name}")
    done < <(compgen -e | grep '^SPARK_JAVA_OPT_[0-9]*$' | sort -t_ -k4 -n)
    exec java "${java_opts[@]}" \
      -Xms"${SPARK_EXECUTOR_MEMORY:?}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
      -cp "${SPARK_CLASSPATH:+$SPARK_CLASSPATH:}$SPARK_HOME/jars/*" \
      org.apache.spark.scheduler.cluster.k8s.KubernetesExecutorBackend \
      --driver-url "${SPARK_DRIVER_URL:?}" \
      --executor-id "${SPARK_EXECUTOR_ID:?}" \
      --cores "${SPARK_EXECUTOR_CORES:?}" \
      --app-id "${SPARK_APPLICATION_ID:?}" \
      --hostname "${SPARK_EXECUTOR_POD_IP:?}" \
      --resourceProfileId "${SPARK_RESOURCE_PROFILE_ID:-0}" \
      --podName "${SPARK_EXECUTOR_POD_NAME:?}"
    ;;
  airflow)
    cfg="${AIRFLOW_CONFIG:-${AIRFLOW_HOME:-${HOME:-}/airflow}/airflow.cfg}"
    if [ -f "$cfg" ]; then
      missing=()
      while IFS= read -r name; do
        [ -n "${!name:-}" ] || missing+=("$name")
      done < <(grep -v '^[[:space:]]*[#;]' "$cfg" | grep -o '\${[A-Za-z_][A-Za-z0-9_]*}' | tr -d '${}' | sort -u)
      if [ ${#missing[@]} -gt 0 ]; then
        names="$(IFS=,; echo "${missing[*]}")"
        echo "$cfg names \$${names//,/, \$} but the environment does not set it: set it and start again" >&2
        exit 78
      fi
    fi
    exec "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
