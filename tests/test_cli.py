"""Operator commands against a real database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from conftest import make_outcome
from helpers import image_bytes
from imgworker.housekeeping import Housekeeper
from imgworker.store import RetryPolicy
from imgworker.store.sqlite import SqliteStore


def cli(tmp_path, *args, env=None):
    full = {"PATH": os.environ["PATH"], "DATA_DIR": str(tmp_path / "data"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "imgworker", *args], cwd=tmp_path, capture_output=True,
                          text=True, env=full, timeout=60)


def test_migrate_status_and_idempotence(tmp_path):
    assert "pending" in cli(tmp_path, "migrate", "--status").stdout
    first = cli(tmp_path, "migrate")
    assert first.returncode == 0 and "applied 0001_jobs.sql" in first.stdout
    assert "up to date" in cli(tmp_path, "migrate").stdout
    status = cli(tmp_path, "migrate", "--status").stdout
    assert "pending" not in status and "0001  jobs" in status


def test_jobs_job_cancel_retry_stats(tmp_path):
    cli(tmp_path, "migrate")
    q = SqliteStore(tmp_path / "data" / "imgworker.db")
    from imgworker.store import NewJob

    upload, other = tmp_path / "data" / "uploads" / "u.jpg", tmp_path / "data" / "uploads" / "v.jpg"
    upload.write_bytes(image_bytes())
    other.write_bytes(image_bytes())
    q.enqueue([NewJob("a" * 32, str(upload), "cat.jpg", 10), NewJob("b" * 32, str(other), "dog.jpg", 10)], 10, 1)
    job = q.claim("sup", 1000)
    q.fail(job.id, "sup", "INVALID_IMAGE", "broken", False, RetryPolicy())
    listing = cli(tmp_path, "jobs")
    assert listing.returncode == 0 and "cat.jpg" in listing.stdout and "INVALID_IMAGE" in listing.stdout
    assert "STATUS" in listing.stdout.splitlines()[0]
    as_json = json.loads(cli(tmp_path, "jobs", "--status", "failed", "--json").stdout)
    assert [j["id"] for j in as_json] == ["a" * 32]
    detail = cli(tmp_path, "job", "a" * 32).stdout
    assert "INVALID_IMAGE: broken" in detail and "failed" in detail
    assert cli(tmp_path, "job", "f" * 32).returncode == 1
    assert cli(tmp_path, "cancel", "a" * 32).returncode == 1  # failed, not cancellable
    assert cli(tmp_path, "cancel", "b" * 32).returncode == 0
    assert q.get("b" * 32).status == "cancelled" and not other.exists()  # bug 9: a cancelled job's upload goes
    assert upload.exists()  # a failed job keeps its upload: it can be retried
    assert cli(tmp_path, "retry", "a" * 32).returncode == 0
    assert q.get("a" * 32).status == "queued"
    stats = json.loads(cli(tmp_path, "stats", "--json").stdout)
    assert stats["totalJobs"] == 2 and stats["byStatus"]["cancelled"] == 1
    assert "currentQueueSize" in cli(tmp_path, "stats").stdout


def test_cleanup_removes_expired_jobs_and_orphans(tmp_path):
    cli(tmp_path, "migrate")
    data = tmp_path / "data"
    q = SqliteStore(data / "imgworker.db")
    from imgworker.store import NewJob

    upload = data / "uploads" / ("c" * 32 + "-1.jpg")
    upload.write_bytes(b"x")
    out = data / "processed" / ("processed_" + "c" * 32 + ".webp")
    out.write_bytes(b"y")
    q.enqueue([NewJob("c" * 32, str(upload), "x.jpg", 1)], 10, 1)
    job = q.claim("s", 1000)
    q.complete(job.id, "s", make_outcome(), str(out), now=int(time.time() * 1000) - 10_000)
    orphan = data / "uploads" / ("d" * 32 + f"-{os.getpid()}.png")
    orphan.write_bytes(b"z")
    tmp_orphan = data / "tmp" / "upload-old"
    tmp_orphan.write_bytes(b"z")
    fresh_tmp = data / "tmp" / "upload-new"
    fresh_tmp.write_bytes(b"z")
    old = time.time() - 3600
    for p in (orphan, tmp_orphan):
        os.utime(p, (old, old))
    r = cli(tmp_path, "cleanup", env={"JOB_RETENTION_MS": "5000"})
    assert r.returncode == 0 and "removed 1 expired jobs and 4 files" in r.stdout
    assert not upload.exists() and not out.exists() and not orphan.exists() and not tmp_orphan.exists()
    assert fresh_tmp.exists() and q.get("c" * 32) is None
    assert q.stats().completed == 1  # the total survives the cleanup


def test_help_lists_commands(tmp_path):
    r = cli(tmp_path, "--help")
    for command in ("serve", "api", "worker", "migrate", "process", "jobs", "job", "retry", "cancel", "stats", "cleanup"):
        assert command in r.stdout
    assert cli(tmp_path, "frobnicate").returncode == 2


def test_cleanup_sweeps_uploads_of_dead_processes_at_once(tmp_path):
    from imgworker.storage import Storage

    storage = Storage(tmp_path / "data")
    storage.ensure()
    q = SqliteStore(tmp_path / "data" / "imgworker.db")
    q.migrate()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = dead.stdout.strip()
    orphan = storage.tmp / f"upload-{dead_pid}-abc"
    mine = storage.tmp / f"upload-{os.getpid()}-def"
    no_row = storage.uploads / f"{'e' * 32}-{dead_pid}.jpg"      # its transaction never committed
    committed = storage.uploads / f"{'f' * 32}-{dead_pid}.jpg"   # its row is there
    in_flight = storage.uploads / f"{'a' * 32}-{os.getpid()}.jpg"  # a live process may still commit it
    from imgworker.store import NewJob

    q.enqueue([NewJob("f" * 32, str(committed), "x.jpg", 1)], 10, 1)
    for p in (orphan, mine, no_row, committed, in_flight):
        p.write_bytes(b"bytes")
    assert Housekeeper(q, storage).sweep_dead() == 2
    assert not orphan.exists() and not no_row.exists()
    assert mine.exists() and committed.exists() and in_flight.exists()
    # the API's start also removes a finished job's upload that a crash left (the
    # supervisor died between completing the row and removing the upload)
    queued = storage.uploads / f"{'b' * 32}-{dead_pid}.jpg"
    q.enqueue([NewJob("b" * 32, str(queued), "x.jpg", 1)], 10, 1)
    queued.write_bytes(b"bytes")
    assert q.claim("s", 1000).id == "f" * 32
    assert q.complete("f" * 32, "s", make_outcome(), "/out")
    assert Housekeeper(q, storage).sweep_dead() == 0  # the periodic sweep reads no rows
    assert Housekeeper(q, storage).sweep_dead(finished=True) == 1
    assert not committed.exists() and queued.exists()


def test_read_only_commands_never_create_a_database(tmp_path):
    db_path = tmp_path / "data" / "imgworker.db"
    for args in (("jobs",), ("job", "a" * 32), ("stats",), ("stats", "--json")):
        r = cli(tmp_path, *args)
        assert r.returncode == 1 and r.stdout == ""
        assert f"no database at {db_path}" in r.stderr and "imgworker migrate" in r.stderr
        assert not db_path.exists()


def test_read_only_commands_refuse_an_unmigrated_database_and_name_the_one_they_read(tmp_path):
    from imgworker import db

    (tmp_path / "data").mkdir()
    db_path = tmp_path / "data" / "imgworker.db"
    db.migrate(db.connect(db_path), target=1)
    r = cli(tmp_path, "stats")
    assert r.returncode == 1 and "needs" in r.stderr and "imgworker migrate" in r.stderr
    assert db.pending_migrations(db.connect(db_path))  # still not migrated
    cli(tmp_path, "migrate")
    r = cli(tmp_path, "jobs")
    assert r.returncode == 0 and f"database {db_path}" in r.stderr and r.stdout.strip() == "no jobs"
