"""The ``toolkit`` command: thin Click commands over the library."""
