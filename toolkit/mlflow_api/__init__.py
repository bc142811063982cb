"""GitLab's MLflow-compatible tracking API, read-only, over the database at any stage.

``views.py`` answers each read call from one connection, through the stage-aware SQL of
the fingerprint's MLflow view (:mod:`toolkit.verify.fingerprint`); ``server.py`` is the
HTTP side: routes, MLflow error documents, one short READ ONLY transaction per request.
"""
