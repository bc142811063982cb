"""Fingerprints: what they see, what they ignore, and the full 1->4->1 round trip."""

from __future__ import annotations

import json

from helpers import TALLY, resolve_m1_anomalies, toolkit, toolkit_json

from toolkit.errors import ExitCode
from toolkit.schema.gitlab import ML_TABLE_NAMES

MLFLOW_PARTS = {"experiments", "experiment_tags", "runs", "run_params", "run_metrics_latest",
                "run_metrics_history", "run_tags", "run_artifact_uris", "registered_models",
                "registered_model_tags", "model_versions", "model_version_tags"}
MILESTONES = ("milestone-1", "milestone-2", "milestone-3", "milestone-4")


def test_out_writes_every_table_and_the_mlflow_view_and_compare_finds_equal(realistic_db, tmp_path):
    path = tmp_path / "before.json"
    result = toolkit(realistic_db, "fingerprint", "--out", str(path))
    assert result.exit_code == 0, result.output
    doc = json.loads(path.read_text())
    assert set(doc["tables"]) == set(ML_TABLE_NAMES)
    assert set(doc["mlflow"]) == MLFLOW_PARTS
    assert doc["source"] == "experiments"
    assert doc["mlflow"]["runs"]["rows"] == realistic_db.scalar("SELECT count(*) FROM ml_candidates")
    assert doc["mlflow"]["run_metrics_history"]["rows"] == \
        realistic_db.scalar("SELECT count(*) FROM ml_candidate_metrics")
    assert doc["mlflow"]["run_metrics_latest"]["rows"] == realistic_db.scalar(
        "SELECT count(*) FROM (SELECT DISTINCT candidate_id, name FROM ml_candidate_metrics) s")
    compared = toolkit(realistic_db, "fingerprint", "--compare", str(path))
    assert compared.exit_code == 0 and "Equal to" in compared.output


def test_rows_added_after_do_not_count_but_a_changed_value_does(realistic_db, tmp_path):
    path = tmp_path / "before.json"
    assert toolkit(realistic_db, "fingerprint", "--out", str(path)).exit_code == 0
    # the application logs a new metric: not a difference
    realistic_db.execute("""
        INSERT INTO ml_candidate_metrics (created_at, updated_at, candidate_id, name, value, step, project_id)
        SELECT now(), now(), id, 'loss', 0.5, 99, project_id FROM ml_candidates ORDER BY id LIMIT 1""")
    assert toolkit(realistic_db, "fingerprint", "--compare", str(path)).exit_code == 0
    # one old metric value changes: the history, its table and exit 1
    realistic_db.execute("UPDATE ml_candidate_metrics SET value = value + 1 "
                         "WHERE id = (SELECT min(id) FROM ml_candidate_metrics)")
    code, doc = toolkit_json(realistic_db, "fingerprint", "--compare", str(path))
    assert code == ExitCode.VERIFY_FAILED
    differing = {d.split(":")[0] for d in doc["error"]["details"]["result"]["differences"]}
    assert {"tables.ml_candidate_metrics", "mlflow.run_metrics_history"} <= differing
    assert "mlflow.runs" not in differing


def test_a_broken_file_is_a_usage_error(realistic_db, tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"format": 99}')
    result = toolkit(realistic_db, "fingerprint", "--compare", str(path))
    assert result.exit_code == ExitCode.USAGE and "not a toolkit fingerprint" in result.output


def test_verify_catches_a_change_to_rows_the_milestone_may_not_change(realistic_db, tmp_path):
    before = tmp_path / "before.json"
    assert toolkit(realistic_db, "fingerprint", "--out", str(before)).exit_code == 0
    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0
    code, doc = toolkit_json(realistic_db, "verify", "milestone-1")
    checks = {c["name"]: c for c in doc["result"]["milestones"][0]["checks"]}
    assert code == 0
    assert checks["the MLflow view equals the fingerprint taken before milestone-1"]["ok"]
    assert "changed on purpose: packages_packages" in checks["every other ML table is unchanged"]["detail"]
    # something renames a package no candidate links to, in the table milestone 1 writes
    result = _rename_an_unlinked_package_and_verify(realistic_db)
    assert "toolkit fingerprint --baseline milestone-1" in result.output
    # the operator accepts it (the application did it), seeing first what it replaces, and
    # verify holds again
    code, doc = toolkit_json(realistic_db, "fingerprint", "--baseline", "milestone-1")
    assert code == 0
    kept = "tables.packages_packages (rows it may not change)"
    assert any(d.startswith(kept) for d in doc["result"]["replaced"]["differences"])
    assert toolkit(realistic_db, "verify", "milestone-1").exit_code == 0
    # in text too, as --compare says it; and once accepted, nothing differs any more
    _rename_an_unlinked_package_and_verify(realistic_db)
    text = toolkit(realistic_db, "fingerprint", "--baseline", "milestone-1").output
    assert f"  differs: {kept}: " in text and "part(s) differed from the one replaced" in text
    again = toolkit_json(realistic_db, "fingerprint", "--baseline", "milestone-1")[1]
    assert again["result"]["replaced"]["differences"] == []
    # A table milestone 1 never wrote is not read again by its verify (its runs' own counts
    # prove it untouched by them); what the application changes there, a whole fingerprint
    # taken before still shows.
    realistic_db.execute("UPDATE ml_candidate_params SET value = 'tampered' "
                         "WHERE id = (SELECT min(id) FROM ml_candidate_params)")
    compared = toolkit(realistic_db, "fingerprint", "--compare", str(before))
    assert compared.exit_code == ExitCode.VERIFY_FAILED and "mlflow.run_params" in compared.output


def test_a_candidate_moved_to_another_model_changes_the_mlflow_view(adversarial_db):
    resolve_m1_anomalies(adversarial_db)
    for milestone in MILESTONES[:3]:
        assert toolkit(adversarial_db, "migrate", milestone).exit_code == 0
    # move a run to another experiment's model, keeping experiment_id consistent so that
    # milestone 2's own check (model_id = its experiment's model) still holds
    adversarial_db.execute("""
        WITH target AS (SELECT id, model_id FROM ml_experiments ORDER BY id DESC LIMIT 1)
        UPDATE ml_candidates c SET experiment_id = t.id
        FROM target t WHERE c.id = (SELECT min(id) FROM ml_candidates WHERE experiment_id <> t.id)""")
    result = toolkit(adversarial_db, "verify", "milestone-3")
    assert result.exit_code == ExitCode.VERIFY_FAILED
    assert "mlflow.runs" in result.output


def test_rollback_without_a_baseline_refuses_rebaseline(realistic_db):
    result = toolkit(realistic_db, "fingerprint", "--baseline", "milestone-2")
    assert result.exit_code == ExitCode.REFUSED and "has not been started" in result.output


def test_milestones_1_to_4_then_rollbacks_4_to_1_give_back_the_original(adversarial_db, tmp_path):
    """The adversarial profile (after the operator resolves milestone 1's blocking anomalies,
    as the runbook says): every verify compares the MLflow view with the one before, and
    the whole round trip gives back the original fingerprint, tables and MLflow view."""
    resolve_m1_anomalies(adversarial_db)
    original = tmp_path / "original.json"
    assert toolkit(adversarial_db, "fingerprint", "--out", str(original)).exit_code == 0
    sources = []
    for milestone in MILESTONES:
        assert toolkit(adversarial_db, "migrate", milestone, "--yes", "--batch-size", "7").exit_code == 0
        code, doc = toolkit_json(adversarial_db, "fingerprint", "--compare", str(original), "--mlflow-only")
        assert code == 0, doc
        sources.append(doc["result"]["fingerprint"]["source"])
    assert sources == ["experiments", "experiments", "models", "models + archive"]
    code, doc = toolkit_json(adversarial_db, "verify")
    assert code == 0
    mlflow_checks = [c for m in doc["result"]["milestones"] for c in m["checks"]
                     if c["name"].startswith("the MLflow view")]
    assert len(mlflow_checks) == 4 and all(c["ok"] for c in mlflow_checks)
    for milestone in reversed(MILESTONES):
        code, doc = toolkit_json(adversarial_db, "rollback", milestone, "--batch-size", "7")
        assert code == 0, doc
        back = {c["name"]: c["ok"] for c in doc["result"]["checks"]}
        assert back[f"the MLflow view is back to the fingerprint taken before {milestone}"]
        assert back["every ML table is as it was"]
    final = toolkit(adversarial_db, "fingerprint", "--compare", str(original))
    assert final.exit_code == 0, final.output
    taken = json.loads(original.read_text())
    TALLY["rows compared, original against after 1->4->1 (tables and MLflow view)"] += sum(
        part["rows"] for group in ("tables", "mlflow") for part in taken[group].values() if part)
    assert adversarial_db.scalar("SELECT count(*) FROM toolkit.fingerprints") == 0


def test_a_baseline_of_format_1_is_still_compared_its_way(realistic_db):
    """A milestone in progress when the toolkit is upgraded keeps its stored baseline of
    format 1 (count, sum and XOR): verify computes the same digests its way, not the new."""
    from dataclasses import replace

    from toolkit.verify import baselines
    from toolkit.verify.differences import compare
    from toolkit.verify.fingerprint import take

    assert toolkit(realistic_db, "migrate", "milestone-1").exit_code == 0
    with realistic_db.engine.connect() as conn:
        stored = baselines.load(conn, "milestone-1")
        assert stored.format == 2
        # what an earlier toolkit stored: the same scope, hashed the old way
        old_way = replace(stored, format=1, tables={}, mlflow={}, kept={})
        older = take(conn, stored.watermarks, reference=old_way, scope=stored.scoped)
        assert older.format == 1 and older.kept  # milestone 1 reads no MLflow part
        assert older.kept != stored.kept  # the two methods give different digests
        assert [d.part for d in compare(older, stored)] == ["format"]
        baselines.save(conn, "milestone-1", older, stored.scoped.first_run)
    code, doc = toolkit_json(realistic_db, "verify", "milestone-1")
    assert code == 0, doc
    # and a change is still caught, the old way
    _rename_an_unlinked_package_and_verify(realistic_db)


def _rename_an_unlinked_package_and_verify(db):
    """Rename a package no candidate links to (one milestone 1 may not change): verify fails."""
    db.execute("""UPDATE packages_packages SET name = name || '-renamed' WHERE id = (
        SELECT min(id) FROM packages_packages p
        WHERE NOT EXISTS (SELECT 1 FROM ml_candidates c WHERE c.package_id = p.id))""")
    result = toolkit(db, "verify", "milestone-1")
    assert result.exit_code == ExitCode.VERIFY_FAILED
    assert "tables.packages_packages (rows it may not change)" in result.output
    return result
