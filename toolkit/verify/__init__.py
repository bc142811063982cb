"""Read-only proof: content digests, fingerprints of the tables and of the MLflow view."""
