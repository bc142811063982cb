"""GitLab's ``mlflow-artifacts`` routes: a model version's package files, listed from
``packages_package_files`` and read from GitLab's package store on this machine.

GitLab (``lib/api/ml/mlflow_artifacts/artifacts.rb``) serves two GETs under
``/api/v4/projects/:id/ml/mlflow/api/2.0/mlflow-artifacts/``:

* ``artifacts?path=<model version id>[/<path>]``: the version's installable package files
  as ``{"files": [{"path": file_name, "file_size": size, "is_dir": false}]}``; with a path
  after the id an empty list (GitLab's way of telling the client "not a directory");
* ``artifacts/<model version id>/<file path>``: the file whose ``file_name`` is
  ``CGI.escape(file path)``, the last one with that name (``Packages::PackageFileFinder``).

These are what the client reaches from a model version: ``get_model_version_download_uri``
answers ``mlflow-artifacts:/<id>``, which the client resolves against the tracking URI. A
run's ``artifact_uri`` points at GitLab's packages API instead (``run_info.rb``), which the
client's ``HttpArtifactRepository`` cannot list (it splits the URI on
``/mlflow-artifacts/artifacts``): on GitLab as here, ``list_artifacts(run_id)`` raises
``ValueError`` in the client before any request.

Files live where ``Packages::PackageFileUploader`` puts them on local storage
(``file_store`` 1): ``<packages storage path>/<sha256(project id)[0:2]>/<[2:4]>/<sha256>/
packages/<package id>/files/<file id>/<file>`` (Omnibus:
``/var/opt/gitlab/gitlab-rails/shared/packages``). The operator names that directory with
``--packages-dir``; without it, or for a file in object storage, the answer says where the
file is. A stored name never leads out of the directory.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import sqlalchemy as sa

from toolkit.mlflow_api.errors import ApiError, resource_not_found
from toolkit.mlflow_api.registry import ruby_to_i
from toolkit.mlflow_api.views import View

LOCAL_STORE, REMOTE_STORE = 1, 2  # ObjectStorage::Store
INSTALLABLE = 0  # Packages::PackageFile status "default"
OMNIBUS_PACKAGES_DIR = "/var/opt/gitlab/gitlab-rails/shared/packages"
CHUNK = 1024 * 1024
ARTIFACTS_ROUTE = re.compile(r"^/api/v4/projects/(?P<project>[^/]+)/ml/mlflow/api/2\.0/mlflow-artifacts/"
                             r"artifacts(?:/(?P<version>[^/]+)/(?P<file>.+))?$")


def stored_path(project_id: int, package_id: int, file_id: int, file: str) -> str:
    """PackageFileUploader#store_dir (``dynamic_segment``) joined with the stored file
    name, relative to the package store. ``project_id`` is the package's."""
    digest = hashlib.sha256(str(project_id).encode()).hexdigest()
    return "/".join((digest[:2], digest[2:4], digest, "packages", str(package_id), "files",
                     str(file_id), file))


def cgi_escape(text: str) -> str:
    """Ruby's ``CGI.escape``: everything but ``A-Za-z0-9_.-~`` percent-encoded, space as +."""
    return quote_plus(text, safe="")


def content_disposition(name: str) -> str:
    """Rails' ``ActionDispatch::Http::ContentDisposition.format(disposition: 'attachment',
    filename:)``, which GitLab's download sends."""
    ascii_name = "".join(c if ord(c) < 128 else "?" for c in name)
    traditional = re.sub(r"[^ A-Za-z0-9!#$+.^_`|~-]", lambda m: f"%{ord(m.group()):02X}", ascii_name)
    return (f'attachment; filename="{traditional}"; '
            f"filename*=UTF-8''{quote(name, safe='!#$&+.^_`|~-')}")


def _model_version(view: View, text: str | None) -> sa.Row | None:
    """``Ml::ModelVersion.by_project_id_and_id`` with its package."""
    version_id = ruby_to_i(text) if text is not None else None
    if version_id is None:
        return None
    return view.conn.execute(sa.text("""
        SELECT v.id, v.package_id, pk.project_id AS package_project FROM ml_model_versions v
        LEFT JOIN packages_packages pk ON pk.id = v.package_id
        WHERE v.project_id = :p AND v.id = :v"""), {"p": view.project_id, "v": version_id}).first()


def list_artifacts(view: View, params: dict[str, Any]) -> dict[str, Any]:
    """GET mlflow-artifacts/artifacts?path=…: ``model_version, path = params[:path].split('/', 2)``."""
    raw = params.get("path")
    if raw is None:  # GitLab: nil.split, a 500; here the 404 a missing version gets
        raise resource_not_found()
    version_text, _, rest = str(raw).partition("/")
    if rest.strip():
        return {"files": []}
    found = _model_version(view, version_text or None)
    if found is None or found.package_id is None:
        raise resource_not_found()
    files = view.conn.execute(sa.text("""
        SELECT file_name, size FROM packages_package_files
        WHERE package_id = :pkg AND status = :installable ORDER BY id"""),
        {"pkg": found.package_id, "installable": INSTALLABLE})
    return {"files": [{"path": f.file_name, "file_size": f.size, "is_dir": False} for f in files]}


@dataclass(frozen=True)
class Download:
    """A package file found on disk: what the HTTP side sends, in chunks."""

    path: Path
    size: int
    name: str

    def headers(self) -> list[tuple[str, str]]:
        return [("Content-Type", "application/octet-stream"), ("Content-Length", str(self.size)),
                ("Content-Disposition", content_disposition(self.name))]

    def chunks(self, size: int = CHUNK) -> Iterator[bytes]:
        """The file piece by piece, never whole in memory; it ends at the size sent."""
        left = self.size
        with self.path.open("rb") as stream:
            while left > 0:
                piece = stream.read(min(size, left))
                if not piece:
                    return
                left -= len(piece)
                yield piece


@dataclass(frozen=True)
class StoredFile:
    """A package file row, found in one transaction; read from disk after it ends."""

    file_id: int
    package_id: int
    package_project: int
    file: str
    file_name: str
    file_store: int | None
    file_final_path: str | None


def find_file(view: View, version_text: str, file_path_in_url: str) -> StoredFile:
    """GET mlflow-artifacts/artifacts/:model_version/*file_path: the last installable file
    of the version's package whose ``file_name`` is ``CGI.escape(file_path)``. GitLab
    answers 500 for a version that does not exist or has no package (``nil.package``);
    here they are 404 as a missing file is."""
    found = _model_version(view, unquote(version_text))
    if found is None or found.package_id is None:
        raise resource_not_found()
    row = view.conn.execute(sa.text("""
        SELECT id, file, file_name, file_store, file_final_path FROM packages_package_files
        WHERE package_id = :pkg AND status = :installable AND file_name = :name
        ORDER BY id DESC LIMIT 1"""),
        {"pkg": found.package_id, "installable": INSTALLABLE,
         "name": cgi_escape(unquote(file_path_in_url))}).first()
    if row is None:
        raise resource_not_found()
    return StoredFile(row.id, found.package_id, found.package_project, row.file, row.file_name,
                      row.file_store, row.file_final_path)


def _not_here(message: str) -> ApiError:
    return ApiError(501, body={"error_code": "NOT_IMPLEMENTED", "message": message})


def open_file(stored: StoredFile, packages_dir: Path | None) -> Download:
    """Where GitLab's local storage keeps the file, inside ``packages_dir`` only."""
    relative = stored_path(stored.package_project, stored.package_id, stored.file_id, stored.file)
    if stored.file_store == REMOTE_STORE:
        raise _not_here(f"{stored.file_name} is in GitLab's object storage (package file {stored.file_id}, "
                        f"object {stored.file_final_path or relative}); toolkit mlflow serve reads only "
                        "GitLab's local package store")
    if packages_dir is None:
        raise _not_here(f"toolkit mlflow serve was started without --packages-dir: {stored.file_name} "
                        f"is <package store>/{relative} on the GitLab host (Omnibus: "
                        f"{OMNIBUS_PACKAGES_DIR}); start it with --packages-dir DIR pointing at a copy")
    bad = (not stored.file or "/" in stored.file or "\\" in stored.file or "\x00" in stored.file
           or stored.file in (".", ".."))
    root = packages_dir.resolve()
    path = (root / relative).resolve()
    if bad or os.path.commonpath([root, path]) != str(root):
        raise ApiError(404, body={"error_code": "RESOURCE_DOES_NOT_EXIST",
                                 "message": f"package file {stored.file_id} has a stored name that would "
                                            "lead out of the package directory; not served"})
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError:
        size = None
    if size is None:
        raise ApiError(404, body={"error_code": "RESOURCE_DOES_NOT_EXIST",
                                 "message": f"{stored.file_name} is not in the package directory: "
                                            f"expected {packages_dir / relative}"})
    return Download(path, size, stored.file_name)
