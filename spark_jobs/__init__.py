"""PySpark transforms (DataFrame in, DataFrame out) and thin spark-submit entry points."""
