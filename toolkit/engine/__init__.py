"""The machinery every milestone uses: steps, keyset batches, locks, the runner."""
