"""Queue benchmark: claim+complete throughput and submit->claim latency.

    .venv/bin/python bench/queue_bench.py [--jobs 20000]

Prints (1) no-op jobs claimed and completed by 2 processes through
imgworker's JobQueue as the supervisor does it (complete + next claim in one
transaction), against a bare SQLite WAL queue (one table, the same
UPDATE ... RETURNING claim, a claim and a complete transaction per job) in
the same run, and (2) submit->claim latency at
a steady 200 jobs/s with one claimer polling the queue as the supervisor does
(woken by the same datagram the API sends). Targets: >= 5,000/s, p50 <= 10 ms.
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
from imgworker import wakeup  # noqa: E402
from imgworker.queue import JobQueue, NewJob  # noqa: E402


def imgworker_claimer(path: str, owner: str, start, out) -> None:
    q = JobQueue(path, durable=False)  # the supervisor's setting
    start.wait()
    n = 0
    job = q.claim(owner, 60_000)
    while job is not None:  # the supervisor's path: settle + next claim in one commit
        _, job = q.complete_and_claim(job["id"], owner, {"processingTime": 0}, "", 60_000)
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


def throughput(jobs: int) -> None:
    d = Path(tempfile.mkdtemp())
    q = JobQueue(d / "q.db")
    q.migrate()
    for i in range(0, jobs, 1000):
        q.enqueue([NewJob(f"j{k}", "/in", "x.jpg", 1) for k in range(i, min(jobs, i + 1000))], 10**9, 1)
    q.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # start both runs from a folded-in database
    ours = run_claimers(imgworker_claimer, str(d / "q.db"), jobs)
    bare = sqlite3.connect(d / "bare.db", isolation_level=None)
    bare.execute("PRAGMA journal_mode=WAL")
    bare.executescript(BARE_SCHEMA)
    bare.executemany("INSERT INTO q (status, priority, payload) VALUES ('queued', 0, '{}')", [()] * jobs)
    base = run_claimers(bare_claimer, str(d / "bare.db"), jobs)
    print(f"claim+complete, 2 processes, {jobs} no-op jobs:")
    print(f"  imgworker JobQueue : {ours:8.0f} jobs/s")
    print(f"  bare SQLite queue  : {base:8.0f} jobs/s   (same run)")
    print(f"  ratio              : {ours / base:.2f}")


def latency_claimer(path: str, ready, stop, out) -> None:
    """Claims like the supervisor: sleep on the wake-up socket (0.25 s poll)."""
    import selectors

    q = JobQueue(path, durable=False)
    sock = wakeup.listen(path)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    ready.set()
    lags = []
    while not stop.is_set():
        while (job := q.claim("lat", 60_000)) is not None:
            lags.append(job["started_at"] - job["created_at"] + (time.time() * 1000 - job["started_at"]))
            q.complete(job["id"], "lat", {}, "")
        sel.select(0.25)
        wakeup.drain(sock)
    out.put(lags)


def latency(rate: int = 200, seconds: float = 5.0) -> None:
    d = Path(tempfile.mkdtemp())
    path = str(d / "lat.db")
    q = JobQueue(path)  # the API's (durable) setting
    q.migrate()
    ctx = mp.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    p = ctx.Process(target=latency_claimer, args=(path, ready, stop, out))
    p.start()
    ready.wait()
    n = int(rate * seconds)
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / rate
        while (now := time.perf_counter()) < due:
            time.sleep(min(0.002, due - now))
        q.enqueue([NewJob(f"l{i}", "/in", "x.jpg", 1)], 10**9, 1)
        wakeup.notify(path)
    time.sleep(0.5)
    stop.set()
    lags = out.get()
    p.join()
    print(f"submit->claim at a steady {rate} jobs/s for {seconds:.0f} s (durable enqueue + wake-up datagram):")
    print(f"  {summary(lags)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=20000)
    args = ap.parse_args()
    print(f"SQLite {sqlite3.sqlite_version}; journal_mode=WAL, busy_timeout=10000 ms, synchronous=NORMAL for the"
          " claimers (supervisor), FULL for enqueue (API); BEGIN IMMEDIATE for every write; cores: "
          f"{os.cpu_count()}")
    throughput(args.jobs)
    latency()


if __name__ == "__main__":
    main()
