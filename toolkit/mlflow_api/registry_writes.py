"""GitLab's model-registry writes, done as GitLab's services do them, at each stage of the
blueprint.

The endpoints and what they run (commits named in ``docs/mlflow.md``, section "Writes"):

* ``registered-models/create``: ``Ml::CreateModelService``: the model's default
  experiment ``[model]<name>`` (an iid from ``internal_ids``), the model, a metadata row
  per tag. Any failure (a taken name, an invalid one, a duplicate tag) is GitLab's 400
  ``RESOURCE_ALREADY_EXISTS``.
* ``registered-models/update``: ``Ml::UpdateModelService``: the description, also to null
  when none is sent, as GitLab does.
* ``registered-models/delete``: ``Ml::DestroyModelService``: the model's ``ml_model``
  packages marked pending destruction (``Packages::MarkPackagesForDestructionService``),
  then the model, whose versions, metadata, default experiment and candidates go with it
  (the database's ``ON DELETE CASCADE``, as ``model.destroy`` leaves them to it).
* ``model-versions/create``: ``Ml::CreateModelVersionService``: the version (``gitlab.version``
  tag, else the latest version with its major incremented, else ``1.0.0``), its candidate
  (the run named by ``run_id``, else a new one in the model's default experiment), its
  ``ml_model`` package, a metadata row per tag. Errors are 400 ``INVALID_PARAMETER_VALUE``
  whose ``message`` is a list, as GitLab's ServiceResponse carries it.
* ``model-versions/update``: ``Ml::ModelVersions::UpdateModelVersionService``: the
  description; an unknown version is 400 ``UPDATE_FAILED``.

The stages (:class:`toolkit.mlflow_api.stages.Stage`): before milestone 4 a model gets its
default experiment as GitLab makes it; once milestone 4 dropped ``ml_experiments`` a
model is made alone, and a version's candidate gets ``model_id`` and no experiment. The
model's ``display_name`` (once milestone 3 added it) and the candidate's ``model_id``
(once milestone 2 added it) are set here, never left to milestones 2's and 3's transition
triggers: milestone 4 drops those before the experiments' tables, and writes in between
still meet stage MODELS. Every row inserted, updated or deleted is recorded with
:func:`toolkit.mlflow_api.stages.record_write`.

The registered-model endpoints are :mod:`toolkit.mlflow_api.model_writes`, the version
ones :mod:`toolkit.mlflow_api.version_writes`, and GitLab's answers and checks that both
use :mod:`toolkit.mlflow_api.registry_answers`; this module is their table. Each function
runs inside the caller's transaction and raises
:class:`toolkit.mlflow_api.errors.ApiError` for GitLab's error answers; it leaves nothing
half-done because the caller rolls the transaction back on any error.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy.engine import Connection

from toolkit.mlflow_api import model_writes, version_writes
from toolkit.mlflow_api.stages import (
    WriteContext,
)

Write = Callable[[Connection, WriteContext, dict], dict]


# The parameters GitLab declares for these routes (registered_models.rb, model_versions.rb),
# with their Grape types, for the access log's names as ``inputs.DECLARED`` has the reads'.
DECLARED: dict[str, dict[str, type]] = {
    "registered-models/create": {"name": str, "description": str, "tags": list},
    "registered-models/update": {"name": str, "description": str},
    "registered-models/delete": {"name": str},
    "model-versions/create": {"name": str, "description": str, "tags": list, "run_id": str},
    "model-versions/update": {"name": str, "version": str, "description": str},
}

WRITES: dict[str, Write] = {
    "registered-models/create": model_writes.create_registered_model,
    "registered-models/update": model_writes.update_registered_model,
    "registered-models/delete": model_writes.delete_registered_model,
    "model-versions/create": version_writes.create_model_version,
    "model-versions/update": version_writes.update_model_version,
}
