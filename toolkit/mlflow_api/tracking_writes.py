"""GitLab's MLflow tracking writes: experiments create / set-experiment-tag / delete, runs
create / update / delete / log-metric / log-parameter / set-tag / log-batch.

Each function is GitLab's endpoint (``lib/api/ml/mlflow/experiments.rb``, ``runs.rb``) and
what it calls (``Ml::ExperimentTracking::ExperimentRepository``, ``CandidateRepository``,
``Ml::CreateCandidateService``, ``Ml::Destroy*Service``, the models' validations), written
as SQL in the write's transaction (:mod:`toolkit.mlflow_api.writing`); docs/mlflow.md,
"Writes", names each file and commit. Answers are GitLab's, status 200 (GitLab sets 200
for every MLflow call: the client takes 201 as an error):

- Grape's parameter errors, 400 ``{"error": "key is missing, value is invalid"}``;
- a model validation failing (``create!``), GitLab's ``rescue_from
  ActiveRecord::ActiveRecordError``: 400 ``INVALID_PARAMETER_VALUE`` with Rails' message,
  e.g. ``Validation failed: Name has already been taken`` for a param logged twice;
- ``experiments/create`` with a taken name: 400 ``RESOURCE_ALREADY_EXISTS``;
- a run or experiment the project does not have: 404 ``RESOURCE_DOES_NOT_EXIST``.

The endpoints are :mod:`toolkit.mlflow_api.experiment_writes` and
:mod:`toolkit.mlflow_api.run_writes`; their parameters are read and their rows checked by
:mod:`toolkit.mlflow_api.declared`, the lookups and the recording they share are
:mod:`toolkit.mlflow_api.tracking_rows`. Where the experiment is and what creating one
makes depends on the blueprint's stage: :mod:`toolkit.mlflow_api.stages` and
:mod:`toolkit.mlflow_api.stage_experiments`. iids come from GitLab's ``internal_ids``
(:mod:`toolkit.mlflow_api.internal_ids`). Every row written is recorded
(:func:`stages.record_write`). This module is the table of the endpoints.
"""

from __future__ import annotations

from toolkit.mlflow_api import experiment_writes, run_writes
from toolkit.mlflow_api.writing import WriteFunction

WRITES: dict[str, WriteFunction] = {
    "experiments/create": experiment_writes.create_experiment,
    "experiments/set-experiment-tag": experiment_writes.set_experiment_tag,
    "experiments/delete": experiment_writes.delete_experiment,
    "runs/create": run_writes.create_run,
    "runs/update": run_writes.update_run,
    "runs/delete": run_writes.delete_run,
    "runs/log-metric": run_writes.log_metric,
    "runs/log-parameter": run_writes.log_parameter,
    "runs/set-tag": run_writes.set_tag,
    "runs/log-batch": run_writes.log_batch,
}
