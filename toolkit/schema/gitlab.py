"""GitLab's experiment-tracking and model-registry tables, exactly as GitLab defines them.

Transcribed from ``gitlab-ml-schema.md`` (itself read from GitLab's ``db/structure.sql``):
column order, types, NOT NULLs, defaults, CHECKs (validated or NOT VALID), indexes
(partial and expression ones included), foreign keys with their ON DELETE, and the
``project_id`` triggers (in :mod:`toolkit.schema.triggers`). The toolkit reads these
definitions everywhere it needs a column; only the sandbox ever *creates* them, because
on a real GitLab database they are a given.

Constraint names that the spec gives are used verbatim. The others are GitLab-style
``check_<hash>``/``fk_<hash>`` names derived from the definition, so they are stable;
the toolkit itself never relies on a constraint name it did not create.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    SmallInteger,
    String,
    Table,
    Text,
    Uuid,
    text,
)

metadata = MetaData()

# Enum values from app/models/packages/package.rb
PACKAGE_TYPE_GENERIC = 7
PACKAGE_TYPE_ML_MODEL = 14
PACKAGE_TYPES = {
    "maven": 1, "npm": 2, "conan": 3, "nuget": 4, "pypi": 5, "composer": 6, "generic": 7,
    "golang": 8, "debian": 9, "rubygems": 10, "helm": 11, "terraform_module": 12, "rpm": 13,
    "ml_model": 14,
}
PACKAGE_STATUSES = {
    "default": 0, "hidden": 1, "processing": 2, "error": 3, "pending_destruction": 4,
    "deprecated": 5,
}
PACKAGE_STATUS_NAMES = {v: k for k, v in PACKAGE_STATUSES.items()}
PENDING_DESTRUCTION = PACKAGE_STATUSES["pending_destruction"]
CANDIDATE_STATUSES = {"running": 0, "scheduled": 1, "finished": 2, "failed": 3, "killed": 4}

ML_TABLE_NAMES = (
    "ml_experiments",
    "ml_experiment_metadata",
    "ml_candidates",
    "ml_candidate_params",
    "ml_candidate_metrics",
    "ml_candidate_metadata",
    "ml_models",
    "ml_model_metadata",
    "ml_model_versions",
    "ml_model_version_metadata",
    "packages_packages",
    "packages_package_files",
)


def _digest(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:10]


def _id(table: str) -> Column:
    seq = Sequence(f"{table}_id_seq", metadata=metadata)
    return Column("id", BigInteger, seq, server_default=seq.next_value(), primary_key=True)


def _ts(name: str) -> Column:
    return Column(name, DateTime(timezone=True), nullable=False)


def _check(table: str, sql: str, name: str | None = None) -> CheckConstraint:
    return CheckConstraint(text(sql), name=name or f"check_{_digest(table, sql)}")


def _fk(target: str, ondelete: str, table: str, column: str, name: str | None = None) -> ForeignKey:
    return ForeignKey(
        target, ondelete=ondelete, name=name or f"fk_{_digest(table, column, target)}"
    )


# Stubs for the tables GitLab's ML tables point at, the tables the MLflow API reads to
# find a project by its full path, and the identity tables ``toolkit mlflow serve`` checks
# tokens and access with (db/structure.sql at 0016ea05: the columns it reads, with GitLab's
# names and types). A real GitLab database has the full tables; the toolkit only reads
# them, and only the sandbox creates these stubs.
namespaces = Table(
    "namespaces", metadata,
    _id("namespaces"),
    Column("name", String, nullable=False),
    Column("path", String, nullable=False),
    Column("type", String, nullable=False, server_default=text("'User'::character varying")),
    Column("parent_id", BigInteger),
)
projects = Table(
    "projects", metadata,
    _id("projects"),
    Column("name", Text, nullable=False),
    Column("visibility_level", Integer, nullable=False, server_default=text("0")),  # 0/10/20
    Column("path", String),
    Column("namespace_id", BigInteger),  # NOT NULL in GitLab; the stub lets a test insert (id, name)
    Column("pending_delete", Boolean, server_default=text("false")),
    Column("hidden", Boolean, nullable=False, server_default=text("false")),
)
# routes: a project's or namespace's full path (Routable), the table find_by_full_path reads
routes = Table(
    "routes", metadata,
    _id("routes"),
    Column("source_id", BigInteger, nullable=False),
    Column("source_type", String, nullable=False),
    Column("path", String, nullable=False),
    Column("created_at", DateTime),
    Column("updated_at", DateTime),
    Column("name", String),
    Column("namespace_id", BigInteger),
    Index("index_routes_on_path", "path", unique=True),
    Index("index_routes_on_source_type_and_source_id", "source_type", "source_id", unique=True),
)
users = Table(
    "users", metadata,
    _id("users"),
    Column("username", Text, nullable=False),
    Column("state", String),  # active, blocked, deactivated, blocked_pending_approval, ...
    Column("admin", Boolean, nullable=False, server_default=text("false")),
)
personal_access_tokens = Table(
    "personal_access_tokens", metadata,
    _id("personal_access_tokens"),
    Column("user_id", BigInteger, nullable=False),
    Column("name", String, nullable=False),
    Column("revoked", Boolean, server_default=text("false")),
    Column("expires_at", Date),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("scopes", String, nullable=False, server_default=text("'--- []\n'::character varying")),
    Column("impersonation", Boolean, nullable=False, server_default=text("false")),
    Column("token_digest", String),
    Index("index_personal_access_tokens_on_token_digest", "token_digest", unique=True),
)
project_authorizations = Table(  # no id: one row per (user, project)
    "project_authorizations", metadata,
    Column("user_id", BigInteger, primary_key=True),
    Column("project_id", BigInteger, primary_key=True),
    Column("access_level", Integer, nullable=False),
    Column("is_unique", Boolean),
)
# internal_ids: the per-scope counters GitLab's AtomicInternalId allocates iids from
# (db/structure.sql at 0016ea05: table, indexes; usage 12 is ml_experiments, 13 ml_candidates;
# its foreign keys are written as GitLab's other project/namespace ones). The server
# allocates experiment iids and candidate internal_ids here, as GitLab does, so a live
# GitLab and the server never hand out the same one.
internal_ids = Table(
    "internal_ids", metadata,
    _id("internal_ids"),
    Column("project_id", BigInteger, _fk("projects.id", "CASCADE", "internal_ids", "project_id")),
    Column("usage", Integer, nullable=False),
    Column("last_value", Integer, nullable=False),
    Column("namespace_id", BigInteger, _fk("namespaces.id", "CASCADE", "internal_ids", "namespace_id")),
    Index("index_internal_ids_on_namespace_id", "namespace_id"),
    Index("index_internal_ids_on_project_id", "project_id"),
    Index("index_internal_ids_on_usage_and_project_id", "usage", "project_id", unique=True,
          postgresql_where=text("(project_id IS NOT NULL)")),
    Index("index_internal_ids_on_usage_and_namespace_id", "usage", "namespace_id", unique=True,
          postgresql_where=text("(namespace_id IS NOT NULL)")),
)
STUB_TABLE_NAMES = ("namespaces", "projects", "routes", "users", "personal_access_tokens",
                    "project_authorizations", "internal_ids")


def _project_fk(table: str) -> ForeignKey:
    return _fk("projects.id", "CASCADE", table, "project_id")


def _user_fk(table: str) -> ForeignKey:
    return _fk("users.id", "SET NULL", table, "user_id")


ml_models = Table(
    "ml_models", metadata,
    _id("ml_models"),
    _ts("created_at"),
    _ts("updated_at"),
    Column("project_id", BigInteger, _project_fk("ml_models"), nullable=False),
    Column("name", Text, nullable=False),
    Column("description", Text),
    Column("user_id", BigInteger, _user_fk("ml_models")),
    Column("cached_markdown_version", Integer),
    Column("description_html", Text),
    _check("ml_models", "char_length(name) <= 255"),
    _check("ml_models", "char_length(description_html) <= 50000"),
    _check("ml_models", "char_length(description) <= 10000", "check_f8df2fefc5"),
    Index("index_ml_models_on_project_id", "project_id"),
    Index("index_ml_models_on_project_id_and_name", "project_id", "name", unique=True),
    Index("index_ml_models_on_user_id", "user_id"),
)

ml_experiments = Table(
    "ml_experiments", metadata,
    _id("ml_experiments"),
    _ts("created_at"),
    _ts("updated_at"),
    Column("iid", BigInteger, nullable=False),
    Column("project_id", BigInteger, _project_fk("ml_experiments"), nullable=False),
    Column("user_id", BigInteger, _user_fk("ml_experiments")),
    Column("name", Text, nullable=False),
    Column("deleted_on", DateTime(timezone=True)),
    Column(
        "model_id", BigInteger,
        _fk("ml_models.id", "CASCADE", "ml_experiments", "model_id", "fk_rails_97194a054e"),
    ),
    _check("ml_experiments", "char_length(name) <= 255"),
    Index("index_ml_experiments_on_model_id", "model_id"),
    Index("index_ml_experiments_on_project_id_and_iid", "project_id", "iid", unique=True),
    Index("index_ml_experiments_on_project_id_and_name", "project_id", "name", unique=True),
    Index("index_ml_experiments_on_user_id", "user_id"),
)

ml_experiment_metadata = Table(
    "ml_experiment_metadata", metadata,
    _id("ml_experiment_metadata"),
    _ts("created_at"),
    _ts("updated_at"),
    Column(
        "experiment_id", BigInteger,
        _fk("ml_experiments.id", "CASCADE", "ml_experiment_metadata", "experiment_id"),
        nullable=False,
    ),
    Column("name", Text, nullable=False),
    Column("value", Text, nullable=False),
    Column("project_id", BigInteger, _project_fk("ml_experiment_metadata")),
    _check("ml_experiment_metadata", "char_length(name) <= 255"),
    _check("ml_experiment_metadata", "char_length(value) <= 5000"),
    _check("ml_experiment_metadata", "project_id IS NOT NULL"),
    Index(
        "index_ml_experiment_metadata_on_experiment_id_and_name",
        "experiment_id", "name", unique=True,
    ),
    Index("index_ml_experiment_metadata_on_project_id", "project_id"),
)

packages_packages = Table(
    "packages_packages", metadata,
    _id("packages_packages"),
    Column("project_id", BigInteger, _project_fk("packages_packages"), nullable=False),
    _ts("created_at"),
    _ts("updated_at"),
    Column("name", String, nullable=False),
    Column("version", String),
    Column("package_type", SmallInteger, nullable=False),
    Column("creator_id", BigInteger, _fk("users.id", "SET NULL", "packages_packages", "creator_id")),
    Column("status", SmallInteger, nullable=False, server_default=text("0")),
    Column("last_downloaded_at", DateTime(timezone=True)),
    Column("status_message", Text),
)


def _pkg_unique(name: str, package_type: int) -> Index:
    c = packages_packages.c
    return Index(
        name, c.project_id, c.name, c.version, unique=True,
        postgresql_where=text(f"((package_type = {package_type}) AND (status <> 4))"),
    )


_pp = packages_packages.c
_PACKAGES_PACKAGES_INDEXES = (  # an Index built from a table's columns attaches itself to it
    Index(
        "idx_installable_conan_pkgs_on_project_id_id", _pp.project_id, _pp.id,
        postgresql_where=text("((package_type = 3) AND (status = ANY (ARRAY[0, 1])))"),
    ),
    Index("idx_installable_helm_pkgs_on_project_id_id", _pp.project_id, _pp.id),
    Index(
        "idx_installable_npm_pkgs_on_project_id_name_version_id",
        _pp.project_id, _pp.name, _pp.version, _pp.id,
        postgresql_where=text("((package_type = 2) AND (status = 0))"),
    ),
    Index(
        "idx_packages_on_project_id_name_id_version_when_installable_npm",
        _pp.project_id, _pp.name, _pp.id, _pp.version,
        postgresql_where=text("((package_type = 2) AND (status = ANY (ARRAY[0, 1])))"),
    ),
    _pkg_unique("idx_packages_on_project_id_name_version_unique_when_generic", 7),
    _pkg_unique("idx_packages_on_project_id_name_version_unique_when_golang", 8),
    _pkg_unique("idx_packages_on_project_id_name_version_unique_when_helm", 11),
    _pkg_unique("idx_packages_on_project_id_name_version_unique_when_npm", 2),
    Index(
        "idx_packages_packages_on_npm_scope_and_project_id",
        text("split_part((name)::text, '/'::text, 1)"), _pp.project_id,
        postgresql_where=text(
            "((package_type = 2) AND (\"position\"((name)::text, '/'::text) > 0) "
            "AND (status = ANY (ARRAY[0, 3])) AND (version IS NOT NULL))"
        ),
    ),
    Index(
        "idx_packages_packages_on_project_id_name_version_package_type",
        _pp.project_id, _pp.name, _pp.version, _pp.package_type,
    ),
    Index(
        "idx_pkgs_on_project_id_name_version_on_installable_terraform",
        _pp.project_id, _pp.name, _pp.version, _pp.id,
        postgresql_where=text("((package_type = 12) AND (status = ANY (ARRAY[0, 1])))"),
    ),
    Index(
        "idx_pkgs_project_id_lower_name_when_nuget_installable_version",
        _pp.project_id, text("lower((name)::text)"),
        postgresql_where=text(
            "((package_type = 4) AND (version IS NOT NULL) AND (status = ANY (ARRAY[0, 1])))"
        ),
    ),
    Index(
        "index_packages_on_available_pypi_packages", _pp.project_id, _pp.id,
        postgresql_where=text(
            "((status = ANY (ARRAY[0, 1])) AND (package_type = 5) AND (version IS NOT NULL))"
        ),
    ),
    Index("index_packages_packages_on_creator_id", _pp.creator_id),
    Index("index_packages_packages_on_id_and_created_at", _pp.id, _pp.created_at),
    Index(
        "index_packages_packages_on_name_trigram", _pp.name,
        postgresql_using="gin", postgresql_ops={"name": "gin_trgm_ops"},
    ),
    Index("index_packages_packages_on_project_id_and_created_at", _pp.project_id, _pp.created_at),
    Index(
        "index_packages_packages_on_project_id_and_lower_version",
        _pp.project_id, text("lower((version)::text)"),
        postgresql_where=text("(package_type = 4)"),
    ),
    Index(
        "index_packages_packages_on_project_id_and_package_type", _pp.project_id, _pp.package_type
    ),
    Index(
        "index_packages_packages_on_project_id_and_status_and_id",
        _pp.project_id, _pp.status, _pp.id,
    ),
    Index("index_packages_packages_on_project_id_and_version", _pp.project_id, _pp.version),
    Index(
        "index_packages_project_id_name_partial_for_nuget", _pp.project_id, _pp.name,
        postgresql_where=text(
            "(((name)::text <> 'NuGet.Temporary.Package'::text) AND (version IS NOT NULL) "
            "AND (package_type = 4))"
        ),
    ),
    Index("package_name_index", _pp.name),
    Index(
        "tmp_idx_packages_on_project_id_when_mvn_not_pending_destruction", _pp.project_id,
        postgresql_where=text("((package_type = 1) AND (status <> 4))"),
    ),
    _pkg_unique("uniq_idx_packages_packages_on_project_id_name_version_ml_model", 14),
    _pkg_unique("unique_packages_project_id_and_name_and_version_when_debian", 9),
)

# GitLab adds this CHECK with NOT VALID (old rows were never checked); the sandbox does the
# same in toolkit.schema.triggers so that reflection shows convalidated = false.
PACKAGES_STATUS_MESSAGE_CHECK = (
    "check_d6301aedeb", "packages_packages", "char_length(status_message) <= 255"
)

packages_package_files = Table(
    "packages_package_files", metadata,
    _id("packages_package_files"),
    Column(
        "package_id", BigInteger,
        _fk("packages_packages.id", "CASCADE", "packages_package_files", "package_id"),
        nullable=False,
    ),
    _ts("created_at"),
    _ts("updated_at"),
    Column("size", BigInteger),
    Column("file_store", Integer, server_default=text("1")),
    Column("file_md5", LargeBinary),
    Column("file_sha1", LargeBinary),
    Column("file_name", String, nullable=False),
    Column("file", Text, nullable=False),
    Column("file_sha256", LargeBinary),
    Column("verification_retry_at", DateTime(timezone=True)),
    Column("verified_at", DateTime(timezone=True)),
    Column("verification_failure", String(255)),
    Column("verification_retry_count", Integer),
    Column("verification_checksum", LargeBinary),
    Column("verification_state", SmallInteger, nullable=False, server_default=text("0")),
    Column("verification_started_at", DateTime(timezone=True)),
    Column("status", SmallInteger, nullable=False, server_default=text("0")),
    Column("file_final_path", Text),
    Column("project_id", BigInteger),
    _check("packages_package_files", "char_length(file_final_path) <= 1024"),
    _check("packages_package_files", "project_id IS NOT NULL"),
    _check("packages_package_files", "file_store IS NOT NULL"),
)
_pf = packages_package_files.c
_PACKAGES_PACKAGE_FILES_INDEXES = (  # an Index built from a table's columns attaches itself to it
    Index(
        "idx_pkgs_installable_package_files_on_package_id_id_file_name",
        _pf.package_id, _pf.id, _pf.file_name, postgresql_where=text("(status = 0)"),
    ),
    Index(
        "index_packages_package_files_on_file_name", _pf.file_name,
        postgresql_using="gin", postgresql_ops={"file_name": "gin_trgm_ops"},
    ),
    Index(
        "index_packages_package_files_on_file_name_file_sha256", _pf.file_name, _pf.file_sha256
    ),
    Index("index_packages_package_files_on_file_store", _pf.file_store),
    Index(
        "index_packages_package_files_on_id_for_cleanup", _pf.id,
        postgresql_where=text("(status = 1)"),
    ),
    Index(
        "index_packages_package_files_on_package_file_extension_status", _pf.package_id,
        postgresql_where=text(
            "((status = 0) AND (reverse(split_part(reverse((file_name)::text), '.'::text, 1)) "
            "= 'nupkg'::text))"
        ),
    ),
    Index(
        "index_packages_package_files_on_package_id_and_created_at_desc",
        _pf.package_id, _pf.created_at.desc(),
    ),
    Index(
        "index_packages_package_files_on_package_id_and_file_name", _pf.package_id, _pf.file_name
    ),
    Index("index_packages_package_files_on_package_id_id", _pf.package_id, _pf.id),
    Index(
        "index_packages_package_files_on_package_id_status_and_id",
        _pf.package_id, _pf.status, _pf.id,
    ),
    Index("index_packages_package_files_on_status", _pf.status),
    Index("index_packages_package_files_on_verification_state", _pf.verification_state),
    Index(
        "packages_packages_failed_verification", _pf.verification_retry_at.nulls_first(),
        postgresql_where=text("(verification_state = 3)"),
    ),
    Index(
        "packages_packages_needs_verification", _pf.verification_state,
        postgresql_where=text("((verification_state = 0) OR (verification_state = 3))"),
    ),
    Index(
        "packages_packages_pending_verification", _pf.verified_at.nulls_first(),
        postgresql_where=text("(verification_state = 0)"),
    ),
)

ml_model_versions = Table(
    "ml_model_versions", metadata,
    _id("ml_model_versions"),
    _ts("created_at"),
    _ts("updated_at"),
    Column("project_id", BigInteger, _project_fk("ml_model_versions"), nullable=False),
    Column(
        "model_id", BigInteger,
        _fk("ml_models.id", "CASCADE", "ml_model_versions", "model_id"), nullable=False,
    ),
    Column(
        "package_id", BigInteger,
        _fk("packages_packages.id", "SET NULL", "ml_model_versions", "package_id"),
    ),
    Column("version", Text, nullable=False),
    Column("description", Text),
    Column("semver_major", Integer),
    Column("semver_minor", Integer),
    Column("semver_patch", Integer),
    Column("semver_prerelease", Text),
    Column("cached_markdown_version", Integer),
    Column("description_html", Text),
    _check("ml_model_versions", "char_length(semver_prerelease) <= 255"),
    _check("ml_model_versions", "char_length(version) <= 255"),
    _check("ml_model_versions", "char_length(description_html) <= 50000"),
    _check("ml_model_versions", "char_length(description) <= 10000"),
)
_mv = ml_model_versions.c
_ML_MODEL_VERSIONS_INDEXES = (  # an Index built from a table's columns attaches itself to it
    Index("index_ml_model_versions_on_created_at_on_model_id", _mv.model_id, _mv.created_at),
    Index("index_ml_model_versions_on_package_id", _mv.package_id),
    Index("index_ml_model_versions_on_project_id", _mv.project_id),
    Index(
        "index_ml_model_versions_on_project_id_and_model_id_and_version",
        _mv.project_id, _mv.model_id, _mv.version, unique=True,
    ),
    Index("unique_ml_model_versions_on_model_id_and_id", _mv.model_id, _mv.id.desc()),
)

ml_candidates = Table(
    "ml_candidates", metadata,
    _id("ml_candidates"),
    _ts("created_at"),
    _ts("updated_at"),
    Column(
        "experiment_id", BigInteger,
        _fk("ml_experiments.id", "CASCADE", "ml_candidates", "experiment_id"), nullable=False,
    ),
    Column("user_id", BigInteger, _user_fk("ml_candidates")),
    Column("start_time", BigInteger),
    Column("end_time", BigInteger),
    Column("status", SmallInteger, nullable=False, server_default=text("0")),
    Column("name", Text),
    Column(
        "package_id", BigInteger,
        _fk("packages_packages.id", "SET NULL", "ml_candidates", "package_id"),
    ),
    Column("eid", Uuid(as_uuid=False)),
    Column("project_id", BigInteger, _project_fk("ml_candidates")),
    Column("internal_id", BigInteger),
    Column("ci_build_id", BigInteger),
    Column(
        "model_version_id", BigInteger,
        _fk("ml_model_versions.id", "CASCADE", "ml_candidates", "model_version_id"),
    ),
    _check("ml_candidates", "project_id IS NOT NULL", "check_01584ca6db"),
    _check("ml_candidates", "char_length(name) <= 255"),
    _check("ml_candidates", "eid IS NOT NULL"),
    Index("index_ml_candidates_on_ci_build_id", "ci_build_id"),
    Index("index_ml_candidates_on_experiment_id_and_eid", "experiment_id", "eid", unique=True),
    Index("index_ml_candidates_on_model_version_id", "model_version_id", unique=True),
    Index("index_ml_candidates_on_package_id", "package_id"),
    Index("index_ml_candidates_on_project_id", "project_id"),
    Index("index_ml_candidates_on_project_id_on_internal_id", "project_id", "internal_id"),
    Index("index_ml_candidates_on_user_id", "user_id"),
)


def _candidate_child(name: str, *, candidate_not_null: bool, columns: list[Column],
                     checks: list[str], indexes: list[Index]) -> Table:
    """Params, metrics and candidate metadata share their parent link and project_id rules."""
    return Table(
        name, metadata,
        _id(name),
        _ts("created_at"),
        _ts("updated_at"),
        Column(
            "candidate_id", BigInteger,
            _fk("ml_candidates.id", "CASCADE", name, "candidate_id"),
            nullable=not candidate_not_null,
        ),
        *columns,
        Column("project_id", BigInteger, _project_fk(name)),
        *[_check(name, sql) for sql in checks],
        *indexes,
    )


ml_candidate_metadata = _candidate_child(
    "ml_candidate_metadata",
    candidate_not_null=True,
    columns=[Column("name", Text, nullable=False), Column("value", Text, nullable=False)],
    checks=["char_length(name) <= 255", "char_length(value) <= 5000", "project_id IS NOT NULL"],
    indexes=[
        Index(
            "index_ml_candidate_metadata_on_candidate_id_and_name",
            "candidate_id", "name", unique=True,
        ),
        Index("index_ml_candidate_metadata_on_name", "name"),
        Index("index_ml_candidate_metadata_on_project_id", "project_id"),
    ],
)

ml_candidate_metrics = _candidate_child(
    "ml_candidate_metrics",
    candidate_not_null=False,
    columns=[
        Column("value", Float(precision=53)),
        Column("step", Integer),
        Column("is_nan", LargeBinary),
        Column("name", Text, nullable=False),
        Column("tracked_at", BigInteger),
    ],
    checks=["char_length(name) <= 250", "candidate_id IS NOT NULL", "project_id IS NOT NULL"],
    indexes=[
        Index("index_ml_candidate_metrics_on_candidate_id", "candidate_id"),
        Index("index_ml_candidate_metrics_on_project_id", "project_id"),
    ],
)

ml_candidate_params = _candidate_child(
    "ml_candidate_params",
    candidate_not_null=False,
    columns=[Column("name", Text, nullable=False), Column("value", Text, nullable=False)],
    checks=[
        "char_length(name) <= 250", "char_length(value) <= 250",
        "candidate_id IS NOT NULL", "project_id IS NOT NULL",
    ],
    indexes=[
        Index("index_ml_candidate_params_on_candidate_id", "candidate_id"),
        Index(
            "index_ml_candidate_params_on_candidate_id_on_name",
            "candidate_id", "name", unique=True,
        ),
        Index("index_ml_candidate_params_on_project_id", "project_id"),
    ],
)

ml_model_metadata = Table(
    "ml_model_metadata", metadata,
    _id("ml_model_metadata"),
    _ts("created_at"),
    _ts("updated_at"),
    Column(
        "model_id", BigInteger,
        _fk("ml_models.id", "CASCADE", "ml_model_metadata", "model_id"), nullable=False,
    ),
    Column("name", Text, nullable=False),
    Column("value", Text, nullable=False),
    Column("project_id", BigInteger, _project_fk("ml_model_metadata")),
    _check("ml_model_metadata", "char_length(value) <= 5000"),
    _check("ml_model_metadata", "char_length(name) <= 255"),
    _check("ml_model_metadata", "project_id IS NOT NULL"),
    Index("index_ml_model_metadata_on_project_id", "project_id"),
    Index("unique_index_ml_model_metadata_name", "model_id", "name", unique=True),
)

ml_model_version_metadata = Table(
    "ml_model_version_metadata", metadata,
    _id("ml_model_version_metadata"),
    _ts("created_at"),
    _ts("updated_at"),
    Column("project_id", BigInteger, _project_fk("ml_model_version_metadata"), nullable=False),
    Column(
        "model_version_id", BigInteger,
        _fk("ml_model_versions.id", "CASCADE", "ml_model_version_metadata", "model_version_id"),
        nullable=False,
    ),
    Column("name", Text, nullable=False),
    Column("value", Text, nullable=False),
    _check("ml_model_version_metadata", "char_length(name) <= 255"),
    _check("ml_model_version_metadata", "char_length(value) <= 5000"),
    Index("index_ml_model_version_metadata_on_project_id", "project_id"),
    Index(
        "unique_index_ml_model_version_metadata_name", "model_version_id", "name", unique=True
    ),
)

ML_TABLES: dict[str, Table] = {name: metadata.tables[name] for name in ML_TABLE_NAMES}
