"""Migrations: fresh, re-run, upgrade with rows, and shipping in a wheel."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import zipfile

import pytest

from imgworker import db
from imgworker.store.sqlite import SqliteStore


def test_fresh_then_rerun_is_noop(tmp_path):
    conn = db.connect(tmp_path / "a.db")
    names = db.migrate(conn)
    assert names == [p.name for _, _, p in db.available_migrations()]
    assert db.migrate(conn) == []
    assert sorted(db.applied_migrations(conn)) == [v for v, _, _ in db.available_migrations()]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_upgrade_from_previous_version_keeps_rows(tmp_path):
    conn = db.connect(tmp_path / "a.db")
    latest = db.available_migrations()[-1][0]
    db.migrate(conn, target=latest - 1)
    # rows as the previous version wrote them (today's store writes today's columns)
    for job_id, name in (("old-1", "cat.jpg"), ("old-2", "dog.png")):
        conn.execute("INSERT INTO jobs (id, status, max_attempts, run_at, created_at, input_path, original_name,"
                     " input_size) VALUES (?, 'queued', 1, 0, 0, '/in', ?, 5)", (job_id, name))
    assert db.migrate(conn) == [db.available_migrations()[-1][2].name]
    ids = {r[0] for r in conn.execute("SELECT id FROM jobs")}
    assert ids == {"old-1", "old-2"}
    # the newest migration's objects work on the old rows
    rows = conn.execute("SELECT id, status FROM job_summary ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [("old-1", "queued"), ("old-2", "queued")]
    assert SqliteStore(tmp_path / "a.db").claim("s", 1000).id == "old-1"  # and today's claim takes them


def test_failed_migration_rolls_back(tmp_path):
    mig = tmp_path / "m"
    mig.mkdir()
    (mig / "0001_ok.sql").write_text("CREATE TABLE a (x INTEGER);")
    (mig / "0002_bad.sql").write_text("CREATE TABLE b (x INTEGER);\nINSERT INTO nope VALUES (1);")
    conn = db.connect(tmp_path / "m.db")
    with pytest.raises(sqlite3.OperationalError):
        db.migrate(conn, directory=mig)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "a" in tables and "b" not in tables
    assert list(db.applied_migrations(conn)) == [1]


def test_old_sqlite_refused():
    with pytest.raises(db.DatabaseError, match="too old"):
        db.check_sqlite_version("3.31.1")
    db.check_sqlite_version("3.40.1")


def test_wheel_ships_migrations(tmp_path):
    root = db.migrations_dir().parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(root)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("imgworker-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for _, _, path in db.available_migrations():
        assert f"imgworker/migrations/{path.name}" in names
    from imgworker import pgdb

    for _, _, path in pgdb.available_migrations():
        assert f"imgworker/migrations/postgres/{path.name}" in names


def test_outcome_migration_moves_results_into_columns_and_the_json_stays_the_same(tmp_path):
    """A job completed before 0003 (its public JSON stored in `result`) is
    shown byte for byte the same after the migration, built from columns."""
    import json

    from imgworker.views import result_view

    conn = db.connect(tmp_path / "a.db")
    db.migrate(conn, target=2)
    job_id = "e" * 32
    old = {"success": True, "processingTime": 87,
           "originalFile": {"name": "cat.jpg", "size": 120000, "format": "jpeg",
                            "dimensions": {"width": 3000, "height": 2000}},
           "processedFile": {"filename": f"processed_{job_id}.webp", "size": 14400, "format": "webp",
                             "dimensions": {"width": 1024, "height": 683}, "url": f"/api/images/processed_{job_id}.webp"},
           "optimization": {"wasResized": True, "formatChanged": True, "compressionRatio": "88.0%",
                            "sizeSaved": 105600, "keptOriginalEncoding": False},
           "animated": False, "framesIn": 1, "framesOut": 1}
    conn.execute(
        "INSERT INTO jobs (id, status, max_attempts, run_at, created_at, completed_at, input_path, original_name,"
        " input_size, input_format, result) VALUES (?, 'completed', 1, 0, 0, 5, '/in', 'cat.jpg', 120000, 'jpeg', ?)",
        (job_id, json.dumps(old)),
    )
    db.migrate(conn)
    job = SqliteStore(tmp_path / "a.db").get(job_id)
    assert json.dumps(result_view(job.id, job.original_name, job.outcome)) == json.dumps(old)
    assert "result" not in {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}


@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_one_runner_for_both_databases(database, tmp_path, request):
    """migrate.run with each database's dialect: files in order, a failing
    file leaves the version before it (its statements and ledger row undone),
    the next run goes on from there, and a run with nothing pending is a no-op."""
    from imgworker import migrate, pgdb

    if database == "sqlite":
        conn, dialect = db.connect(tmp_path / "x.db"), db.SQLITE
    else:
        conn, dialect = pgdb.connect(request.getfixturevalue("pg_url")), pgdb.POSTGRES
    mig = tmp_path / "m"
    mig.mkdir()
    (mig / "0001_a.sql").write_text("CREATE TABLE a (x INTEGER);\nINSERT INTO a VALUES (1);\n")
    (mig / "0002_b.sql").write_text("CREATE TABLE b (x INTEGER);\nINSERT INTO nowhere VALUES (1);\n")
    with pytest.raises(Exception, match="nowhere"):
        migrate.run(conn, dialect, mig)
    assert list(migrate.applied(conn, dialect)) == [1]
    (mig / "0002_b.sql").write_text("CREATE TABLE b (x INTEGER);\n")  # fails if the failed file's table stayed
    assert migrate.run(conn, dialect, mig) == ["0002_b.sql"]
    assert migrate.run(conn, dialect, mig) == []
    assert sorted(migrate.applied(conn, dialect)) == [1, 2]
    conn.close()
