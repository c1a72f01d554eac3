"""The PostgreSQL side: settings, migrations, `imgworker migrate` on a real
private server (tests/pg.py)."""

from __future__ import annotations

import os
import time
from pathlib import Path
import subprocess
import sys

import pytest

from conftest import make_outcome
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
    pgdb.migrate(conn, target=3)  # rows written before 0004 (the result as JSONB) go through the upgrade
    conn.execute(
        "INSERT INTO jobs (id, status, max_attempts, run_at, created_at, input_path, original_name, input_size,"
        " completed_at, error_code, error, result)"
        " VALUES ('a', 'failed', 1, 0, 1700000000000, '/in', 'cat.jpg', 5, 1700000001000, 'X', 'boom', NULL),"
        "        ('b', 'completed', 1, 0, 1700000000000, '/in', 'dog.png', 6, 1700000002000, NULL, NULL,"
        "         '{\"processingTime\": 42}')")
    pgdb.migrate(conn)
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
    for command in ("migrate", "serve", "stats", "worker", "api"):
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


# -- the PostgreSQL store beyond the shared contract (tests/test_store_contract.py) ----------
def _pg_store(url, **kw):
    from imgworker.store.postgres import PgStore

    q = PgStore(url, **kw)
    q.migrate()
    return q


def _jobs(n, prefix="j", priority=0):
    from imgworker.store import NewJob

    return [NewJob(f"{prefix}{i:04d}", "/in", "x.jpg", 1, priority=priority) for i in range(n)]


def test_concurrent_claimers_never_share_a_job(pg_url):
    """8 claimers in separate processes' worth of connections (threads, one
    connection each) drain 400 jobs: each job is claimed exactly once."""
    import threading

    q = _pg_store(pg_url)
    q.enqueue(_jobs(400), 1000, 1)
    claimed: list[list[str]] = [[] for _ in range(8)]

    def claimer(k):
        while (job := q.claim(f"owner-{k}", 60000)) is not None:
            assert q.complete(job.id, f"owner-{k}", make_outcome(1), "/out")
            claimed[k].append(job.id)

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [i for part in claimed for i in part]
    assert sorted(flat) == sorted(j.id for j in _jobs(400)) and len(set(flat)) == 400
    assert sum(1 for part in claimed if part) > 1  # the work really was shared
    assert q.stats().completed == 400
    q.close()


def test_a_node_back_after_its_lease_expired_cannot_settle(pg_url):
    from imgworker.clock import now_ms
    from imgworker.store import Recovered, RetryPolicy

    q = _pg_store(pg_url)
    q.enqueue(_jobs(1), 10, 3)
    t = now_ms()
    stale = q.claim("node-a", 1000, now=t)
    # node-a goes silent; after its lease, node-b's recovery takes the job back and node-b runs it
    assert q.recover([], RetryPolicy(0, 0), now=t + 1001) == [Recovered(stale.id, "retrying")]
    fresh = q.claim("node-b", 1000, now=t + 1002)
    assert fresh.id == stale.id and fresh.attempts == 2
    # node-a comes back and tries to settle its old attempt: refused, the row is node-b's
    assert q.complete(stale.id, "node-a", make_outcome(1), "/out-a") is False
    assert q.fail(stale.id, "node-a", "INVALID_IMAGE", "late", False, RetryPolicy()) is None
    assert q.release(stale.id, "node-a") is False
    assert q.complete(fresh.id, "node-b", make_outcome(1), "/out-b") is True
    assert q.get(fresh.id).output_path == "/out-b"
    q.close()


def test_enqueue_wakes_a_listener_on_another_connection(pg_url):
    import selectors

    q = _pg_store(pg_url)
    listener = q.listen()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    assert sel.select(0.05) == []
    t = time.monotonic()
    other = _pg_store(pg_url)  # another node's API
    other.enqueue(_jobs(1), 10, 1)
    assert sel.select(5) and listener.drain()
    assert time.monotonic() - t < 1
    assert sel.select(0.05) == []  # drained
    listener.close()
    q.close()
    other.close()


def test_store_survives_a_server_restart(pg_url, pg_server):
    q = _pg_store(pg_url, durable=False)
    q.enqueue(_jobs(3), 10, 1)
    job = q.claim("node", 60000)
    listener = q.listen()
    pg_server.ctl("restart")
    # the old connections are gone; the next calls reconnect and carry on
    assert q.complete(job.id, "node", make_outcome(1), "/out") is True
    assert q.claim("node", 60000).id == "j0001"
    assert listener.drain() is False  # the listener notices and is replaced by the caller
    listener.close()
    q.close()


class _LoseReply:
    """Stands in for a store's connection: the first statement containing
    ``marker`` runs (and commits: the connection is in autocommit) or, with
    ``run`` False, does not; then the connection is closed and the caller
    gets psycopg.OperationalError, as when the server's reply was lost. The
    store's _run then reconnects and replays on a real connection."""

    def __init__(self, conn, marker, run):
        self._conn, self._marker, self._run = conn, marker, run
        self.tripped = False

    def execute(self, query, params=None, **kw):
        import psycopg

        if not self.tripped and self._marker in str(query):
            self.tripped = True
            if self._run:
                self._conn.execute(query, params, **kw)
            self._conn.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return self._conn.execute(query, params, **kw)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def _lose_next_reply(q, marker, run=True):
    proxy = _LoseReply(q.conn, marker, run)  # q.conn: this thread's real connection, opened now
    q._local.conn = proxy
    return proxy


_CLAIM_SQL = "UPDATE jobs SET status = 'processing'"
_COMPLETE_AND_CLAIM_SQL = "WITH done AS (UPDATE jobs SET status = 'completed'"


def _ids(q, status):
    return sorted(j.id for j in q.list(status))


@pytest.mark.parametrize("committed", [True, False], ids=["reply-lost", "lost-before"])
def test_a_replayed_claim_returns_the_job_the_lost_attempt_claimed(pg_url, monkeypatch, committed):
    """Two claims in the same ms; the second one's connection is lost after
    its statement committed (the replay must return that job, not claim a
    third) or before it ran (the replay must claim, once)."""
    import imgworker.store.postgres as pgstore
    from imgworker.clock import now_ms

    q = _pg_store(pg_url)
    q.enqueue(_jobs(3), 10, 3)
    t = now_ms()
    monkeypatch.setattr(pgstore, "now_ms", lambda: t)  # the clock stands still
    first = q.claim("node", 60000)
    proxy = _lose_next_reply(q, _CLAIM_SQL, run=committed)
    second = q.claim("node", 60000)
    assert proxy.tripped
    assert (first.id, first.started_at) == ("j0000", t)
    # started_at stays the clock; the second claim in that ms has a lease 1 ms longer, to be told apart
    assert (second.id, second.started_at, second.lease_expires_at) == ("j0001", t, t + 60000 + 1)
    assert second.attempts == 1 and second.lease_owner == "node"
    assert _ids(q, "processing") == ["j0000", "j0001"]
    assert _ids(q, "queued") == ["j0002"] and q.get("j0002").attempts == 0
    q.close()


@pytest.mark.parametrize("committed", [True, False], ids=["reply-lost", "lost-before"])
@pytest.mark.parametrize("waiting", [1, 0])
def test_a_replayed_complete_and_claim_answers_what_the_lost_attempt_did(pg_url, monkeypatch, committed, waiting):
    """Settle-and-claim in the same ms as two earlier claims of the node, its
    connection lost after the commit or before the statement ran: the
    replay reports the completion done and returns the one job claimed."""
    import imgworker.store.postgres as pgstore
    from imgworker.clock import now_ms

    q = _pg_store(pg_url)
    q.enqueue(_jobs(2 + 2 * waiting), 10, 3)
    t = now_ms()
    monkeypatch.setattr(pgstore, "now_ms", lambda: t)
    job, other = q.claim("node", 60000), q.claim("node", 60000)
    assert (job.id, other.id) == ("j0000", "j0001")
    proxy = _lose_next_reply(q, _COMPLETE_AND_CLAIM_SQL, run=committed)
    done, following = q.complete_and_claim(job.id, "node", make_outcome(7), "/out/j0000.webp", 60000,
                                           attempt=job.attempts)
    assert proxy.tripped
    assert done is True  # the supervisor learns its outcome was written
    finished = q.get(job.id)
    assert finished.status == "completed" and finished.output_path == "/out/j0000.webp"
    assert finished.outcome.processing_ms == 7 and finished.attempts == 1 and finished.completed_at == t
    if waiting:
        assert (following.id, following.lease_owner, following.attempts) == ("j0002", "node", 1)
        assert (following.started_at, following.lease_expires_at) == (t, t + 60000 + 2)
        assert _ids(q, "processing") == ["j0001", "j0002"]
        assert _ids(q, "queued") == ["j0003"] and q.get("j0003").attempts == 0
    else:
        assert following is None and _ids(q, "processing") == ["j0001"]
    q.close()


def test_a_replayed_completion_reports_it_completed(pg_url):
    q = _pg_store(pg_url)
    q.enqueue(_jobs(1), 10, 3)
    job = q.claim("node", 60000)
    proxy = _lose_next_reply(q, "UPDATE jobs SET status = 'completed'")
    assert q.complete(job.id, "node", make_outcome(3), "/out/j0000.webp", attempt=job.attempts) is True
    assert proxy.tripped and q.get(job.id).status == "completed"
    # a second completion (no replay: the job is no longer processing) is refused as before
    assert q.complete(job.id, "node", make_outcome(3), "/out/j0000.webp", attempt=job.attempts) is False
    q.close()


def test_rate_limit_holds_across_api_nodes(api_server, pg_url):
    from helpers import image_bytes

    settings = dict(DATABASE_URL=pg_url, RATE_LIMIT_MAX_REQUESTS=5, RATE_LIMIT_WINDOW_MS=60000)
    a, _ = api_server(**settings)
    b, _ = api_server(**settings)
    photo = image_bytes("PNG", (20, 20))
    statuses = [(a if i % 2 else b).upload(files=[("image", "x.png", photo)]).status for i in range(6)]
    assert statuses == [202] * 5 + [429]
    # each node now refuses the client from the request headers alone, before reading a body
    for node in (a, b):
        r = node.upload(files=[("image", "x.png", photo)])
        assert r.status == 429 and r.json["code"] == "RATE_LIMITED" and int(r.getheader("Retry-After")) > 0
    # a batch cannot carry more past the limit either
    r = a.upload("/api/process/batch", files=[("images", "y.png", photo)] * 2)
    assert r.status == 429


# -- files on a shared DATA_DIR -------------------------------------------------------------
def test_sweeps_leave_other_hosts_files_alone(tmp_path, store):
    from imgworker.housekeeping import Housekeeper
    from imgworker.storage import NODE_TAG, Storage

    storage = Storage(tmp_path / "data")
    storage.ensure()
    dead_pid = 4_000_000  # above any pid this test machine hands out
    other = "0123abcd" if NODE_TAG != "0123abcd" else "fedc9876"
    jid = "a" * 32
    mine_tmp = storage.tmp / f"upload-{dead_pid}.{NODE_TAG}-x1"
    theirs_tmp = storage.tmp / f"upload-{dead_pid}.{other}-x2"
    mine_up = storage.uploads / f"{jid}-{dead_pid}.{NODE_TAG}.jpg"
    theirs_up = storage.uploads / f"{'b' * 32}-{dead_pid}.{other}.jpg"
    for p in (mine_tmp, theirs_tmp, mine_up, theirs_up):
        p.write_bytes(b"x")
    # the other host's pid is "dead" here, but that proves nothing: its upload may be mid-commit
    assert Housekeeper(store, storage).sweep_dead() == 2
    assert not mine_tmp.exists() and not mine_up.exists()
    assert theirs_tmp.exists() and theirs_up.exists()


def test_upload_moves_from_a_local_tmp_dir_on_another_file_system(api_server, tmp_path):
    import tempfile

    from helpers import image_bytes

    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system for TMP_DIR")
    local = tempfile.mkdtemp(dir="/dev/shm", prefix="imgw-tmp-")
    try:
        http, api = api_server(TMP_DIR=local)
        photo = image_bytes("PNG", (30, 20))
        r = http.upload(files=[("image", "x.png", photo)])
        assert r.status == 202
        job = api.store.get(r.json["jobId"])
        assert Path(job.input_path).read_bytes() == photo
        assert Path(job.input_path).parent == tmp_path / "data" / "uploads"
        assert os.listdir(local) == [] and not [p for p in os.listdir(tmp_path / "data" / "uploads")
                                              if p.startswith(".tmp-")]
    finally:
        import shutil

        shutil.rmtree(local, ignore_errors=True)


def _rows_read(plan):
    """Rows every node of an EXPLAIN ANALYZE plan produced, in all its loops."""
    return plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1) + sum(_rows_read(p) for p in plan.get("Plans", ()))


def test_claim_cost_does_not_grow_with_the_backlog(pg_url):
    """The fair claim reads each client's few oldest rows, not the whole
    top-priority backlog (before: every waiting row was ranked by a count of
    its client's running jobs, 129 ms a claim behind 20,000 jobs)."""
    import psycopg

    from imgworker.store import NewJob

    q = _pg_store(pg_url)

    def rows_per_claim():
        with q.conn.transaction():
            plan = q.conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + q._CLAIM,
                                  {"now": 2**62, "owner": "x", "expires": 2**62, "id": None}).fetchone()
            raise psycopg.Rollback()  # measured, not claimed
        return _rows_read(next(iter(plan.values()))[0]["Plan"])

    def add(n, start):
        for i in range(start, start + n, 1000):
            q.enqueue([NewJob(f"j{k}", "/in", "x.jpg", 1, client=f"c{k % 3}")
                       for k in range(i, min(start + n, i + 1000))], 10**9, 1)

    add(60, 0)
    small = rows_per_claim()
    add(6000, 60)
    q.conn.execute("ANALYZE jobs")
    large = rows_per_claim()
    assert large < small + 100, (small, large)  # before: 60 jobs -> 200 rows, 6,060 -> 18,000
    assert q.claim("s", 60_000).id == "j0"  # still the oldest of the client running fewest
    q.close()
