"""`verify --require applied|verified`: a CI gate that fails (exit 1) where bare `verify`
passes because nothing was applied, or where checks hold but no run recorded the milestone
verified."""

from __future__ import annotations

from helpers import toolkit, toolkit_json

from toolkit.errors import ExitCode


def test_nothing_applied_passes_bare_verify_but_fails_a_requirement(realistic_db):
    db = realistic_db
    assert toolkit(db, "verify").exit_code == 0  # nothing to check: bare verify passes
    code, doc = toolkit_json(db, "verify", "--require", "applied")
    assert code == ExitCode.VERIFY_FAILED
    error = doc["error"]
    assert "milestone-1 is applied (--require applied): not started" in error["problem"]
    assert error["next_step"].startswith("`toolkit migrate milestone-1`")
    listed = {m["milestone"]: m for m in error["details"]["result"]["milestones"]}
    assert set(listed) == {"milestone-1", "milestone-2", "milestone-3", "milestone-4"}
    assert all(not m["ok"] for m in listed.values())
    text = toolkit(db, "verify", "milestone-1", "--require", "verified")
    assert text.exit_code == ExitCode.VERIFY_FAILED
    assert "[FAIL] milestone-1 is verified (--require verified): not started" in text.output


def test_applied_with_checks_holding_is_not_verified_until_a_run_records_it(realistic_db):
    db = realistic_db
    assert toolkit(db, "migrate", "milestone-1").exit_code == 0
    assert toolkit(db, "verify", "milestone-1", "--require", "verified").exit_code == 0
    # every milestone must be, without MILESTONE: milestone 2 was never started
    assert toolkit(db, "verify", "--require", "applied").exit_code == ExitCode.VERIFY_FAILED
    # a change verify catches leaves the milestone applied; once accepted, its checks hold,
    # but it is still not recorded verified
    db.execute("UPDATE packages_packages SET version = 'x' WHERE id = (SELECT min(id) FROM packages_packages "
               "WHERE id NOT IN (SELECT package_id FROM ml_candidates WHERE package_id IS NOT NULL))")
    assert toolkit(db, "migrate", "milestone-1").exit_code == ExitCode.VERIFY_FAILED
    assert toolkit(db, "fingerprint", "--baseline", "milestone-1").exit_code == 0
    assert toolkit(db, "verify", "milestone-1", "--require", "applied").exit_code == 0
    code, doc = toolkit_json(db, "verify", "milestone-1", "--require", "verified")
    assert code == ExitCode.VERIFY_FAILED
    assert "recorded applied" in doc["error"]["problem"]
    assert "`toolkit migrate milestone-1`" in doc["error"]["next_step"]
    # status says so too, and what records it verified
    said = toolkit(db, "status").output
    assert "milestone-1 is applied but not recorded verified" in said
    assert "`toolkit migrate milestone-1` verifies it again and records it verified" in said
    # the Next it gives works
    assert toolkit(db, "migrate", "milestone-1").exit_code == 0
    assert toolkit(db, "verify", "milestone-1", "--require", "verified").exit_code == 0
