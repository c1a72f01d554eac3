"""The SQLite job store: the embedded default (one VM), and with the
migrations the only place that holds SQL for SQLite.

Implements :class:`~imgworker.store.base.JobStore`; see there for the
contract. Every write is one ``BEGIN IMMEDIATE`` transaction (db.write).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable, Iterable

from .. import db, wakeup
from ..clock import now_ms
from ..model import ErrorCode, Outcome
from . import sql
from .connections import ThreadConnections
from .base import (Job, MinuteActivity, NewJob, PriorityCounts, QueueStats, Recovered, RetryPolicy, Settlement,
                   StoreError, SupervisorRow, job_from_row)

_WAITING = sql.IS_WAITING
_FINISHED = sql.IS_FINISHED


# The claim, in one statement: the highest claimable priority (jobs_claim);
# its clients, one index probe each (a skip-scan of jobs_fair); each one's
# oldest claimable job; then the client with the fewest running jobs
# (jobs_running), then the oldest. Clients at one priority take turns, at a
# cost that grows with the number of clients, not of jobs.
_TOP = f"{_WAITING} AND priority = (SELECT p FROM top)"
_CLAIM = (
    "UPDATE jobs SET status = 'processing', attempts = attempts + 1,"
    " started_at = :now, lease_owner = :owner, lease_expires_at = :expires"
    " WHERE seq = ("
    " WITH RECURSIVE"
    f"  top(p) AS (SELECT priority FROM jobs INDEXED BY jobs_claim WHERE {_WAITING} AND run_at <= :now"
    "             ORDER BY priority DESC LIMIT 1),"
    f"  cl(client) AS (SELECT min(client) FROM jobs INDEXED BY jobs_fair WHERE {_TOP}"
    f"   UNION ALL SELECT (SELECT min(client) FROM jobs INDEXED BY jobs_fair WHERE {_TOP} AND client > cl.client)"
    "   FROM cl WHERE cl.client IS NOT NULL),"
    "  heads(client, seq) AS (SELECT client, (SELECT seq FROM jobs INDEXED BY jobs_fair"
    f"   WHERE {_TOP} AND client = cl.client AND run_at <= :now ORDER BY seq LIMIT 1)"
    "   FROM cl WHERE cl.client IS NOT NULL)"
    " SELECT seq FROM heads WHERE seq IS NOT NULL ORDER BY (SELECT count(*) FROM jobs INDEXED BY jobs_running"
    "  WHERE status = 'processing' AND client = heads.client), seq LIMIT 1)"
    " RETURNING *"
)


def _job(row: sqlite3.Row | None) -> Job | None:
    return None if row is None else job_from_row(row, json.loads(row["options"] or "{}"))


class SqliteStore(ThreadConnections):
    """All SQLite access of the job queue.

    One connection per thread and process (connections.py).

    ``create=False`` (the operator commands): the database must already
    exist at the current schema version; it is never created or migrated.
    """

    def __init__(self, path: Path | str, durable: bool = True, create: bool = True):
        self.path = str(path)
        self.location = self.path
        self.durable = durable
        self.create = create
        self._init_connections()

    # -- plumbing ------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        if self.create:
            return db.connect(self.path, durable=self.durable)
        if not os.path.isfile(self.path):
            raise StoreError(f"no database at {self.path} (run `imgworker migrate` or start the service first)")
        conn = db.connect(self.path, durable=self.durable, must_exist=True)
        pending = db.pending_migrations(conn)
        if pending:
            conn.close()
            raise StoreError(f"the database at {self.path} needs {len(pending)} migration(s) "
                             f"({', '.join(pending)}): run `imgworker migrate`")
        return conn

    def migrate(self) -> list[str]:
        return db.migrate(self.conn)

    def maintain(self) -> None:
        """Fold the WAL back into the database file (PASSIVE: never blocks writers)."""
        self.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def notify(self) -> None:
        """The abstract-socket datagram of wakeup.py (this host only)."""
        wakeup.notify(self.path)

    def listen(self) -> "wakeup.Listener | None":
        """None if another supervisor on this host holds it: poll instead."""
        return wakeup.Listener.bind(self.path)

    # -- producing ---------------------------------------------------------------------------
    def enqueue(self, jobs: Iterable[NewJob], max_queue_size: int, max_attempts: int, now: int | None = None,
                before_commit: Callable[[], None] | None = None) -> list[int]:
        jobs = list(jobs)
        now = now_ms() if now is None else now
        with db.write(self.conn) as c:
            positions = sql.insert_jobs(
                jobs, c.execute(sql.COUNT_WAITING).fetchone()[0], max_queue_size, max_attempts, now,
                lambda params: c.execute(sql.INSERT, params).fetchone()[0],
                lambda priority, seq: self._position(c, priority, seq), json.dumps)
            c.execute("UPDATE counters SET value = value + ? WHERE name = 'jobs_total'", (len(jobs),))
            if before_commit is not None:
                before_commit()
        return positions

    @staticmethod
    def _position(c: sqlite3.Connection, priority: int, seq: int) -> int:
        ahead = c.execute(
            f"SELECT count(*) FROM jobs WHERE {_WAITING} AND (priority > ? OR (priority = ? AND seq < ?))",
            (priority, priority, seq),
        ).fetchone()[0]
        return ahead + 1

    # -- consuming -----------------------------------------------------------------------------
    def claim(self, owner: str, lease_ms: int, now: int | None = None) -> Job | None:
        now = now_ms() if now is None else now
        with db.write(self.conn) as c:
            return self._claim(c, owner, lease_ms, now)

    def _claim(self, c: sqlite3.Connection, owner: str, lease_ms: int, now: int) -> Job | None:
        row = c.execute(_CLAIM, {"now": now, "owner": owner, "expires": now + lease_ms}).fetchone()
        return _job(row)

    def complete(self, job_id: str, owner: str, outcome: Outcome, output_path: str, now: int | None = None,
                 attempt: int | None = None) -> bool:
        now = now_ms() if now is None else now
        with db.write(self.conn) as c:
            return self._complete(c, job_id, owner, outcome, output_path, now, attempt)

    def complete_and_claim(self, job_id: str, owner: str, outcome: Outcome, output_path: str, lease_ms: int,
                           now: int | None = None, attempt: int | None = None) -> tuple[bool, Job | None]:
        now = now_ms() if now is None else now
        with db.write(self.conn) as c:
            done = self._complete(c, job_id, owner, outcome, output_path, now, attempt)
            return done, self._claim(c, owner, lease_ms, now)

    def _complete(self, c: sqlite3.Connection, job_id: str, owner: str, outcome: Outcome, output_path: str,
                  now: int, attempt: int | None) -> bool:
        params = sql.complete_params(job_id, owner, outcome, output_path, now, attempt)
        return c.execute(sql.COMPLETE, params).rowcount == 1

    def fail(self, job_id: str, owner: str, code: str, message: str, transient: bool, policy: RetryPolicy,
             now: int | None = None, attempt: int | None = None) -> Settlement | None:
        now = now_ms() if now is None else now
        with db.write(self.conn) as c:
            row = c.execute(
                f"SELECT attempts, max_attempts FROM jobs WHERE id = ? AND {sql.HOLDS_LEASE}", (job_id, owner, attempt),
            ).fetchone()
            if row is None:
                return None
            return self._settle(c, job_id, row["attempts"], row["max_attempts"], code, message, transient, policy, now)

    @staticmethod
    def _settle(c: sqlite3.Connection, job_id: str, attempts: int, max_attempts: int, code: str, message: str,
                transient: bool, policy: RetryPolicy, now: int) -> Settlement:
        return sql.settle(c.execute, job_id, attempts, max_attempts, code, message, transient, policy, now)

    def release(self, job_id: str, owner: str) -> bool:
        with db.write(self.conn) as c:
            cur = c.execute(
                "UPDATE jobs SET status = CASE WHEN error_code IS NULL THEN 'queued' ELSE 'retrying' END,"
                " attempts = max(attempts - 1, 0), run_at = ?, started_at = NULL,"
                " lease_owner = NULL, lease_expires_at = NULL"
                " WHERE id = ? AND status = 'processing' AND lease_owner = ?",
                (now_ms(), job_id, owner),
            )
            return cur.rowcount == 1

    def extend(self, job_id: str, owner: str, expires_at: int, attempt: int | None = None) -> bool:
        with db.write(self.conn) as c:
            return c.execute(sql.EXTEND, (expires_at, expires_at, job_id, owner, attempt)).rowcount == 1

    def recover(self, dead_owners: Iterable[str], policy: RetryPolicy, now: int | None = None) -> list[Recovered]:
        now = now_ms() if now is None else now
        dead = list(dead_owners)
        marks = ",".join("?" * len(dead))
        where = "lease_expires_at < ?" + (f" OR lease_owner IN ({marks})" if dead else "")
        query = f"SELECT count(*) FROM jobs WHERE status = 'processing' AND ({where})"
        if not self.conn.execute(query, (now, *dead)).fetchone()[0]:
            return []  # the common case: no write transaction at all
        out = []
        with db.write(self.conn) as c:
            rows = c.execute(
                f"SELECT id, attempts, max_attempts FROM jobs WHERE status = 'processing' AND ({where})", (now, *dead),
            ).fetchall()
            for row in rows:
                settled = self._settle(c, row["id"], row["attempts"], row["max_attempts"], ErrorCode.WORKER_LOST,
                                       "The job's worker or supervisor stopped while processing it", True, policy, now)
                out.append(Recovered(row["id"], settled.status))
        return out

    def next_run_at(self) -> int | None:
        return self.conn.execute(f"SELECT min(run_at) FROM jobs WHERE {_WAITING}").fetchone()[0]

    # -- operator actions ---------------------------------------------------------------------
    def cancel(self, job_id: str, now: int | None = None) -> None:
        with db.write(self.conn) as c:
            sql.check_cancel(job_id, self._status(c, job_id))
            c.execute(sql.CANCEL, (now_ms() if now is None else now, job_id))

    def retry(self, job_id: str, max_queue_size: int, now: int | None = None) -> None:
        with db.write(self.conn) as c:
            sql.check_retry(job_id, self._status(c, job_id), lambda: c.execute(sql.COUNT_WAITING).fetchone()[0],
                            max_queue_size)
            c.execute(sql.REQUEUE, (now_ms() if now is None else now, job_id))

    @staticmethod
    def _status(c: sqlite3.Connection, job_id: str) -> str | None:
        row = c.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else row["status"]

    # -- reading ----------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        return _job(self.conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def queue_position(self, job: Job) -> int:
        return self._position(self.conn, job.priority, job.seq)

    def list(self, status: str | None = None, limit: int = 50) -> list[Job]:
        if status:
            rows = self.conn.execute(
                "SELECT * FROM jobs WHERE status = ? ORDER BY seq DESC LIMIT ?", (str(status), limit)
            ).fetchall()
        else:
            rows = self.conn.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_job(r) for r in rows]

    def batch(self, batch_id: str) -> list[Job]:
        rows = self.conn.execute("SELECT * FROM jobs WHERE batch_id = ? ORDER BY seq", (batch_id,)).fetchall()
        return [_job(r) for r in rows]

    def stats(self, now: int | None = None) -> QueueStats:
        now = now_ms() if now is None else now
        c = self.conn
        return sql.queue_stats(dict(c.execute(sql.COUNTS).fetchall()), dict(c.execute(sql.COUNTERS).fetchall()),
                               c.execute(sql.AVERAGE_MS).fetchone()[0],
                               dict(c.execute(sql.RECENT, (now - sql.DAY_MS,)).fetchall()))

    def activity(self, since: int) -> list[MinuteActivity]:
        return sql.activity(self.conn.execute(sql.ACTIVITY, (since,)).fetchall())

    def waiting_by_priority(self) -> list[PriorityCounts]:
        return sql.by_priority(self.conn.execute(sql.BY_PRIORITY).fetchall())

    def recent_failures(self, limit: int = 10) -> list[Job]:
        return [_job(r) for r in self.conn.execute(sql.FAILURES, (limit,)).fetchall()]

    # -- housekeeping (rows only) -----------------------------------------------------------------
    def expired(self, older_than: int, limit: int = 1000) -> list[Job]:
        rows = self.conn.execute(
            f"SELECT * FROM jobs WHERE {_FINISHED} AND completed_at < ? LIMIT ?", (older_than, limit)
        ).fetchall()
        return [_job(r) for r in rows]

    def delete(self, job_ids: Iterable[str]) -> int:
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
            return c.execute(f"DELETE FROM jobs WHERE id IN ({marks}) AND {_FINISHED}", ids).rowcount

    def known_ids(self, job_ids: Iterable[str]) -> set[str]:
        ids = list(job_ids)
        found: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows = self.conn.execute(
                f"SELECT id FROM jobs WHERE id IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
            found.update(r[0] for r in rows)
        return found

    # -- supervisors ----------------------------------------------------------------------------------
    def heartbeat(self, sup_id: str, hostname: str, pid: int, started_at: int, state: dict[str, Any]) -> None:
        with db.write(self.conn) as c:
            c.execute(
                "INSERT INTO supervisors (id, hostname, pid, started_at, heartbeat_at, state)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " heartbeat_at = excluded.heartbeat_at, state = excluded.state",
                (sup_id, hostname, pid, started_at, now_ms(), json.dumps(state)),
            )

    def supervisors(self) -> list[SupervisorRow]:
        rows = self.conn.execute("SELECT * FROM supervisors ORDER BY heartbeat_at DESC").fetchall()
        return [SupervisorRow(r["id"], r["hostname"], r["pid"], r["started_at"], r["heartbeat_at"],
                              json.loads(r["state"] or "{}")) for r in rows]

    def remove_supervisors(self, sup_ids: Iterable[str]) -> None:
        ids = list(sup_ids)
        if ids:
            with db.write(self.conn) as c:
                c.execute(f"DELETE FROM supervisors WHERE id IN ({','.join('?' * len(ids))})", ids)
