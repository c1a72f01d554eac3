"""The PostgreSQL side: settings, migrations, `imgworker migrate` on a real
private server (tests/pg.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from imgworker import config, pgdb


def _cli(*args, env):
    return subprocess.run([sys.executable, "-m", "imgworker", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)


def test_migrate_status_then_apply_then_noop(pg_url, tmp_path):
    env = {"DATABASE_URL": pg_url, "DATA_DIR": str(tmp_path / "data")}
    before = _cli("migrate", "--status", env=env)
    assert before.returncode == 0, before.stderr
    assert before.stdout.count("pending") == len(pgdb.available_migrations())
    applied = _cli("migrate", env=env)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines() == [f"applied {p.name}" for _, _, p in pgdb.available_migrations()]
    assert _cli("migrate", env=env).stdout.strip() == "database is up to date"
    after = _cli("migrate", "--status", env=env)
    assert "pending" not in after.stdout and after.stdout.startswith("database postgresql://")
    # the SQLite store was not touched: DATA_DIR holds no database
    assert not (tmp_path / "data" / "imgworker.db").exists()


def test_operator_views_exist(pg_url):
    conn = pgdb.connect(pg_url)
    pgdb.migrate(conn)
    conn.execute(
        "INSERT INTO jobs (id, status, max_attempts, run_at, created_at, input_path, original_name, input_size,"
        " completed_at, error_code, error, result)"
        " VALUES ('a', 'failed', 1, 0, 1700000000000, '/in', 'cat.jpg', 5, 1700000001000, 'X', 'boom', NULL),"
        "        ('b', 'completed', 1, 0, 1700000000000, '/in', 'dog.png', 6, 1700000002000, NULL, NULL,"
        "         '{\"processingTime\": 42}')")
    counts = {r["status"]: r["jobs"] for r in conn.execute("SELECT * FROM status_counts")}
    assert counts == {"failed": 1, "completed": 1}
    fails = conn.execute("SELECT id, error_code, failed_at FROM recent_failures").fetchall()
    assert fails == [{"id": "a", "error_code": "X", "failed_at": "2023-11-14 22:13:21"}]
    summary = conn.execute("SELECT id, processing_ms, created FROM job_summary ORDER BY id").fetchall()
    assert summary[1] == {"id": "b", "processing_ms": 42, "created": "2023-11-14 22:13:20.000"}
    conn.close()


def test_failed_migration_rolls_back(pg_url, tmp_path):
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE a (x INTEGER);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE b (x INTEGER);\nINSERT INTO nope VALUES (1);")
    conn = pgdb.connect(pg_url)
    with pytest.raises(Exception, match="nope"):
        pgdb.migrate(conn, directory=tmp_path)
    tables = {r["tablename"] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert "a" in tables and "b" not in tables
    assert list(pgdb.applied_migrations(conn)) == [1]
    conn.close()


def test_concurrent_migrations_apply_each_file_once(pg_url):
    import threading

    conns = [pgdb.connect(pg_url) for _ in range(3)]
    results = []
    threads = [threading.Thread(target=lambda c=c: results.append(pgdb.migrate(c))) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    applied = sorted(name for r in results for name in r)
    assert applied == sorted(p.name for _, _, p in pgdb.available_migrations())
    for c in conns:
        c.close()


@pytest.mark.parametrize("url, shown", [
    ("mysql://bob:hunter2@db/x", "mysql://bob:***@db/x"),
    ("postgresql://bob:hunter2@db", "postgresql://bob:***@db"),
])
def test_bad_database_url_exits_2_masked(tmp_path, url, shown):
    out = _cli("migrate", env={"DATABASE_URL": url, "DATA_DIR": str(tmp_path)})
    assert out.returncode == 2
    assert "DATABASE_URL" in out.stderr and shown in out.stderr and "hunter2" not in out.stderr


def test_unreachable_database_exits_2_masked(tmp_path):
    # a socket directory with no server in it: refused at once, nothing reached
    url = f"postgresql://bob:hunter2@/imgworker?host={tmp_path}"
    for command in ("migrate",):
        out = _cli(command, env={"DATABASE_URL": url, "DATA_DIR": str(tmp_path / "d")})
        assert out.returncode == 2, (command, out.stderr)
        assert "DATABASE_URL" in out.stderr and "bob:***@" in out.stderr and "hunter2" not in out.stderr
        assert "cannot connect" in out.stderr


def test_wrong_password_names_the_key(pg_server):
    # the test server trusts everyone, so ask for a database that is not there instead
    url = pg_server.url("no_such_db").replace("postgres@", "postgres:secret@")
    with pytest.raises(config.ConfigError) as info:
        pgdb.connect(url)
    assert "DATABASE_URL" in str(info.value) and "secret" not in str(info.value)
    assert "no_such_db" in str(info.value)
