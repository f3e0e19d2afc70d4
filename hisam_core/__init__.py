"""Hi-SAM model library: the Disentangled Semantic Tokenizer (DST) and the Hierarchical
Memory-Anchor Transformer (HMAT). Pure PyTorch/transformers; no Airflow, Spark or MLflow."""

__version__ = "0.1.0"
