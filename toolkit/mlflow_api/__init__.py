"""GitLab's MLflow-compatible API over the database at any stage of the blueprint.

Reads: ``views.py`` (tracking) and ``registry.py`` answer each call from one connection,
through the stage-aware SQL of the fingerprint's MLflow view
(:mod:`toolkit.verify.fingerprint`). Writes (``--allow-writes``): the tables
``tracking_writes.py`` (``experiment_writes.py``, ``run_writes.py``, over ``declared.py``
and ``tracking_rows.py``) and ``registry_writes.py`` (``model_writes.py``,
``version_writes.py``, over ``registry_answers.py``), each run by ``writing.py`` in one
transaction, and placed by ``stages.py`` and ``stage_experiments.py`` where the stage
keeps them. ``server.py`` and ``wsgi.py`` are the HTTP side.
"""
