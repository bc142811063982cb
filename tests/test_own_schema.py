"""The toolkit's own tables: created by Alembic in schema `toolkit`, version table included."""

from __future__ import annotations

from toolkit.schema import migrations
from toolkit.schema.gitlab import ML_TABLE_NAMES
from toolkit.verify.digest import digests


def test_own_tables_live_in_their_own_schema_and_leave_gitlab_alone(realistic_db):
    with realistic_db.engine.connect() as conn:
        before = digests(conn, ML_TABLE_NAMES)
        assert migrations.applied_revisions(conn) == set()
        migrations.ensure_own_tables(conn)
        assert migrations.own_tables_current(conn)
        migrations.ensure_own_tables(conn)  # idempotent
        after = digests(conn, ML_TABLE_NAMES)
    assert before == after
    tables = {tuple(r) for r in realistic_db.rows(
        "SELECT schemaname, tablename FROM pg_tables WHERE schemaname IN ('toolkit', 'public') "
        "AND tablename IN ('alembic_version', 'runs', 'checkpoints', 'milestones')")}
    assert tables == {("toolkit", "alembic_version"), ("toolkit", "runs"), ("toolkit", "checkpoints"),
                      ("toolkit", "milestones")}


def test_downgrade_removes_the_own_tables(legacy_db):
    with legacy_db.engine.connect() as conn:
        migrations.ensure_own_tables(conn)
        migrations.downgrade(conn, "toolkit@base")
        assert migrations.applied_revisions(conn) == set()
    assert legacy_db.scalar("SELECT count(*) FROM pg_tables WHERE schemaname = 'toolkit' "
                            "AND tablename <> 'alembic_version'") == 0
