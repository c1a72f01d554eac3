"""Queue benchmark: claim+complete throughput and submit->claim latency,
for both job stores.

    .venv/bin/python bench/queue_bench.py [--jobs 20000] [--store sqlite|postgres|both]

Prints (1) no-op jobs claimed and completed by 1, 2 and 4 processes through
each store as the supervisor does it (complete + next claim in one
transaction); for SQLite also against a bare SQLite WAL queue (one table, the
same UPDATE ... RETURNING claim, a claim and a complete transaction per job)
with 2 processes in the same run; and (2) submit->claim latency at a steady
200 jobs/s with one claimer sleeping as the supervisor does, woken by the
store's wake-up (the datagram on SQLite, LISTEN/NOTIFY on PostgreSQL).
PostgreSQL runs on a private server started for the run from Debian's
binaries (tests/pg.py) with its durable defaults (fsync on; the API's
connection commits synchronously, the supervisor's with synchronous_commit
off, as the store does). Targets: SQLite >= 5,000/s with 2; PostgreSQL
>= 3,000/s with 4; p50 <= 10 ms.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import summary  # noqa: E402
from imgworker.model import Outcome  # noqa: E402
from imgworker.store import NewJob  # noqa: E402
from imgworker.store.sqlite import SqliteStore  # noqa: E402

NOOP = Outcome(0, "jpeg", 1, 1, 1, "webp", 1, 1, 1)  # what a no-op job reports


def open_store(spec: str, durable: bool):
    """A store from a path (SQLite) or a postgresql:// URL."""
    if spec.startswith("postgresql://"):
        from imgworker.store.postgres import PgStore

        return PgStore(spec, durable=durable)
    return SqliteStore(spec, durable=durable)


def imgworker_claimer(path: str, owner: str, start, out) -> None:
    q = open_store(path, durable=False)  # the supervisor's setting
    start.wait()
    n = 0
    job = q.claim(owner, 60_000)
    while job is not None:  # the supervisor's path: settle + next claim in one commit
        _, job = q.complete_and_claim(job.id, owner, NOOP, "", 60_000)
        n += 1
    out.put(n)


BARE_SCHEMA = """CREATE TABLE q (id INTEGER PRIMARY KEY, status TEXT NOT NULL, priority INTEGER NOT NULL, payload TEXT);
CREATE INDEX q_claim ON q (priority DESC, id) WHERE status = 'queued';"""


def bare_claimer(path: str, owner: str, start, out) -> None:
    c = sqlite3.connect(path, isolation_level=None, timeout=10)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=NORMAL")
    start.wait()
    n = 0
    while True:
        c.execute("BEGIN IMMEDIATE")
        row = c.execute("UPDATE q SET status = 'running' WHERE id = (SELECT id FROM q WHERE status = 'queued'"
                        " ORDER BY priority DESC, id LIMIT 1) RETURNING id").fetchone()
        c.execute("COMMIT")
        if row is None:
            break
        c.execute("BEGIN IMMEDIATE")
        c.execute("UPDATE q SET status = 'done' WHERE id = ?", row)
        c.execute("COMMIT")
        n += 1
    out.put(n)


def run_claimers(target, path: str, jobs: int, procs: int = 2) -> float:
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=target, args=(path, f"p{i}", start, out)) for i in range(procs)]
    for w in workers:
        w.start()
    time.sleep(1.0)  # let them import and connect
    t0 = time.perf_counter()
    start.set()
    done = sum(out.get() for _ in workers)
    elapsed = time.perf_counter() - t0
    for w in workers:
        w.join()
    assert done == jobs, (done, jobs)
    return jobs / elapsed


def fill(spec: str, jobs: int, prefix: str) -> None:
    q = open_store(spec, durable=True)
    q.migrate()
    for i in range(0, jobs, 1000):
        q.enqueue([NewJob(f"{prefix}{k}", "/in", "x.jpg", 1) for k in range(i, min(jobs, i + 1000))], 10**9, 1)
    if isinstance(q, SqliteStore):
        q.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # start each run from a folded-in database
    q.close()


def throughput(name: str, spec: str, jobs: int, bare_path: str | None = None) -> None:
    print(f"claim+complete, {jobs} no-op jobs, {name}:")
    for procs in (1, 2, 4):
        fill(spec, jobs, f"t{procs}-")
        rate = run_claimers(imgworker_claimer, spec, jobs, procs)
        print(f"  {procs} claiming process{'es' if procs > 1 else '  '}: {rate:8.0f} jobs/s")
    if bare_path:
        bare = sqlite3.connect(bare_path, isolation_level=None)
        bare.execute("PRAGMA journal_mode=WAL")
        bare.executescript(BARE_SCHEMA)
        bare.executemany("INSERT INTO q (status, priority, payload) VALUES ('queued', 0, '{}')", [()] * jobs)
        base = run_claimers(bare_claimer, bare_path, jobs)
        print(f"  bare SQLite queue, 2 processes: {base:8.0f} jobs/s   (same run)")


def latency_claimer(spec: str, ready, stop, out) -> None:
    """Claims like the supervisor: sleeps on the store's wake-up (0.25 s poll)."""
    import selectors

    q = open_store(spec, durable=False)
    wake = q.listen()
    sel = selectors.DefaultSelector()
    sel.register(wake, selectors.EVENT_READ)
    ready.set()
    lags = []
    while not stop.is_set():
        while (job := q.claim("lat", 60_000)) is not None:
            lags.append(time.time() * 1000 - job.created_at)
            q.complete(job.id, "lat", NOOP, "")
        sel.select(0.25)
        wake.drain()
    out.put(lags)


def latency(name: str, spec: str, rate: int = 200, seconds: float = 5.0) -> None:
    q = open_store(spec, durable=True)  # the API's (durable) setting
    q.migrate()
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    p = ctx.Process(target=latency_claimer, args=(spec, ready, stop, out))
    p.start()
    ready.wait()
    n = int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(0.002, due - now))
        q.enqueue([NewJob(f"l{i}", "/in", "x.jpg", 1)], 10**9, 1)
        q.notify()
    time.sleep(0.5)
    stop.set()
    lags = out.get()
    p.join()
    q.close()
    wake = "LISTEN/NOTIFY" if spec.startswith("postgresql://") else "wake-up datagram"
    print(f"submit->claim, {name}, at a steady {rate} jobs/s for {seconds:.0f} s (durable enqueue + {wake}):")
    print(f"  {summary(lags)}")


def postgres_server():
    """A private PostgreSQL server with durable defaults (fsync on)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import pg

    bindir = pg.find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL binaries not found (apt-get install postgresql)")
    return pg.PgServer(bindir, options="-c listen_addresses='' -c max_connections=50 -c shared_buffers=128MB").start()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--store", choices=("sqlite", "postgres", "both"), default="both")
    args = ap.parse_args()
    print(f"cores: {os.cpu_count()}")
    if args.store in ("sqlite", "both"):
        print(f"SQLite {sqlite3.sqlite_version}; journal_mode=WAL, busy_timeout=10000 ms, synchronous=NORMAL for the"
              " claimers (supervisor), FULL for enqueue (API); BEGIN IMMEDIATE for every write")
        d = Path(tempfile.mkdtemp())
        throughput("SQLite", str(d / "q.db"), args.jobs, bare_path=str(d / "bare.db"))
        latency("SQLite", str(d / "lat.db"))
    if args.store in ("postgres", "both"):
        server = postgres_server()
        try:
            import psycopg

            with psycopg.connect(server.url()) as c:
                print(f"PostgreSQL {c.info.server_version // 10000}; fsync on; claimers synchronous_commit=off,"
                      " enqueue synchronous_commit=on; FOR UPDATE SKIP LOCKED claims")
            throughput("PostgreSQL", server.create_database(), args.jobs)
            latency("PostgreSQL", server.create_database())
        finally:
            server.stop()


if __name__ == "__main__":
    main()
