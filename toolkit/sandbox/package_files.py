"""The sandbox's package files on disk, where GitLab's local package store keeps them.

``toolkit sandbox seed --packages-dir DIR`` writes a file for every locally stored row
of ``packages_package_files`` at the path ``Packages::PackageFileUploader`` gives it
(:func:`toolkit.mlflow_api.artifacts.stored_path`), of the row's ``size``, so that
``toolkit mlflow serve --packages-dir DIR`` can serve model artifacts in a demo. The
files are sparse: a line naming the file, then zeros up to the size, so a large sandbox
costs little disk.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from toolkit.mlflow_api.artifacts import LOCAL_STORE, stored_path


def sandbox_file_header(file_id: int, file_name: str) -> bytes:
    return f"toolkit sandbox package file {file_id}: {file_name}\n".encode()


def write_package_files(conn: Connection, packages_dir: Path) -> int:
    """Write every local package file; returns how many. A stored name that is not one
    path component (which GitLab's uploader never stores) is skipped."""
    written = 0
    rows = conn.execution_options(yield_per=5000).execute(sa.text("""
        SELECT f.id, f.package_id, p.project_id, f.file, f.file_name, f.size
        FROM packages_package_files f JOIN packages_packages p ON p.id = f.package_id
        WHERE COALESCE(f.file_store, :local) = :local ORDER BY f.id"""), {"local": LOCAL_STORE})
    for row in rows:
        if not row.file or "/" in row.file or "\x00" in row.file or row.file in (".", ".."):
            continue
        path = packages_dir / stored_path(row.project_id, row.package_id, row.id, row.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        size = row.size or 0
        with path.open("wb") as out:
            out.write(sandbox_file_header(row.id, row.file_name)[:size])
            out.truncate(size)
        written += 1
    return written
