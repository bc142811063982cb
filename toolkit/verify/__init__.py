"""Read-only checks: content digests now; fingerprints and the MLflow view build on them."""
