"""The proof's declared differences and the final state, against GitLab's own rules.

- milestone 1 changes GitLab's ``artifact_uri`` of every run whose package it converts
  (``lib/api/entities/ml/mlflow/run_info.rb`` @de09f039): ``plan`` counts them, verify
  accepts exactly those (from the ledger) and names any other change, rollback gives every
  URI back;
- milestone 3 adds models and copied tags to the registry: verify accepts exactly those
  and names a change to an existing model; rollback gives the registry back;
- after ``toolkit archive drop`` a real ``toolkit mlflow serve`` answers experiments, runs,
  metric history and the registry as before, but experiment tags (the models' metadata).

The expected URIs are computed here with SQL written from GitLab's rule, not with the
toolkit's expression.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

import sqlalchemy as sa
from helpers import toolkit, toolkit_json
from mlflow_serving import serving

from toolkit.errors import ExitCode
from toolkit.mlflow_api.views import View

BASE = "https://gitlab.example.com"
URI_CHANGES = "runs whose MLflow artifact_uri changes (GitLab's rule; declared)"

# RunInfo#artifact_uri: generic package -> packages/generic + artifact_root
# ("/#{experiment.package_name}/#{candidate.iid}/", package_name = the default experiment's
# model name, else "ml_experiment_#{experiment.iid}"); else a model version ->
# packages/ml_models/<version id>/files/; else packages/ml_models/candidate:<iid>/files/.
GITLAB_RULE = """
SELECT c.id, CASE
  WHEN p.package_type = 7 THEN '/api/v4/projects/' || c.project_id || '/packages/generic/'
       || COALESCE(m.name, 'ml_experiment_' || e.iid) || '/' || COALESCE(c.internal_id::text, '') || '/'
  WHEN c.model_version_id IS NOT NULL THEN '/api/v4/projects/' || c.project_id || '/packages/ml_models/'
       || c.model_version_id || '/files/'
  ELSE '/api/v4/projects/' || c.project_id || '/packages/ml_models/candidate:'
       || COALESCE(c.internal_id::text, '') || '/files/' END AS uri
FROM ml_candidates c JOIN {experiments} e ON e.{experiment_key}
LEFT JOIN ml_models m ON m.id = e.model_id LEFT JOIN packages_packages p ON p.id = c.package_id"""
BEFORE_MILESTONE_4 = {"experiments": "ml_experiments", "experiment_key": "id = c.experiment_id"}
# after milestone 4 the candidate's model is its experiment's (the kept ids give the iid)
AFTER_MILESTONE_4 = {"experiments": "toolkit.mlflow_experiment_ids", "experiment_key": "model_id = c.model_id"}
CONVERTED_RUNS = """SELECT c.id FROM ml_candidates c JOIN toolkit.m1_converted_packages l
                    ON l.package_id = c.package_id ORDER BY c.id"""
REGISTRY = """SELECT m.id, m.project_id, m.name, m.description, m.user_id, m.created_at, m.updated_at
              FROM ml_models m ORDER BY m.id"""
MODEL_TAGS = "SELECT id, model_id, name, value FROM ml_model_metadata ORDER BY id"


def uris(db, stage: dict[str, str] = BEFORE_MILESTONE_4) -> dict[int, str]:
    return dict(db.rows(GITLAB_RULE.format(**stage)))


def _checks(doc: dict) -> dict[str, dict]:
    result = doc["result"] if "result" in doc else doc["error"]["details"]["result"]
    return {c["name"]: c for m in result["milestones"] for c in m["checks"]}


MLFLOW_CHECK = "the MLflow view equals the fingerprint taken before {}"


def served_uris(db, runs: list[int]) -> dict[int, str]:
    """What `toolkit mlflow serve` answers as each run's artifact_uri (its views, one
    READ ONLY transaction), without the external URL."""
    with db.engine.connect() as conn:
        found = {}
        for run in runs:
            project, eid = conn.execute(sa.text("SELECT project_id, eid FROM ml_candidates WHERE id = :r"),
                                        {"r": run}).one()
            answer = View(conn, str(project), BASE).get_run({"run_id": str(eid)})
            found[run] = answer["run"]["info"]["artifact_uri"].removeprefix(BASE)
        return found


def test_milestone_1_changes_artifact_uri_as_declared_and_nothing_else(realistic_db):
    db = realistic_db
    before = uris(db)
    sample = sorted(before)[::10]
    assert served_uris(db, sample) == {i: before[i] for i in sample}  # the server answers GitLab's rule
    code, planned = toolkit_json(db, "plan", "milestone-1")
    assert code == 0, planned
    step = planned["result"]["milestones"][0]["steps"][0]
    counted = step["context"][URI_CHANGES]
    assert any(URI_CHANGES in sql for sql in step["sql"])  # and the SQL that counts them
    assert toolkit(db, "migrate", "milestone-1").exit_code == 0
    after = uris(db)
    changed = sorted(i for i in before if before[i] != after[i])
    assert counted == len(changed) > 0
    assert changed == [r[0] for r in db.rows(CONVERTED_RUNS)]  # exactly the runs it converted
    assert all("/packages/generic/" in before[i] and "/packages/ml_models/" in after[i] for i in changed)
    assert served_uris(db, changed) == {i: after[i] for i in changed}

    code, doc = toolkit_json(db, "verify", "milestone-1")
    assert code == 0, doc
    detail = _checks(doc)[MLFLOW_CHECK.format("milestone-1")]["detail"]
    assert f"{len(changed)} runs whose artifact_uri milestone-1 changed" in detail

    # something else gives an unconverted run a generic package: its URI changes, undeclared
    run = db.scalar("SELECT min(id) FROM ml_candidates WHERE package_id IS NULL AND model_version_id IS NULL")
    assert run is not None
    db.execute("""INSERT INTO packages_packages (project_id, name, version, package_type, status, created_at,
                                                 updated_at)
                  SELECT project_id, 'someone-else', '1', 7, 0, now(), now() FROM ml_candidates WHERE id = :r""",
               r=run)
    db.execute("UPDATE ml_candidates SET package_id = (SELECT max(id) FROM packages_packages) WHERE id = :r", r=run)
    assert uris(db)[run] != after[run]
    code, doc = toolkit_json(db, "verify", "milestone-1")
    assert code == ExitCode.VERIFY_FAILED
    failed = _checks(doc)[MLFLOW_CHECK.format("milestone-1")]
    assert not failed["ok"]
    assert "mlflow.run_artifact_uris (GitLab's artifact_uri of runs differs beyond" in failed["detail"]
    assert f"differs at candidate id {run}" in failed["detail"]  # named
    assert "mlflow.runs:" not in failed["detail"]  # every other field of the runs: not read, not changed

    db.execute("UPDATE ml_candidates SET package_id = NULL WHERE id = :r", r=run)
    assert toolkit(db, "verify", "milestone-1").exit_code == 0

    # a converted package renamed behind the milestone's back (its URI does not name the
    # package, its row does): named too, and accepted again once it is given back
    converted = changed[0]
    package = db.scalar("SELECT package_id FROM ml_candidates WHERE id = :r", r=converted)
    db.execute("UPDATE packages_packages SET name = name || '-renamed' WHERE id = :p", p=package)
    code, doc = toolkit_json(db, "verify", "milestone-1")
    assert code == ExitCode.VERIFY_FAILED
    assert f"differs at candidate id {converted}" in _checks(doc)[MLFLOW_CHECK.format("milestone-1")]["detail"]
    db.execute("UPDATE packages_packages SET name = left(name, -8) WHERE id = :p", p=package)
    assert toolkit(db, "verify", "milestone-1").exit_code == 0
    code, doc = toolkit_json(db, "rollback", "milestone-1")
    assert code == 0, doc
    assert {c["name"]: c["ok"] for c in doc["result"]["checks"]}[
        "the MLflow view is back to the fingerprint taken before milestone-1"]
    assert uris(db) == before  # every URI given back exactly


def test_milestone_3_adds_exactly_its_models_and_tags_to_the_registry(realistic_db, tmp_path):
    db = realistic_db
    models, tags = db.rows(REGISTRY), db.rows(MODEL_TAGS)
    original = tmp_path / "original.json"
    assert toolkit(db, "fingerprint", "--out", str(original)).exit_code == 0
    for milestone in ("milestone-1", "milestone-2", "milestone-3"):
        assert toolkit(db, "migrate", milestone).exit_code == 0, milestone
    created = {r[0] for r in db.rows("SELECT model_id FROM toolkit.m3_created_models")}
    copied = {r[0] for r in db.rows("SELECT model_metadata_id FROM toolkit.m3_copied_metadata")}
    assert created and copied
    # independently: what a registry user sees now is before + the ledgers, nothing else
    now_models = db.rows(REGISTRY)
    assert [m for m in now_models if m.id not in created] == models
    assert [t for t in db.rows(MODEL_TAGS) if t.id not in copied] == tags
    assert {t.model_id for t in db.rows(MODEL_TAGS) if t.model_id in created} <= created

    code, doc = toolkit_json(db, "verify", "milestone-3")
    assert code == 0, doc
    checks = _checks(doc)
    assert checks["the registry gained exactly the created models and the copied tags"]["ok"]
    assert f"{len(created)} models milestone-3 created" in checks[MLFLOW_CHECK.format("milestone-3")]["detail"]

    # something else changes an existing model, then an existing model's tag: each is named
    existing = models[0].id
    db.execute("UPDATE ml_models SET description = 'changed by someone' WHERE id = :m", m=existing)
    code, doc = toolkit_json(db, "verify", "milestone-3")
    assert code == ExitCode.VERIFY_FAILED
    detail = _checks(doc)[MLFLOW_CHECK.format("milestone-3")]["detail"]
    assert "mlflow.registered_models (get_registered_model shows an existing model changed" in detail
    assert f"differs at model id {existing}" in detail
    db.execute("UPDATE ml_models SET description = :d WHERE id = :m", d=models[0].description, m=existing)
    tag = tags[0]
    db.execute("UPDATE ml_model_metadata SET value = 'changed' WHERE id = :t", t=tag.id)
    code, doc = toolkit_json(db, "verify", "milestone-3")
    assert code == ExitCode.VERIFY_FAILED
    detail = _checks(doc)[MLFLOW_CHECK.format("milestone-3")]["detail"]
    assert "mlflow.registered_model_tags (an existing model's tags changed" in detail
    assert f"differs at model id {tag.model_id}" in detail
    db.execute("UPDATE ml_model_metadata SET value = :v WHERE id = :t", v=tag.value, t=tag.id)
    assert toolkit(db, "verify", "milestone-3").exit_code == 0

    code, doc = toolkit_json(db, "rollback", "milestone-3")
    assert code == 0, doc
    assert db.rows(REGISTRY) == models and db.rows(MODEL_TAGS) == tags  # given back exactly
    code, doc = toolkit_json(db, "fingerprint", "--compare", str(original), "--mlflow-only")
    assert code == 0, doc
    assert doc["result"]["fingerprint"]["declared"] == {
        "runs whose artifact_uri milestone-1 changed": len(db.rows(CONVERTED_RUNS))}


# -- after the archive drop: a real `toolkit mlflow serve` -----------------------------------
def served(db):
    return serving(db)


def ask(server: str, project: int, endpoint: str, query: str) -> tuple[int, dict]:
    url = f"{server}/api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/{endpoint}?{query}"
    try:
        with urllib.request.urlopen(url, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def answers(server: str, db) -> dict:
    """What a script reads of one model-backed experiment: the experiment by iid and by name,
    a run, a metric history, the registered model, and the project's experiment search."""
    run = db.rows("""SELECT c.project_id, c.eid, m.name AS model, k.iid, k.name AS experiment,
                            (SELECT x.name FROM ml_candidate_metrics x WHERE x.candidate_id = c.id
                             ORDER BY x.id LIMIT 1) AS metric
                     FROM ml_candidates c JOIN ml_models m ON m.id = c.model_id
                     JOIN toolkit.mlflow_experiment_ids k ON k.model_id = m.id
                     WHERE EXISTS (SELECT 1 FROM ml_candidate_metrics x WHERE x.candidate_id = c.id)
                       AND EXISTS (SELECT 1 FROM ml_model_metadata mm WHERE mm.model_id = m.id)
                     ORDER BY c.id LIMIT 1""")[0]
    p = run.project_id
    found = {
        "experiment": ask(server, p, "experiments/get", f"experiment_id={run.iid}"),
        "by_name": ask(server, p, "experiments/get-by-name",
                       urllib.parse.urlencode({"experiment_name": run.experiment})),
        "run": ask(server, p, "runs/get", f"run_id={run.eid}"),
        "history": ask(server, p, "metrics/get-history",
                       urllib.parse.urlencode({"run_id": str(run.eid), "metric_key": run.metric})),
        "model": ask(server, p, "registered-models/get", urllib.parse.urlencode({"name": run.model})),
        "search": ask(server, p, "experiments/search", "max_results=1000"),
    }
    assert all(code == 200 for code, _ in found.values()), found
    return {"project": p, "eid": str(run.eid), **{k: v for k, (_, v) in found.items()}}


def _without_experiment_tags(answer: dict) -> dict:
    def strip(e: dict) -> dict:
        return {k: v for k, v in e.items() if k != "tags"}
    return {**answer, "experiment": strip(answer["experiment"]["experiment"]),
            "by_name": strip(answer["by_name"]["experiment"]),
            "search": [strip(e) for e in answer["search"]["experiments"]]}


def test_after_the_archive_drop_serve_answers_as_before_but_experiment_tags(realistic_db):
    db = realistic_db
    for milestone in ("milestone-1", "milestone-2", "milestone-3", "milestone-4"):
        assert toolkit(db, "migrate", milestone, "--yes").exit_code == 0, milestone
    with served(db) as server:
        before = answers(server, db)
        # as a toolkit before revision 0008 leaves milestone 4: no ids kept; the drop keeps
        # them from the archive first
        kept = db.rows("SELECT * FROM toolkit.mlflow_experiment_ids ORDER BY id")
        assert kept
        db.execute("DELETE FROM toolkit.mlflow_experiment_ids")
        assert toolkit(db, "archive", "drop", "--yes").exit_code == 0
        assert db.scalar("SELECT to_regclass('toolkit.m4_archive_ml_experiments') IS NULL")
        assert db.rows("SELECT * FROM toolkit.mlflow_experiment_ids ORDER BY id") == kept
        after = answers(server, db)
    assert _without_experiment_tags(after) == _without_experiment_tags(before)
    assert after["model"] == before["model"]  # the registry is untouched by the drop
    # the documented change: an experiment's tags are now its model's metadata
    iid = int(after["experiment"]["experiment"]["experiment_id"])
    expected = [{"key": r.name, "value": r.value} for r in db.rows("""
        SELECT mm.name, mm.value FROM toolkit.mlflow_experiment_ids k
        JOIN ml_model_metadata mm ON mm.model_id = k.model_id
        WHERE k.project_id = :p AND k.iid = :i ORDER BY mm.id""", p=after["project"], i=iid)]  # GitLab: by id
    assert after["experiment"]["experiment"]["tags"] == expected
    # artifact_uri by GitLab's rule in the final state: the model stands for its experiment
    gitlab = uris(db, AFTER_MILESTONE_4)
    run_id = db.scalar("SELECT id FROM ml_candidates WHERE eid = CAST(:e AS uuid)", e=after["eid"])
    assert after["run"]["run"]["info"]["artifact_uri"] == f"{server}{gitlab[run_id]}"
    # a server started after the drop answers the same
    with served(db) as fresh:
        rebased = json.loads(json.dumps(after).replace(server, fresh))  # URIs name the server
        assert answers(fresh, db) == rebased
    # every milestone still verifies; the mapping is shown from the kept table
    code, doc = toolkit_json(db, "verify")
    assert code == 0, doc
    status = toolkit(db, "archive", "status")
    assert status.exit_code == 0 and "toolkit.mlflow_experiment_ids" in status.output
