"""The durable priority queue: the one module that holds SQL (besides migrations).

Storage contract (SQLite today; a PostgreSQL backend with ``FOR UPDATE SKIP
LOCKED`` would implement the same methods):

- A job row moves ``queued -> processing -> completed``; a transient failure
  sends it to ``retrying`` (claimable again once ``run_at`` has come); a
  deterministic failure, or a transient one with no attempts left, ends it
  ``failed``. ``queued``/``retrying`` jobs can be ``cancelled``.
- Claim order: highest ``priority`` first, then arrival order (``seq``).
- A claimed job carries a lease (owner + expiry). Only the lease owner can
  complete, fail or release it; a lease that expired or whose owner died is
  taken back by :meth:`JobQueue.recover`, which counts the spent attempt.
- Every write is one ``BEGIN IMMEDIATE`` transaction (see db.write).

Times are integer milliseconds since the Unix epoch (wall clock, because they
are stored and compared across processes and restarts).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import db, wakeup
from .errors import Conflict, NotFound, QueueFull

STATUSES = ("queued", "processing", "completed", "failed", "retrying", "cancelled")
FINISHED = ("completed", "failed", "cancelled")


def now_ms() -> int:
    return int(time.time() * 1000)


def backoff_ms(attempt: int, base_ms: int, max_ms: int, rng: random.Random | None = None) -> int:
    """Delay before retry number ``attempt`` (1-based): base x 2^(attempt-1),
    plus up to 20 % jitter so that jobs failing together do not retry in
    lockstep, capped at ``max_ms``."""
    raw = base_ms * (2 ** max(0, attempt - 1))
    jitter = (rng or random).random() * 0.2 * raw
    return int(min(max_ms, raw + jitter))


@dataclass
class NewJob:
    """What the API hands to :meth:`JobQueue.enqueue`."""

    id: str
    input_path: str
    original_name: str
    input_size: int
    input_format: str | None = None
    priority: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    batch_id: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    base_ms: int = 1000
    max_ms: int = 60000
    # The supervisor's attempt limit (MAX_RETRIES + 1), applied when a failure
    # is settled, so a reload reaches jobs queued before it; None: the limit
    # written on the row when it was queued.
    max_attempts: int | None = None


def _decode(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    job = dict(row)
    job["options"] = json.loads(job["options"] or "{}")
    job["result"] = json.loads(job["result"]) if job.get("result") else None
    return job


# The dashboard's reads, in SQL both stores speak ({p}: the placeholder),
# and the shapes the API answers with.
ACTIVITY_SQL = (
    "SELECT (completed_at / 60000) * 60000 AS minute,"
    " sum(CASE WHEN status = 'completed' THEN 1 ELSE 0 END) AS completed,"
    " sum(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed,"
    " avg(CASE WHEN status = 'completed' THEN completed_at - started_at END) AS avg_ms"
    " FROM jobs WHERE status IN ('completed', 'failed') AND completed_at >= {p}"
    " GROUP BY minute ORDER BY minute"
)
BY_PRIORITY_SQL = (
    "SELECT priority, status, count(*) AS n FROM jobs WHERE status IN ('queued', 'retrying', 'processing')"
    " GROUP BY priority, status ORDER BY priority DESC"
)
FAILURES_SQL = (
    "SELECT id, original_name, error_code, error, completed_at, attempts FROM jobs WHERE status = 'failed'"
    " ORDER BY completed_at DESC LIMIT {p}"
)


def activity_view(rows: Iterable[Any]) -> list[dict[str, Any]]:
    return [{"minute": int(r["minute"]), "completed": int(r["completed"]), "failed": int(r["failed"]),
             "avgMs": round(r["avg_ms"]) if r["avg_ms"] is not None else None} for r in rows]


def by_priority_view(rows: Iterable[Any]) -> list[dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for r in rows:
        out.setdefault(r["priority"], {"priority": r["priority"], "queued": 0, "retrying": 0, "processing": 0})
        out[r["priority"]][r["status"]] = int(r["n"])
    return list(out.values())


def failures_view(rows: Iterable[Any]) -> list[dict[str, Any]]:
    return [{"jobId": r["id"], "filename": r["original_name"], "code": r["error_code"], "error": r["error"],
             "failedAt": r["completed_at"], "attempts": r["attempts"]} for r in rows]


class JobQueue:
    """All database access of imgworker.

    Each thread gets its own connection, opened lazily in the process that
    uses it and reopened after a fork, so no connection is ever used across
    ``fork`` or shared between threads (a status poll never waits behind an
    upload's write transaction in another API thread).
    """

    def __init__(self, path: Path | str, durable: bool = True):
        self.path = str(path)
        self.durable = durable
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------
    @property
    def conn(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.conn = db.connect(self.path, durable=self.durable)
            local.pid = os.getpid()
            with self._all_lock:
                self._all.append(local.conn)
        return local.conn

    def close(self) -> None:
        """Close every connection this process opened through this queue."""
        with self._all_lock:
            conns, self._all = self._all, []
        for c in conns:
            try:
                c.close()
            except sqlite3.ProgrammingError:
                pass
        self._local = threading.local()

    def migrate(self) -> list[str]:
        return db.migrate(self.conn)

    # -- wake-ups ------------------------------------------------------------
    def notify(self) -> None:
        """Wake a supervisor after jobs became claimable (best effort: the
        abstract-socket datagram of wakeup.py, which reaches this host only)."""
        wakeup.notify(self.path)

    def listen(self) -> "wakeup.Listener | None":
        """Something to select() on that becomes readable on :meth:`notify`
        (None if another supervisor on this host holds it: poll instead)."""
        return wakeup.Listener.bind(self.path)

    def checkpoint(self) -> None:
        """Fold the WAL back into the database file (PASSIVE: never blocks writers)."""
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    # -- producing --------------------------------------------------------
    def enqueue(self, jobs: Iterable[NewJob], max_queue_size: int, max_attempts: int,
                now: int | None = None, before_commit: Callable[[], None] | None = None) -> list[int]:
        """Insert ``jobs`` as ``queued``, all or none; return each one's
        1-based position in claim order.

        Raises QueueFull (and inserts nothing) when queued + retrying jobs
        plus these would exceed ``max_queue_size``. ``before_commit`` runs
        inside the transaction after the inserts (the API moves the uploads
        into place there, so rows and files appear together); if it raises,
        nothing is inserted.
        """
        jobs = list(jobs)
        now = now_ms() if now is None else now
        positions = []
        with db.write(self.conn) as c:
            waiting = c.execute(
                "SELECT count(*) FROM jobs WHERE status IN ('queued', 'retrying')"
            ).fetchone()[0]
            if waiting + len(jobs) > max_queue_size:
                raise QueueFull(
                    f"The queue is full ({waiting} of {max_queue_size} jobs waiting); try again later"
                )
            same_priority = len({j.priority for j in jobs}) == 1
            for j in jobs:
                seq = c.execute(
                    "INSERT INTO jobs (id, batch_id, status, priority, max_attempts, run_at, created_at,"
                    " input_path, original_name, input_size, input_format, options)"
                    " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (j.id, j.batch_id, j.priority, max_attempts, now, now, j.input_path,
                     j.original_name, j.input_size, j.input_format, json.dumps(j.options)),
                ).lastrowid
                if same_priority and positions:  # each one right behind the previous
                    positions.append(positions[-1] + 1)
                else:
                    positions.append(self._position(c, j.priority, seq))
            c.execute("UPDATE counters SET value = value + ? WHERE name = 'jobs_total'", (len(jobs),))
            if before_commit is not None:
                before_commit()
        return positions

    @staticmethod
    def _position(c: sqlite3.Connection, priority: int, seq: int) -> int:
        ahead = c.execute(
            "SELECT count(*) FROM jobs WHERE status IN ('queued', 'retrying')"
            " AND (priority > ? OR (priority = ? AND seq < ?))",
            (priority, priority, seq),
        ).fetchone()[0]
        return ahead + 1

    # -- consuming ----------------------------------------------------------
    def claim(self, owner: str, lease_ms: int, now: int | None = None) -> dict[str, Any] | None:
        """Take the next claimable job (highest priority, then oldest, ``run_at``
        come) for ``owner``: mark it ``processing``, count the attempt and set a
        lease expiring at now + ``lease_ms``. Returns the job, or None."""
        now = now_ms() if now is None else now
        with db.write(self.conn) as c:
            return self._claim(c, owner, lease_ms, now)

    def _claim(self, c: sqlite3.Connection, owner: str, lease_ms: int, now: int) -> dict[str, Any] | None:
        row = c.execute(
            "UPDATE jobs SET status = 'processing', attempts = attempts + 1,"
            " started_at = ?, lease_owner = ?, lease_expires_at = ?"
            " WHERE seq = (SELECT seq FROM jobs INDEXED BY jobs_claim WHERE status IN ('queued', 'retrying')"
            "   AND run_at <= ? ORDER BY priority DESC, seq LIMIT 1)"
            " RETURNING *",
            (now, owner, now + lease_ms, now),
        ).fetchone()
        return _decode(row)

    def complete(self, job_id: str, owner: str, result: dict[str, Any], output_path: str, now: int | None = None) -> bool:
        """Mark a job ``completed`` with its result. False (and no change) if
        ``owner`` no longer holds the job's lease."""
        now = now_ms() if now is None else now
        with db.write(self.conn) as c:
            return self._complete(c, job_id, owner, result, output_path, now)

    def complete_and_claim(self, job_id: str, owner: str, result: dict[str, Any], output_path: str,
                           lease_ms: int, now: int | None = None) -> tuple[bool, dict[str, Any] | None]:
        """:meth:`complete` then :meth:`claim` in one transaction: the
        supervisor's path when a worker finishes and can take the next job
        at once (half the commits of doing both apart)."""
        now = now_ms() if now is None else now
        with db.write(self.conn) as c:
            done = self._complete(c, job_id, owner, result, output_path, now)
            return done, self._claim(c, owner, lease_ms, now)

    def _complete(self, c: sqlite3.Connection, job_id: str, owner: str, result: dict[str, Any], output_path: str,
                  now: int) -> bool:
        cur = c.execute(
            "UPDATE jobs SET status = 'completed', completed_at = ?, result = ?, output_path = ?,"
            " error_code = NULL, error = NULL, lease_owner = NULL, lease_expires_at = NULL"
            " WHERE id = ? AND status = 'processing' AND lease_owner = ?",
            (now, json.dumps(result), output_path, job_id, owner),
        )
        return cur.rowcount == 1

    def fail(self, job_id: str, owner: str, code: str, message: str, transient: bool,
             policy: RetryPolicy, now: int | None = None) -> tuple[str, int | None] | None:
        """Record a failure of the lease holder's attempt.

        Transient with attempts left: ``retrying`` with ``run_at`` = now +
        backoff(attempts). Otherwise ``failed``. Returns (new status, run_at
        or None), or None if ``owner`` no longer holds the lease.
        """
        now = now_ms() if now is None else now
        with db.write(self.conn) as c:
            row = c.execute(
                "SELECT attempts, max_attempts FROM jobs WHERE id = ? AND status = 'processing' AND lease_owner = ?",
                (job_id, owner),
            ).fetchone()
            if row is None:
                return None
            return self._settle(c, job_id, row["attempts"], row["max_attempts"], code, message, transient, policy, now)

    def _settle(self, c: sqlite3.Connection, job_id: str, attempts: int, max_attempts: int, code: str,
                message: str, transient: bool, policy: RetryPolicy, now: int) -> tuple[str, int | None]:
        limit = policy.max_attempts or max_attempts
        if transient and attempts < limit:
            run_at = now + backoff_ms(attempts, policy.base_ms, policy.max_ms)
            c.execute(
                "UPDATE jobs SET status = 'retrying', run_at = ?, error_code = ?, error = ?, max_attempts = ?,"
                " lease_owner = NULL, lease_expires_at = NULL WHERE id = ?",
                (run_at, code, message, limit, job_id),
            )
            return "retrying", run_at
        c.execute(
            "UPDATE jobs SET status = 'failed', completed_at = ?, error_code = ?, error = ?, max_attempts = ?,"
            " lease_owner = NULL, lease_expires_at = NULL WHERE id = ?",
            (now, code, message, limit, job_id),
        )
        return "failed", None

    def release(self, job_id: str, owner: str) -> bool:
        """Give a claimed job back without spending its attempt (graceful
        stop): back to ``queued`` (or ``retrying`` if it had failed before),
        claimable at once."""
        with db.write(self.conn) as c:
            cur = c.execute(
                "UPDATE jobs SET status = CASE WHEN error_code IS NULL THEN 'queued' ELSE 'retrying' END,"
                " attempts = max(attempts - 1, 0), run_at = ?, started_at = NULL,"
                " lease_owner = NULL, lease_expires_at = NULL"
                " WHERE id = ? AND status = 'processing' AND lease_owner = ?",
                (now_ms(), job_id, owner),
            )
            return cur.rowcount == 1

    def recover(self, dead_owners: Iterable[str], policy: RetryPolicy, now: int | None = None) -> list[tuple[str, str]]:
        """Take back ``processing`` jobs whose lease expired or whose owner is
        in ``dead_owners``. The
        spent attempt counts: such a job goes to ``retrying`` with backoff, or
        ``failed`` (``WORKER_LOST``) when its attempts are used up. Returns
        (job id, new status) pairs."""
        now = now_ms() if now is None else now
        dead = list(dead_owners)
        marks = ",".join("?" * len(dead))
        where = "lease_expires_at < ?" + (f" OR lease_owner IN ({marks})" if dead else "")
        out = []
        query = f"SELECT count(*) FROM jobs WHERE status = 'processing' AND ({where})"
        if not self.conn.execute(query, (now, *dead)).fetchone()[0]:
            return out  # the common case: no write transaction at all
        with db.write(self.conn) as c:
            rows = c.execute(
                f"SELECT id, attempts, max_attempts, lease_owner FROM jobs WHERE status = 'processing' AND ({where})",
                (now, *dead),
            ).fetchall()
            for row in rows:
                status, _ = self._settle(
                    c, row["id"], row["attempts"], row["max_attempts"], "WORKER_LOST",
                    "The job's worker or supervisor stopped while processing it", True, policy, now,
                )
                out.append((row["id"], status))
        return out

    def next_run_at(self) -> int | None:
        """Earliest ``run_at`` among claimable jobs (to sleep until it)."""
        row = self.conn.execute(
            "SELECT min(run_at) FROM jobs WHERE status IN ('queued', 'retrying')"
        ).fetchone()
        return row[0]

    # -- operator actions -----------------------------------------------------
    def cancel(self, job_id: str) -> None:
        """Cancel a ``queued``/``retrying`` job. NotFound / Conflict otherwise."""
        with db.write(self.conn) as c:
            row = c.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"Job {job_id} not found")
            if row["status"] not in ("queued", "retrying"):
                raise Conflict(f"Job {job_id} is {row['status']}; only queued or retrying jobs can be cancelled")
            c.execute(
                "UPDATE jobs SET status = 'cancelled', completed_at = ? WHERE id = ?", (now_ms(), job_id)
            )

    def retry(self, job_id: str, max_queue_size: int) -> None:
        """Send a ``failed`` job back to ``queued`` with a fresh attempt budget
        (its upload is kept until retention ends). NotFound / Conflict /
        QueueFull otherwise."""
        with db.write(self.conn) as c:
            row = c.execute("SELECT status, input_path FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFound(f"Job {job_id} not found")
            if row["status"] != "failed":
                raise Conflict(f"Job {job_id} is {row['status']}; only failed jobs can be retried")
            if not os.path.exists(row["input_path"]):
                raise Conflict(f"Job {job_id} can no longer be retried: its upload is gone")
            waiting = c.execute("SELECT count(*) FROM jobs WHERE status IN ('queued', 'retrying')").fetchone()[0]
            if waiting >= max_queue_size:
                raise QueueFull("The queue is full; try again later")
            c.execute(
                "UPDATE jobs SET status = 'queued', attempts = 0, run_at = ?, started_at = NULL,"
                " completed_at = NULL, error_code = NULL, error = NULL WHERE id = ?",
                (now_ms(), job_id),
            )

    # -- reading ---------------------------------------------------------------
    def get(self, job_id: str) -> dict[str, Any] | None:
        return _decode(self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def queue_position(self, job: dict[str, Any]) -> int:
        """1-based position of a waiting job in claim order (ignoring run_at)."""
        return self._position(self.conn, job["priority"], job["seq"])

    def list(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Newest first, optionally of one status."""
        if status:
            rows = self.conn.execute(
                "SELECT * FROM jobs WHERE status = ? ORDER BY seq DESC LIMIT ?", (status, limit)
            ).fetchall()
        else:
            rows = self.conn.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_decode(r) for r in rows]

    def batch(self, batch_id: str) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM jobs WHERE batch_id = ? ORDER BY seq", (batch_id,)).fetchall()
        return [_decode(r) for r in rows]

    def stats(self, now: int | None = None) -> dict[str, Any]:
        """The original service's queue statistics."""
        now = now_ms() if now is None else now
        day_ago = now - 86_400_000
        c = self.conn
        counts = dict(c.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())
        counters = dict(c.execute("SELECT name, value FROM counters").fetchall())
        avg = c.execute(
            "SELECT avg(json_extract(result, '$.processingTime')) FROM"
            " (SELECT result FROM jobs WHERE status = 'completed' ORDER BY completed_at DESC LIMIT 100)"
        ).fetchone()[0]
        recent = dict(c.execute(
            "SELECT status, count(*) FROM jobs WHERE status IN ('completed', 'failed')"
            " AND completed_at >= ? GROUP BY status", (day_ago,)
        ).fetchall())
        return {
            "totalJobs": counters.get("jobs_total", 0),
            # Rows removed by cleanup are tallied in counters by delete().
            "completedJobs": counts.get("completed", 0) + counters.get("jobs_completed", 0),
            "failedJobs": counts.get("failed", 0) + counters.get("jobs_failed", 0),
            "currentQueueSize": counts.get("queued", 0) + counts.get("retrying", 0),
            "currentProcessingCount": counts.get("processing", 0),
            "averageProcessingTime": round(avg) if avg is not None else 0,
            "completedInLast24h": recent.get("completed", 0),
            "failedInLast24h": recent.get("failed", 0),
            "byStatus": {s: counts.get(s, 0) for s in STATUSES},
        }

    def activity(self, since: int) -> list[dict[str, Any]]:
        """Per minute since ``since`` (ms), minutes with activity only: jobs
        completed and failed, and the completed ones' average run time."""
        return activity_view(self.conn.execute(ACTIVITY_SQL.format(p="?"), (since,)).fetchall())

    def waiting_by_priority(self) -> list[dict[str, Any]]:
        """Queued, retrying and processing jobs per priority, highest first."""
        return by_priority_view(self.conn.execute(BY_PRIORITY_SQL).fetchall())

    def recent_failures(self, limit: int = 10) -> list[dict[str, Any]]:
        """The latest failed jobs, newest failure first."""
        return failures_view(self.conn.execute(FAILURES_SQL.format(p="?"), (limit,)).fetchall())

    # -- housekeeping --------------------------------------------------------
    def expired(self, older_than: int) -> list[dict[str, Any]]:
        """Finished jobs whose completion is before ``older_than``."""
        rows = self.conn.execute(
            "SELECT id, input_path, output_path FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')"
            " AND completed_at < ? LIMIT 1000", (older_than,)
        ).fetchall()
        return [dict(r) for r in rows]

    def delete(self, job_ids: Iterable[str]) -> int:
        """Delete finished jobs' rows, keeping the completed/failed totals
        (which count live rows plus these tallies). Returns rows deleted."""
        ids = list(job_ids)
        if not ids:
            return 0
        marks = ",".join("?" * len(ids))
        with db.write(self.conn) as c:
            for status, name in (("completed", "jobs_completed"), ("failed", "jobs_failed")):
                c.execute(
                    f"UPDATE counters SET value = value + (SELECT count(*) FROM jobs WHERE status = ?"
                    f" AND id IN ({marks})) WHERE name = ?", (status, *ids, name),
                )
            return c.execute(
                f"DELETE FROM jobs WHERE id IN ({marks}) AND status IN ('completed', 'failed', 'cancelled')", ids
            ).rowcount

    def known_ids(self, job_ids: Iterable[str]) -> set[str]:
        """Which of ``job_ids`` have a row (to find orphan files)."""
        ids = list(job_ids)
        found: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows = self.conn.execute(
                f"SELECT id FROM jobs WHERE id IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            found.update(r[0] for r in rows)
        return found

    # -- supervisor state -------------------------------------------------------
    def heartbeat(self, sup_id: str, hostname: str, pid: int, started_at: int, state: dict[str, Any]) -> None:
        """Record that supervisor ``sup_id`` is alive, with its current state."""
        now = now_ms()
        with db.write(self.conn) as c:
            c.execute(
                "INSERT INTO supervisors (id, hostname, pid, started_at, heartbeat_at, state)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " heartbeat_at = excluded.heartbeat_at, state = excluded.state",
                (sup_id, hostname, pid, started_at, now, json.dumps(state)),
            )

    def supervisors(self) -> list[dict[str, Any]]:
        rows = self.conn.execute("SELECT * FROM supervisors ORDER BY heartbeat_at DESC").fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["state"] = json.loads(d["state"] or "{}")
            out.append(d)
        return out

    def remove_supervisors(self, sup_ids: Iterable[str]) -> None:
        ids = list(sup_ids)
        if ids:
            with db.write(self.conn) as c:
                c.execute(f"DELETE FROM supervisors WHERE id IN ({','.join('?' * len(ids))})", ids)
