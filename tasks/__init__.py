"""Thin adapters that do I/O (S3, MLflow, DVC, local servers) and call one ``cns`` function each."""
