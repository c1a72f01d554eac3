"""The queue under real concurrent processes and SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

from imgworker.store import NewJob
from imgworker.store.sqlite import SqliteStore

CLAIMER = r"""
import json, os, sys, time
from imgworker.model import Outcome
from imgworker.store.sqlite import SqliteStore
q = SqliteStore(sys.argv[1], durable=False)
OUTCOME = Outcome(0, "jpeg", 1, 1, 1, "webp", 1, 1, 1)
owner = sys.argv[2]
open(sys.argv[3] + "." + owner, "w").close()  # ready
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[3]) and time.monotonic() < deadline:  # all start together
    time.sleep(0.005)
got = []
while True:
    job = q.claim(owner, 60000)
    if job is None:
        break
    q.complete(job.id, owner, OUTCOME, "")
    got.append(job.id)
print(json.dumps(got))
"""


def test_four_processes_claim_10000_jobs_exactly_once(tmp_path):
    path = tmp_path / "q.db"
    q = SqliteStore(path)
    q.migrate()
    n = 10_000
    q.enqueue([NewJob(f"j{i}", "/in", "x.jpg", 1) for i in range(n)], n, 1)
    go = tmp_path / "go"
    procs = [
        subprocess.Popen([sys.executable, "-c", CLAIMER, str(path), f"p{k}", str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(4)
    ]
    # a process that imports slowly on a loaded machine would otherwise find the queue empty
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"go.p{k}").exists() for k in range(4)) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    claimed = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "locked" not in err
        ids = json.loads(out)
        assert ids, "every process should win some claims"
        claimed.extend(ids)
    assert len(claimed) == n
    assert set(claimed) == {f"j{i}" for i in range(n)}
    s = q.stats()
    assert s.completed == n and s.by_status["completed"] == n


WRITER = r"""
import sys
from imgworker.store import NewJob
from imgworker.store.sqlite import SqliteStore
q = SqliteStore(sys.argv[1])
i = 0
print("ready", flush=True)
while True:
    q.enqueue([NewJob(f"w{i}-{k}", "/in", "x", 1) for k in range(50)], 10**9, 1)
    i += 1
"""


def test_sigkill_mid_write_leaves_database_consistent(tmp_path):
    path = tmp_path / "q.db"
    q = SqliteStore(path)
    q.migrate()
    q.close()
    for round_ in range(5):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.07 * round_)  # let it be mid-stream of transactions
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
        total = conn.execute("SELECT value FROM counters WHERE name = 'jobs_total'").fetchone()[0]
        conn.close()
        # Each transaction inserts 50 rows and bumps the counter by 50:
        # a torn write would break either equality.
        assert rows % 50 == 0 and rows == total
    assert rows > 0
