#!/usr/bin/env bash
# The image's entry point. Spark on Kubernetes starts executor pods (and cluster-mode drivers) from
# spark.kubernetes.container.image with the argument `executor` or `driver`, which Spark's own images
# hand to their entrypoint; this one does the same with the pip-installed pyspark. `airflow ...`
# first checks that the environment sets every $VAR / ${VAR} its airflow.cfg names, unless the
# option's AIRFLOW__SECTION__KEY (or its _CMD or _SECRET) overrides that line (Airflow would keep an
# unset one as literal text: a JWT secret anyone can read in infra/airflow/airflow.cfg.production).
# Any other command (hisam, bash) runs as given.
set -euo pipefail

spark_home() { python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))'; }

# "<section> <key> <VAR>" for each $VAR or ${VAR} in a value of the Airflow cfg $1 (comments, and
# lines before any [section], which Airflow does not read, skipped)
placeholders() {
  awk '
    /^[[:space:]]*[#;]/ { next }
    /^[[:space:]]*\[/ { section = $0; gsub(/[][[:space:]]/, "", section); next }
    /=/ && section != "" {
      key = $0; sub(/=.*/, "", key); gsub(/[[:space:]]/, "", key)
      value = $0; sub(/^[^=]*=/, "", value)
      while (match(value, /\$\{?[A-Za-z_][A-Za-z0-9_]*\}?/)) {
        name = substr(value, RSTART, RLENGTH); gsub(/[${}]/, "", name)
        print section, key, name
        value = substr(value, RSTART + RLENGTH)
      }
    }' "$1"
}

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
    # as Spark's image: the conf folders first (the log4j2 and Hadoop config maps Spark mounts there)
    classpath="${SPARK_CONF_DIR:-$SPARK_HOME/conf}:${HADOOP_CONF_DIR:+$HADOOP_CONF_DIR:}"
    classpath+="${SPARK_CLASSPATH:+$SPARK_CLASSPATH:}$SPARK_HOME/jars/*"
    exec java "${java_opts[@]}" \
      -Xms"${SPARK_EXECUTOR_MEMORY:?}" -Xmx"${SPARK_EXECUTOR_MEMORY}" \
      -cp "$classpath" \
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
      while read -r section key name; do
        override="AIRFLOW__${section^^}__${key^^}"  # wins over the cfg line, as do its _CMD and _SECRET
        cmd="${override}_CMD" secret="${override}_SECRET"
        [ -n "${!override:-}" ] || [ -n "${!cmd:-}" ] || [ -n "${!secret:-}" ] || [ -n "${!name:-}" ] \
          || missing+=("\$$name ([$section] $key)")
      done < <(placeholders "$cfg" | sort -u)
      if [ ${#missing[@]} -gt 0 ]; then
        echo "$cfg needs $(IFS=,; echo "${missing[*]}" | sed 's/,/, /g'), unset or empty here" \
          "(nor is its AIRFLOW__SECTION__KEY set): set them and start again" >&2
        exit 78
      fi
    fi
    exec "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
