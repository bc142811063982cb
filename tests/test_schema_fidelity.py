"""The sandbox's GitLab tables are exactly the spec's: columns, CHECKs, indexes, FKs, triggers."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from spec_schema import parse_spec

from toolkit.schema.gitlab import ML_TABLE_NAMES

SPEC = parse_spec()
ON_DELETE = {"c": "CASCADE", "n": "SET NULL", "a": "NO ACTION", "r": "RESTRICT", "d": "SET DEFAULT"}


def test_the_spec_parse_covers_all_twelve_tables():
    assert sorted(SPEC) == sorted(ML_TABLE_NAMES)
    assert sum(len(t.indexes) for t in SPEC.values()) == 74
    assert all(t.columns for t in SPEC.values())


@pytest.fixture(scope="module")
def catalog(pg_server, templates):
    """Everything pg_catalog says about the legacy template's ML tables."""
    from toolkit.db import create_engine

    engine = create_engine(pg_server.url(templates.get("legacy")))
    with engine.connect() as conn:
        q = lambda sql: list(conn.execute(sa.text(sql), {"names": list(ML_TABLE_NAMES)}))  # noqa: E731
        data = {
            "schema": conn.execute(sa.text("SELECT current_schema()")).scalar_one(),
            "columns": q("""
                SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                       pg_get_expr(d.adbin, d.adrelid), a.attnum
                FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
                WHERE c.relname = ANY(:names) AND a.attnum > 0 AND NOT a.attisdropped
                ORDER BY c.relname, a.attnum"""),
            "constraints": q("""
                SELECT c.relname, k.contype, pg_get_constraintdef(k.oid), k.convalidated,
                       k.confdeltype, f.relname
                FROM pg_constraint k JOIN pg_class c ON c.oid = k.conrelid
                LEFT JOIN pg_class f ON f.oid = k.confrelid
                WHERE c.relname = ANY(:names) AND k.contype IN ('c', 'f', 'p', 'u')"""),
            "indexes": q("""
                SELECT tablename, indexname, indexdef FROM pg_indexes
                WHERE tablename = ANY(:names) AND indexname NOT LIKE '%\\_pkey'"""),
            "triggers": q("""
                SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid)
                FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                WHERE c.relname = ANY(:names) AND NOT t.tgisinternal"""),
        }
    engine.dispose()
    return data


@pytest.mark.parametrize("table", ML_TABLE_NAMES)
def test_columns_types_nullability_and_defaults(catalog, table):
    actual = [(r[1], r[2], r[3], r[4]) for r in catalog["columns"] if r[0] == table]
    expected = []
    for name, type_, not_null, default in SPEC[table].columns:
        if name == "id":
            default = f"nextval('{table}_id_seq'::regclass)"
        expected.append((name, type_, not_null, default))
    assert actual == expected


@pytest.mark.parametrize("table", ML_TABLE_NAMES)
def test_check_constraints(catalog, table):
    actual = sorted(
        (r[2].removeprefix("CHECK ").removesuffix(" NOT VALID"), r[3])
        for r in catalog["constraints"] if r[0] == table and r[1] == "c"
    )
    expected = [(f"({check})", True) for check in SPEC[table].checks]
    if table == "packages_packages":  # stated in the spec's prose: added NOT VALID
        expected.append(("((char_length(status_message) <= 255))", False))
    assert actual == sorted(expected)


@pytest.mark.parametrize("table", ML_TABLE_NAMES)
def test_foreign_keys_and_on_delete(catalog, table):
    actual = sorted(
        (r[2].split("(")[1].split(")")[0], r[5], ON_DELETE[r[4]])
        for r in catalog["constraints"] if r[0] == table and r[1] == "f"
    )
    expected = sorted((col, target, action) for col, target, _, action in SPEC[table].foreign_keys)
    assert actual == expected
    primary = next(r for r in catalog["constraints"] if r[0] == table and r[1] == "p")
    assert primary[2] == "PRIMARY KEY (id)"


@pytest.mark.parametrize("table", ML_TABLE_NAMES)
def test_indexes_exact_definitions(catalog, table):
    actual = {r[1]: r[2].removeprefix("CREATE ") for r in catalog["indexes"] if r[0] == table}
    expected = {
        name: definition.format(schema=catalog["schema"])
        for name, definition in SPEC[table].indexes.items()
    }
    assert actual == expected


@pytest.mark.parametrize("table", ML_TABLE_NAMES)
def test_triggers(catalog, table):
    actual = sorted((r[1], r[2]) for r in catalog["triggers"] if r[0] == table)
    expected = sorted(
        (name, f"CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {catalog['schema']}.{table} "
               f"FOR EACH ROW EXECUTE FUNCTION {name}()")
        for name, description in SPEC[table].triggers
    )
    assert actual == expected
    for _, description in SPEC[table].triggers:
        assert description.startswith("BEFORE INSERT OR UPDATE")


def test_triggers_fill_project_id_from_the_parent(legacy_db):
    legacy_db.execute("""
        INSERT INTO projects (id, name) VALUES (41, 'a'), (42, 'b');
        INSERT INTO ml_experiments (id, created_at, updated_at, iid, project_id, name)
            VALUES (1, now(), now(), 1, 42, 'e');
        INSERT INTO ml_candidates (id, created_at, updated_at, experiment_id, eid, project_id)
            VALUES (1, now(), now(), 1, gen_random_uuid(), 42);
        INSERT INTO ml_models (id, created_at, updated_at, project_id, name)
            VALUES (1, now(), now(), 42, 'm');
        INSERT INTO packages_packages (id, project_id, created_at, updated_at, name, package_type)
            VALUES (1, 42, now(), now(), 'p', 7);
        INSERT INTO ml_experiment_metadata (created_at, updated_at, experiment_id, name, value)
            VALUES (now(), now(), 1, 'k', 'v');
        INSERT INTO ml_candidate_metadata (created_at, updated_at, candidate_id, name, value)
            VALUES (now(), now(), 1, 'k', 'v');
        INSERT INTO ml_candidate_params (created_at, updated_at, candidate_id, name, value)
            VALUES (now(), now(), 1, 'k', 'v');
        INSERT INTO ml_candidate_metrics (created_at, updated_at, candidate_id, name, value)
            VALUES (now(), now(), 1, 'k', 1.0);
        INSERT INTO ml_model_metadata (created_at, updated_at, model_id, name, value)
            VALUES (now(), now(), 1, 'k', 'v');
        INSERT INTO packages_package_files (package_id, created_at, updated_at, file_name, file)
            VALUES (1, now(), now(), 'f', 'f');
        -- an explicit project_id is kept
        INSERT INTO ml_candidate_params (created_at, updated_at, candidate_id, name, value, project_id)
            VALUES (now(), now(), 1, 'k2', 'v', 41);
    """)
    for table in ("ml_experiment_metadata", "ml_candidate_metadata", "ml_candidate_params",
                  "ml_candidate_metrics", "ml_model_metadata", "packages_package_files"):
        assert legacy_db.scalar(f"SELECT array_agg(DISTINCT project_id) FROM {table} "
                                "WHERE name IS DISTINCT FROM 'k2'" if table == "ml_candidate_params"
                                else f"SELECT array_agg(DISTINCT project_id) FROM {table}") == [42]
    assert legacy_db.scalar("SELECT project_id FROM ml_candidate_params WHERE name = 'k2'") == 41


def test_check_constraints_are_enforced(legacy_db):
    legacy_db.execute("INSERT INTO projects (id, name) VALUES (1, 'p')")
    with pytest.raises(sa.exc.IntegrityError, match="check"):
        legacy_db.execute("INSERT INTO ml_experiments (created_at, updated_at, iid, project_id, name) "
                          "VALUES (now(), now(), 1, 1, repeat('x', 256))")
    with pytest.raises(sa.exc.IntegrityError, match="check"):
        # no trigger on ml_candidates: a NULL project_id is refused, as in GitLab
        legacy_db.execute("INSERT INTO ml_experiments (id, created_at, updated_at, iid, project_id, name) "
                          "VALUES (5, now(), now(), 1, 1, 'e');"
                          "INSERT INTO ml_candidates (created_at, updated_at, experiment_id, eid) "
                          "VALUES (now(), now(), 5, gen_random_uuid())")


def test_sequences_are_owned_by_their_id_columns(catalog, legacy_db):
    owned = legacy_db.rows("""
        SELECT s.relname, t.relname FROM pg_depend d
        JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
        JOIN pg_class t ON t.oid = d.refobjid
        WHERE d.deptype = 'a' AND t.relname = ANY(:names)""", names=list(ML_TABLE_NAMES))
    assert sorted(owned) == sorted((f"{t}_id_seq", t) for t in ML_TABLE_NAMES)
