"""Model artifacts through ``toolkit mlflow serve``'s ``mlflow-artifacts`` routes, against
what GitLab's source answers, with files in a package directory the test writes.

Expected answers from GitLab's code (commits in ``docs/mlflow.md``, "Registry and artifacts"):

* AR  lib/api/ml/mlflow_artifacts/artifacts.rb @415360b8 (the routes, ``split('/', 2)``,
      the empty list for a path after the id, ``CGI.escape(params[:file_path])``)
* AH  lib/api/ml/mlflow/api_helpers.rb @f7f952ac (``list_model_artifacts``,
      ``find_model_artifact``: the version by project and id, its package's installable files)
* EA  lib/api/entities/ml/mlflow_artifacts/artifact.rb @f7f952ac (path = file_name,
      file_size = size, is_dir false)
* PFU app/uploaders/packages/package_file_uploader.rb @a09983ae (where local storage keeps a
      file: sha256(project id) split 2/2/full, packages/<package id>/files/<file id>/<file>)
* PFF app/finders/packages/package_file_finder.rb @a7b35607 (the last file of that name)
* spec/requests/api/ml/mlflow_artifacts/artifacts_spec.rb @ba0f3164
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from helpers import toolkit
from mlflow_serving import MLFLOW2_PYTHON_ENV, adversarial_database, client, raw, said, serving

from toolkit.mlflow_api.walk import client_version
from toolkit.sandbox.package_files import write_package_files

pytestmark = pytest.mark.skipif(client_version() is None,
                                reason="the MLflow client is not installed: pip install -e '.[test]'")
NOT_FOUND = (404, {"error_code": "RESOURCE_DOES_NOT_EXIST"})
BIG = 3 * 1024 * 1024 + 17  # more than one chunk of the server's and of the client's


def gitlab_path(root: Path, project_id: int, package_id: int, file_id: int, file: str) -> Path:
    """PFU ``dynamic_segment`` + the stored name, under the package store."""
    digest = hashlib.sha256(str(project_id).encode()).hexdigest()
    return root / digest[0:2] / digest[2:4] / digest / "packages" / str(package_id) / "files" / str(file_id) / file


def content(file_id: int, size: int) -> bytes:
    seed = hashlib.sha256(f"file {file_id}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


@pytest.fixture(scope="module")
def db(pg_server, templates) -> Iterator:
    with adversarial_database(pg_server, templates, "artifacts") as database:
        yield database


@pytest.fixture(scope="module")
def store(db, tmp_path_factory) -> Path:
    """The package store of every model version's files, written here; one file made big."""
    root = tmp_path_factory.mktemp("packages")
    rows = db.rows("""SELECT f.id, f.package_id, p.project_id, f.file, f.size FROM packages_package_files f
                      JOIN packages_packages p ON p.id = f.package_id
                      WHERE f.package_id IN (SELECT package_id FROM ml_model_versions) ORDER BY f.id""")
    assert rows
    big = rows[1].id
    db.execute("UPDATE packages_package_files SET size = :s WHERE id = :i", s=BIG, i=big)
    for row in rows:
        path = gitlab_path(root, row.project_id, row.package_id, row.id, row.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content(row.id, BIG if row.id == big else row.size))
    return root


@pytest.fixture(scope="module")
def server(db, store) -> Iterator[str]:
    with serving(db, "--packages-dir", str(store)) as address:
        yield address


def version_with_files(db):
    version = db.rows("""SELECT v.*, m.name AS model_name FROM ml_model_versions v
                         JOIN ml_models m ON m.id = v.model_id ORDER BY v.id LIMIT 1""")[0]
    files = db.rows("""SELECT * FROM packages_package_files WHERE package_id = :p AND status = 0 ORDER BY id""",
                    p=version.package_id)
    assert len(files) >= 2
    return version, files


def test_listing_is_gitlabs(server, db):
    version, files = version_with_files(db)
    project = version.project_id
    status, listed, _ = raw(server, project, "artifacts", query=f"path={version.id}", api="mlflow-artifacts")
    assert (status, listed) == (200, {"files": [{"path": f.file_name, "file_size": f.size, "is_dir": False}
                                                for f in files]})  # EA, in that key order
    assert [list(f) for f in listed["files"]] == [["path", "file_size", "is_dir"]] * len(files)
    # spec 'checks for an directory': a path after the id lists nothing
    assert raw(server, project, "artifacts", query=f"path={version.id}/MLmodel", api="mlflow-artifacts")[:2] == (
        200, {"files": []})
    # AH list_model_artifacts: resource_not_found! unless model_version && package
    assert raw(server, project, "artifacts", query="path=999999", api="mlflow-artifacts")[:2] == NOT_FOUND
    other = db.scalar("SELECT min(id) FROM projects WHERE id <> :p", p=project)
    assert raw(server, other, "artifacts", query=f"path={version.id}", api="mlflow-artifacts")[:2] == NOT_FOUND
    db.execute("""INSERT INTO ml_model_versions (created_at, updated_at, project_id, model_id, version)
                  VALUES (now(), now(), :p, :m, '99.0.0')""", p=project, m=version.model_id)
    bare = db.scalar("SELECT id FROM ml_model_versions WHERE model_id = :m AND version = '99.0.0'",
                     m=version.model_id)
    try:
        # spec 'when the model version has no package'
        assert raw(server, project, "artifacts", query=f"path={bare}", api="mlflow-artifacts")[:2] == NOT_FOUND
    finally:
        db.execute("DELETE FROM ml_model_versions WHERE id = :v", v=bare)
    # uploading is a write: refused, as every write is
    assert raw(server, project, f"artifacts/{version.id}/x", api="mlflow-artifacts", method="PUT",
               body={})[0] == 403


def test_the_client_downloads_a_model_versions_files(server, db, tmp_path):
    version, files = version_with_files(db)
    # the MLflow client's path: get-download-uri gives mlflow-artifacts:/<id>, resolved
    # against the tracking URI to .../api/2.0/mlflow-artifacts/artifacts/<id>
    read = said(client(server, version.project_id, f"""
import mlflow.artifacts, os
for d in ("by-uri", "one", "models"): os.makedirs(os.path.join({str(tmp_path)!r}, d))
from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
uri = c.get_model_version_download_uri({version.model_name!r}, {version.id})
say(uri)
repo = MlflowArtifactsRepository(uri)
say(repo.artifact_uri)
say(sorted([f.path, f.is_dir, f.file_size] for f in repo.list_artifacts()))
local = repo.download_artifacts("", dst_path={str(tmp_path / "by-uri")!r})
say(sorted(os.listdir(local)))
one = repo.download_artifacts({files[1].file_name!r}, dst_path={str(tmp_path / "one")!r})
say(os.path.basename(one))
try:
    mlflow.artifacts.download_artifacts(artifact_uri="models:/{version.model_name}/{version.id}",
                                        dst_path={str(tmp_path / "models")!r})
    say(sorted(os.listdir({str(tmp_path / "models")!r})))
except Exception as e:
    say(["models:/", type(e).__name__, str(e)[:300]])
try:
    mlflow.artifacts.list_artifacts(artifact_uri=uri); say("listed")
except Exception as e:
    say(["list", type(e).__name__, str(e)[:200]])
"""))
    listed = sorted([f.file_name, False, f.size] for f in files)
    assert read[:5] == [f"mlflow-artifacts:/{version.id}",
                        f"{server}/api/v4/projects/{version.project_id}/ml/mlflow/api/2.0/mlflow-artifacts/artifacts/"
                        f"{version.id}", listed, sorted(f.file_name for f in files), files[1].file_name]
    for f in files:
        assert (tmp_path / "by-uri" / f.file_name).read_bytes() == content(f.id, f.size), f.file_name
    assert (tmp_path / "one" / files[1].file_name).read_bytes() == content(files[1].id, BIG)
    # models:/NAME/ID (load_model's way): get-download-uri, then the same routes; the client
    # adds its own registered_model_meta
    assert read[5] == sorted([*(f.file_name for f in files), "registered_model_meta"])
    # mlflow.artifacts.list_artifacts(artifact_uri="mlflow-artifacts:/ID") splits off the id and
    # asks the host's root /api/2.0/mlflow-artifacts/, which GitLab does not serve either
    assert read[6][:2] == ["list", "HTTPError"] and read[6][2].startswith("404")

    # raw: what present_package_file! sends (spec: Content-Disposition, Content-Length, body)
    status, body, headers = raw(server, version.project_id, f"artifacts/{version.id}/{files[0].file_name}",
                                api="mlflow-artifacts")
    assert status == 200 and body == content(files[0].id, files[0].size)
    assert headers["Content-Length"] == str(files[0].size)
    assert headers["Content-Disposition"].startswith(f'attachment; filename="{files[0].file_name}"')
    # spec 'when the file does not exist'; AH: another project's version is not found
    assert raw(server, version.project_id, f"artifacts/{version.id}/non_existent_file.txt",
               api="mlflow-artifacts")[:2] == NOT_FOUND


def test_a_runs_artifacts_fail_in_the_client_as_they_do_on_gitlab(server, db):
    """A run's artifact_uri is GitLab's packages API (run_info.rb), not an mlflow-artifacts
    URI: the client's HttpArtifactRepository.list_artifacts splits it on
    "/mlflow-artifacts/artifacts" and fails before sending anything, on GitLab as here."""
    run = db.rows("""SELECT c.eid, c.project_id FROM ml_candidates c WHERE c.package_id IS NOT NULL
                     OR c.model_version_id IS NOT NULL ORDER BY c.id LIMIT 1""")[0]
    read = said(client(server, run.project_id, f"""
try:
    c.list_artifacts({str(run.eid)!r}); say("listed")
except ValueError as e:
    say(str(e))
"""))
    assert read == ["not enough values to unpack (expected 2, got 1)"]


def test_stored_names_never_lead_out_of_the_directory(server, db, store):
    version, files = version_with_files(db)
    target = files[0]
    outside = store.parent / "outside.txt"
    outside.write_bytes(b"not a package file")
    escape = os.path.relpath(outside, gitlab_path(store, version.project_id, version.package_id, target.id, "x").parent)
    try:
        db.execute("UPDATE packages_package_files SET file = :f WHERE id = :i", f=escape, i=target.id)
        status, answer, _ = raw(server, version.project_id, f"artifacts/{version.id}/{target.file_name}",
                                api="mlflow-artifacts")
        assert status == 404 and "lead out of the package directory" in answer["message"], answer
    finally:
        db.execute("UPDATE packages_package_files SET file = :f WHERE id = :i", f=target.file, i=target.id)
    # a name in the URL: CGI.escape keeps it one file name, which no row has
    for name in ("../../outside.txt", quote("../../outside.txt", safe=""), "..%2F..%2Foutside.txt"):
        assert raw(server, version.project_id, f"artifacts/{version.id}/{name}",
                   api="mlflow-artifacts")[:2] == NOT_FOUND, name
    # a symbolic link out of the store is not followed out
    link_file = files[1]
    linked = gitlab_path(store, version.project_id, version.package_id, link_file.id, link_file.file)
    kept = linked.with_name("kept")
    linked.rename(kept)
    linked.symlink_to(outside)
    try:
        status, answer, _ = raw(server, version.project_id, f"artifacts/{version.id}/{link_file.file_name}",
                                api="mlflow-artifacts")
        assert status == 404 and "lead out" in answer["message"], answer
    finally:
        linked.unlink()
        kept.rename(linked)


def test_where_the_files_are_when_they_cannot_be_served(server, db):
    version, files = version_with_files(db)
    remote = files[0]
    db.execute("UPDATE packages_package_files SET file_store = 2 WHERE id = :i", i=remote.id)
    try:
        status, answer, _ = raw(server, version.project_id, f"artifacts/{version.id}/{remote.file_name}",
                                api="mlflow-artifacts")
        assert status == 501 and "object storage" in answer["message"], answer
    finally:
        db.execute("UPDATE packages_package_files SET file_store = 1 WHERE id = :i", i=remote.id)
    digest = hashlib.sha256(str(version.project_id).encode()).hexdigest()
    relative = f"{digest[:2]}/{digest[2:4]}/{digest}/packages/{version.package_id}/files/{files[0].id}/{files[0].file}"
    with serving(db) as bare:
        status, answer, _ = raw(bare, version.project_id, f"artifacts/{version.id}/{files[0].file_name}",
                                api="mlflow-artifacts")
        assert status == 501 and "--packages-dir" in answer["message"] and relative in answer["message"]
        # listing needs only the database
        assert raw(bare, version.project_id, "artifacts", query=f"path={version.id}",
                   api="mlflow-artifacts")[0] == 200


def test_the_sandbox_writes_its_files_where_gitlab_keeps_them(db, tmp_path):
    with db.engine.connect() as conn:
        written = write_package_files(conn, tmp_path)
    rows = db.rows("""SELECT f.id, f.package_id, p.project_id, f.file, f.file_name, f.size
                      FROM packages_package_files f JOIN packages_packages p ON p.id = f.package_id
                      WHERE f.file_store = 1""")
    assert written == len(rows) > 0
    for row in rows:
        path = gitlab_path(tmp_path, row.project_id, row.package_id, row.id, row.file)
        assert path.stat().st_size == row.size, row
    first = rows[0]
    head = gitlab_path(tmp_path, first.project_id, first.package_id, first.id, first.file).read_bytes()[:80]
    assert head.startswith(f"toolkit sandbox package file {first.id}: {first.file_name}".encode()[:first.size])
    assert sum(1 for p in tmp_path.rglob("*") if p.is_file()) == len(rows)


def _download_models_uri(server: str, version, dst: Path, python: str | None = None) -> list:
    return said(client(server, version.project_id, f"""
import mlflow.artifacts, os
os.makedirs({str(dst)!r})
mlflow.artifacts.download_artifacts(artifact_uri="models:/{version.model_name}/{version.id}", dst_path={str(dst)!r})
say(sorted(os.listdir({str(dst)!r})))
""", python=python))


def test_an_mlflow_2_client_downloads_alike(server, db, tmp_path):
    python = os.environ.get(MLFLOW2_PYTHON_ENV)
    if not python:
        pytest.skip(f"set {MLFLOW2_PYTHON_ENV} to the python of a venv with mlflow-skinny 2.x")
    version, files = version_with_files(db)
    older = _download_models_uri(server, version, tmp_path / "older", python)
    assert older == _download_models_uri(server, version, tmp_path / "pinned")
    for f in files:
        assert (tmp_path / "older" / f.file_name).read_bytes() == (tmp_path / "pinned" / f.file_name).read_bytes()


def test_the_same_files_after_milestones_1_to_3(server, db, tmp_path):
    """Milestone 1 converts candidates' packages and milestone 3 creates models; a model
    version's package and files are neither, so its artifacts read the same."""
    version, files = version_with_files(db)
    before = raw(server, version.project_id, "artifacts", query=f"path={version.id}", api="mlflow-artifacts")[:2]
    for milestone in ("milestone-1", "milestone-2", "milestone-3"):
        result = toolkit(db, "migrate", milestone, "--yes")
        assert result.exit_code == 0, result.output
    assert raw(server, version.project_id, "artifacts", query=f"path={version.id}",
               api="mlflow-artifacts")[:2] == before
    assert _download_models_uri(server, version, tmp_path / "after") == [sorted(
        [*(f.file_name for f in files), "registered_model_meta"])]
    for f in files:
        assert (tmp_path / "after" / f.file_name).read_bytes() == content(f.id, BIG if f.id == files[1].id else f.size)


def test_tokens_are_checked_as_on_the_other_routes(db, store, tmp_path):
    """mlflow_artifacts/entrypoint.rb: authenticate!, read_api for GET only, and AR's before
    block (read_model_experiments, read_model_registry) on the project."""
    version, files = version_with_files(db)
    project = version.project_id
    guest = db.scalar("""SELECT u.username FROM users u JOIN project_authorizations a ON a.user_id = u.id
                         WHERE a.project_id = :p AND a.access_level = 10 AND u.state = 'active'""", p=project)
    stranger = db.scalar("""SELECT username FROM users WHERE state = 'active' AND NOT admin AND id NOT IN
                            (SELECT user_id FROM project_authorizations WHERE project_id = :p)""", p=project)
    (tmp_path / "tokens.yml").write_text(json.dumps([
        {"token": "guest-read", "user": guest, "scopes": ["read_api"]},
        {"token": "stranger-api", "user": stranger, "scopes": ["api"]}]))
    with serving(db, "--tokens-file", str(tmp_path / "tokens.yml"), "--packages-dir", str(store)) as address:
        def get(path: str, token: str | None) -> int:
            request = urllib.request.Request(f"{address}/api/v4/projects/{project}/ml/mlflow/api/2.0/{path}",
                                             headers={"PRIVATE-TOKEN": token} if token else {})
            try:
                with urllib.request.urlopen(request, timeout=30) as answer:
                    answer.read()
                    return answer.status
            except urllib.error.HTTPError as exc:
                return exc.code

        listing = f"mlflow-artifacts/artifacts?path={version.id}"
        download = f"mlflow-artifacts/artifacts/{version.id}/{files[0].file_name}"
        assert [get(listing, None), get(download, None)] == [401, 401]
        assert [get(listing, "guest-read"), get(download, "guest-read")] == [200, 200]
        assert [get(listing, "stranger-api"), get(download, "stranger-api")] == [404, 404]
        # get-latest-versions is a POST: a read_api token is refused on it, as on GitLab
        request = urllib.request.Request(
            f"{address}/api/v4/projects/{project}/ml/mlflow/api/2.0/mlflow/registered-models/get-latest-versions",
            data=json.dumps({"name": version.model_name}).encode(),
            headers={"PRIVATE-TOKEN": "guest-read", "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 403
