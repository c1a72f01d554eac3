"""The README stays true: its settings table and its sqlite3 commands."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import make_outcome
from imgworker import config
from imgworker.store import NewJob, RetryPolicy
from imgworker.store.sqlite import SqliteStore

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_settings_table_is_current():
    assert config.table_markdown() in README


def sqlite_commands():
    return [line.strip() for line in README.splitlines() if line.strip().startswith("sqlite3 ")]


def test_readme_sqlite3_commands_run_as_written(tmp_path):
    if not shutil.which("sqlite3"):
        pytest.fail("the sqlite3 CLI is missing: .ci/deps installs it")
    db_path = tmp_path / "data" / "imgworker.db"
    db_path.parent.mkdir()
    q = SqliteStore(db_path)
    q.migrate()
    q.enqueue([NewJob("a" * 32, "/in", "cat.jpg", 1), NewJob("b" * 32, "/in", "dog.png", 1, priority=5),
               NewJob("c" * 32, "/in", "bad.gif", 1), NewJob("d" * 32, "/in", "done.jpg", 1, priority=9)], 10, 1)
    q.complete(q.claim("sup", 1000).id, "sup", make_outcome(123, output_size=4567), "/out")  # the priority-9 one
    job = q.claim("sup", 1000)  # the priority-5 dog
    q.fail(job.id, "sup", "INVALID_IMAGE", "corrupt GIF", False, RetryPolicy())
    q.claim("sup", 1000)  # cat is now processing
    q.heartbeat("sup", "host", 1, 0, {"paused": False})
    commands = sqlite_commands()
    assert len(commands) >= 5
    outputs = []
    for line in commands:
        args = shlex.split(line.replace("<jobId>", "a" * 32))
        args = [str(db_path) if a == "data/imgworker.db" else a for a in args]
        proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and not proc.stderr, (line, proc.stderr)
        outputs.append(proc.stdout)
    by_status, waiting, failures, running, completed, one, sups = outputs
    assert re.search(r"failed\s+1", by_status) and re.search(r"processing\s+1", by_status)
    assert "c" * 32 in waiting and "a" * 32 not in waiting
    assert "corrupt GIF" in failures and "INVALID_IMAGE" in failures and "dog.png" in failures
    assert "cat.jpg" in running
    assert "d" * 32 in completed and "4567" in completed and "123" in completed
    assert "status = processing" in one.replace("  ", " ") or re.search(r"status\s+=\s+processing", one)
    assert "sup" in sups


def test_readme_psql_commands_run_as_written(pg_url, tmp_path):
    """The psql lines beside the sqlite3 ones work on the PostgreSQL store."""
    from imgworker.store.postgres import PgStore

    psql = shutil.which("psql") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))), None)
    if psql is None:
        pytest.fail("psql is missing: .ci/deps installs postgresql")
    q = PgStore(pg_url)
    q.migrate()
    q.enqueue([NewJob("a" * 32, "/in", "cat.jpg", 1), NewJob("b" * 32, "/in", "dog.png", 1, priority=5),
               NewJob("c" * 32, "/in", "bad.gif", 1)], 10, 1)
    job = q.claim("sup", 1000)
    q.fail(job.id, "sup", "INVALID_IMAGE", "corrupt GIF", False, RetryPolicy())
    q.claim("sup", 1000)
    q.heartbeat("sup", "host", 1, 0, {"paused": False})
    q.close()
    commands = [line.strip() for line in README.splitlines() if line.strip().startswith("psql ")]
    assert len(commands) >= 7
    outputs = []
    for line in commands:
        args = shlex.split(line.replace("<jobId>", "a" * 32).replace('"$DATABASE_URL"', "DBURL"))
        args = [str(psql) if a == "psql" else pg_url if a == "DBURL" else a for a in args]
        proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and not proc.stderr, (line, proc.stderr)
        outputs.append(proc.stdout)
    by_status, waiting, failures, running, one, nodes, leases = outputs
    assert re.search(r"failed\s+\|\s+1", by_status) and re.search(r"processing\s+\|\s+1", by_status)
    assert "c" * 32 in waiting and "a" * 32 not in waiting
    assert "corrupt GIF" in failures and "INVALID_IMAGE" in failures and "dog.png" in failures
    assert "cat.jpg" in running
    assert re.search(r"status\s+\|\s+processing", one)
    assert "supervisor" in nodes and "sup" in nodes
    assert "a" * 32 in leases and "sup" in leases
