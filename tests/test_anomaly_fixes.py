"""An operator fixes milestone 1's blocking anomalies after the run that refused them, as
each anomaly's "what to do" says, and runs the milestone again: the rows the anomalies
named, changed exactly as told, are accepted and the milestone ends verified. The
acceptance is exact: a named row changed otherwise, or a row no anomaly names, still fails.
"""

from __future__ import annotations

from helpers import toolkit, toolkit_json

from toolkit.errors import ExitCode


def _blocking(db) -> dict[str, list[dict]]:
    code, doc = toolkit_json(db, "plan", "milestone-1")
    assert code == 0
    step = doc["result"]["milestones"][0]["steps"][0]
    return {a["kind"]: a["rows"] for a in step["anomalies"] if a["blocking"]}


def _refused_then_fixed_as_told(db) -> dict[str, list[dict]]:
    """The first run converts what it may and fails verify on the blocking anomalies; the
    operator then does what each anomaly's "what to do" says, through the rows the plan
    lists, touching updated_at as GitLab would."""
    first = toolkit(db, "migrate", "milestone-1")
    assert first.exit_code == ExitCode.VERIFY_FAILED, first.output
    blocking = _blocking(db)
    assert all(blocking[k] for k in ("cross_project_package", "ml_model_collision",
                                     "status_message_too_long"))
    for row in blocking["cross_project_package"]:  # unlink the package from its candidates
        db.execute("UPDATE ml_candidates SET package_id = NULL, updated_at = now() "
                   "WHERE id = ANY(:ids)", ids=row["candidate_ids"])
    for row in blocking["ml_model_collision"]:  # keep one: the existing ml_model twin goes
        db.execute("UPDATE packages_packages SET status = 4, updated_at = now() WHERE id = ANY(:ids)",
                   ids=row["ml_model_package_ids"])
    for row in blocking["status_message_too_long"]:  # shorten the message
        db.execute("UPDATE packages_packages SET status_message = left(status_message, 200), "
                   "updated_at = now() WHERE id = :id", id=row["package_id"])
    return blocking


def _state(db) -> str:
    return toolkit_json(db, "status")[1]["result"]["milestones"][0]["state"]


def test_anomalies_fixed_as_told_after_a_refusal_end_verified(adversarial_db):
    db = adversarial_db
    blocking = _refused_then_fixed_as_told(db)
    assert _blocking(db) == {k: [] for k in blocking}

    again = toolkit(db, "migrate", "milestone-1")
    assert again.exit_code == 0, again.output
    assert _state(db) == "verified"
    # verify says which named rows changed, and how
    code, doc = toolkit_json(db, "verify", "milestone-1")
    assert code == 0
    checks = {c["name"]: c for c in doc["result"]["milestones"][0]["checks"]}
    named = checks["rows its blocking anomalies named changed only as their fix says"]
    assert named["ok"] and "pending destruction" in named["detail"] and "no longer linked" in named["detail"]
    # GitLab then destroys the package marked pending destruction: that is the fix, too
    twin = blocking["ml_model_collision"][0]["ml_model_package_ids"][0]
    db.execute("DELETE FROM packages_packages WHERE id = :id", id=twin)
    code, doc = toolkit_json(db, "verify", "milestone-1")
    assert code == 0, doc
    checks = {c["name"]: c for c in doc["result"]["milestones"][0]["checks"]}
    assert f"package {twin} gone: GitLab destroys" in checks[named["name"]]["detail"]
    # and the round trip still holds: rollback gives back what the milestone converted
    back = toolkit(db, "rollback", "milestone-1")
    assert back.exit_code == 0, back.output


def test_a_named_row_changed_beyond_its_fix_still_fails(adversarial_db):
    db = adversarial_db
    blocking = _refused_then_fixed_as_told(db)
    twin = blocking["ml_model_collision"][0]["ml_model_package_ids"][0]
    db.execute("UPDATE packages_packages SET name = name || '_renamed' WHERE id = :id", id=twin)
    # and a candidate that was to be unlinked is linked to another project's package instead
    candidate = blocking["cross_project_package"][0]["candidate_ids"][0]
    db.execute("""UPDATE ml_candidates c SET package_id = (SELECT min(p.id) FROM packages_packages p
                  WHERE p.project_id <> c.project_id) WHERE c.id = :id""", id=candidate)
    code, doc = toolkit_json(db, "migrate", "milestone-1")
    assert code == ExitCode.VERIFY_FAILED
    problem = doc["error"]["problem"]
    assert f"package {twin} (ml_model_collision) changed beyond its fix: name" in problem
    assert f"candidate {candidate} (cross_project_package) changed beyond its fix: package_id" in problem
    assert "toolkit fingerprint --baseline milestone-1" in doc["error"]["next_step"]  # no loop
    assert not doc["error"]["next_step"].startswith("resolve each kind")
    assert _state(db) == "applied"


def test_a_row_no_anomaly_names_still_fails_and_next_leads_out(adversarial_db):
    db = adversarial_db
    _refused_then_fixed_as_told(db)
    unlinked = db.scalar("""SELECT min(id) FROM packages_packages p WHERE p.package_type = 7
        AND id NOT IN (SELECT package_id FROM ml_candidates WHERE package_id IS NOT NULL)""")
    db.execute("UPDATE packages_packages SET version = 'tampered' WHERE id = :id", id=unlinked)
    code, doc = toolkit_json(db, "migrate", "milestone-1")
    assert code == ExitCode.VERIFY_FAILED
    assert "rows it may not change" in doc["error"]["problem"]
    next_step = doc["error"]["next_step"]
    assert "toolkit fingerprint --baseline milestone-1" in next_step
    # the way out it names works, and says what records the milestone verified
    accepted = toolkit(db, "fingerprint", "--baseline", "milestone-1")
    assert accepted.exit_code == 0 and "toolkit migrate milestone-1" in accepted.output
    assert toolkit(db, "migrate", "milestone-1").exit_code == 0
    assert _state(db) == "verified"
