"""GitLab's ``project_id`` sharding-key triggers, the DDL SQLAlchemy Core cannot express.

Each child table's ``project_id`` is nullable in its column definition, carries a
validated ``CHECK (project_id IS NOT NULL)``, and is filled by a BEFORE INSERT OR UPDATE
trigger from its parent when an insert leaves it NULL (GitLab's ``insert_all`` paths rely
on that). The function bodies mirror the ones in GitLab's ``db/structure.sql``; function
and trigger share a name, as GitLab's do.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ProjectIdTrigger:
    name: str
    table: str
    parent: str
    via: str

    def create_function_sql(self) -> str:
        return (
            f"CREATE OR REPLACE FUNCTION {self.name}() RETURNS trigger\n"
            "    LANGUAGE plpgsql\n"
            "    AS $$\n"
            "BEGIN\n"
            'IF NEW."project_id" IS NULL THEN\n'
            '  SELECT "project_id"\n'
            '  INTO NEW."project_id"\n'
            f'  FROM "{self.parent}"\n'
            f'  WHERE "{self.parent}"."id" = NEW."{self.via}";\n'
            "END IF;\n\n"
            "RETURN NEW;\n\n"
            "END\n"
            "$$"
        )

    def create_trigger_sql(self) -> str:
        return (
            f"CREATE TRIGGER {self.name} BEFORE INSERT OR UPDATE ON {self.table} "
            f"FOR EACH ROW EXECUTE FUNCTION {self.name}()"
        )

    def drop_sql(self) -> list[str]:
        return [
            f"DROP TRIGGER IF EXISTS {self.name} ON {self.table}",
            f"DROP FUNCTION IF EXISTS {self.name}()",
        ]


PROJECT_ID_TRIGGERS: tuple[ProjectIdTrigger, ...] = (
    ProjectIdTrigger("trigger_2b8fdc9b4a4e", "ml_experiment_metadata", "ml_experiments", "experiment_id"),
    ProjectIdTrigger("trigger_25d35f02ab55", "ml_candidate_metadata", "ml_candidates", "candidate_id"),
    ProjectIdTrigger("trigger_f6c61cdddf31", "ml_model_metadata", "ml_models", "model_id"),
    ProjectIdTrigger("trigger_0f38e5af9adf", "ml_candidate_params", "ml_candidates", "candidate_id"),
    ProjectIdTrigger("trigger_979e7f45114f", "ml_candidate_metrics", "ml_candidates", "candidate_id"),
    ProjectIdTrigger("trigger_206cbe2dc1a2", "packages_package_files", "packages_packages", "package_id"),
)

TRIGGERS_BY_TABLE: dict[str, ProjectIdTrigger] = {t.table: t for t in PROJECT_ID_TRIGGERS}
