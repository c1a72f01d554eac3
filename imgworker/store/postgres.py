"""The PostgreSQL job store: the :class:`~imgworker.store.base.JobStore`
contract for several nodes sharing one database (``DATABASE_URL``).

What PostgreSQL changes (the rest of the contract is base.py's):

- Claim is one statement: ``UPDATE ... WHERE seq = (SELECT ... ORDER BY
  <running jobs of the row's client>, seq LIMIT 1 FOR UPDATE SKIP LOCKED)
  RETURNING *`` over the top priority's clients (a loose index scan of
  jobs_fair) and each one's CLAIM_CANDIDATES oldest rows: its cost follows
  the number of clients, not the backlog. Claimers on any node skip rows
  another claimer has locked instead of waiting for them, so N claimers
  take N different jobs at once.
- Settle-and-claim and batch enqueue are each one transaction; enqueue takes
  a transaction-level advisory lock so the queue bound (a count) holds
  across API nodes, and sends ``NOTIFY imgworker_jobs`` that is delivered
  at commit: supervisors on every host wake up (see :class:`Listener`).
- Every settle checks the lease (``status = 'processing' AND lease_owner =
  me AND attempts = the attempt it ran``): a node that comes back after its
  lease expired and the job moved on cannot overwrite the new owner's
  outcome, nor its own next attempt's.
- A lost connection (the server restarted, a network cut) is replaced and
  the operation retried for up to RECONNECT_S; a write whose COMMIT was
  lost is never applied twice, and its replay answers what the lost attempt
  did: enqueue checks whether its rows exist; a claim looks for the job
  this owner holds with the claim's start and lease expiry (a pair no other
  claim of the store uses, see :meth:`PgStore._claim_stamp`); a
  completion recognises the row it completed (same attempt, completion time
  and output); the other settles are conditional on ownership, so their
  replay changes nothing.
- The supervisor's connection commits with ``synchronous_commit = off``
  (as SQLite's supervisor uses ``synchronous=NORMAL``): a crash of the
  database server may lose its last outcomes, which are then redone (the
  job is recovered by lease expiry; outputs are idempotent). The API's
  connection stays fully durable: a 202 means the row is on disk.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, TypeVar

from .. import db, log, pgdb
from ..clock import now_ms
from ..model import ErrorCode, Outcome
from . import sql
from .connections import ThreadConnections
from .base import (OUTCOME_COLUMNS, Job, MinuteActivity, NewJob, PriorityCounts, QueueStats, Recovered, RetryPolicy, Settlement,
                   StoreError, SupervisorRow, job_from_row)

LOG = log.get("store")
CHANNEL = "imgworker_jobs"
RECONNECT_S = 30.0
# pg_advisory_xact_lock key serialising enqueues ("imgq"): the queue bound holds cluster-wide
ENQUEUE_LOCK = 0x696D6771
# Claimable rows of each client a claim considers: more claimers than this
# holding the oldest rows of every client at once would find nothing this
# round (they hold them for one statement; the supervisor claims again)
CLAIM_CANDIDATES = 16
T = TypeVar("T")


def _jsonb(value: Any) -> Any:
    from psycopg.types.json import Jsonb

    return Jsonb(value)


def _job(row: dict[str, Any] | None) -> Job | None:
    return None if row is None else job_from_row(row, row.get("options") or {})


class PgStore(ThreadConnections):
    """All database access of imgworker on PostgreSQL.

    One connection per thread, opened lazily in the process that uses it and
    reopened after a fork or a lost connection.
    """

    dialect = "postgresql"

    def __init__(self, url: str, durable: bool = True, application_name: str = "imgworker", create: bool = True):
        from ..config import mask_password

        self.url = url
        self.location = mask_password(url)
        self.create = create
        self.durable = durable
        self.application_name = application_name
        self._init_connections()
        self._connected_once = False
        # the latest ms this store claimed at, and the lease expiries its
        # claims used in that ms (see _claim_stamp)
        self._stamp_ms = 0
        self._stamp_expiries: set[int] = set()
        self._stamp_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------------------
    def _open(self) -> Any:
        self._local.conn = None  # until connected: _run sees the connection as lost
        conn = pgdb.connect(self.url, self.application_name)
        if not self.create:  # an operator command: the schema must be there already
            applied = pgdb.applied_migrations(conn)
            pending = [p.name for v, _, p in pgdb.available_migrations() if v not in applied]
            if pending:
                conn.close()
                raise StoreError(f"the database at {self.location} needs {len(pending)} migration(s) "
                                 f"({', '.join(pending)}): run `imgworker migrate`")
        if not self.durable:
            conn.execute("SET synchronous_commit = off")
        self._connected_once = True
        return conn

    def _usable(self, conn: Any) -> bool:
        return conn is not None and not conn.closed

    def _run(self, op: Callable[[Any, bool], T]) -> T:
        """Run ``op(conn, replay)``. When the connection is lost (server
        restarted, network cut) reconnect, for up to RECONNECT_S, and run it
        again with ``replay=True``. Other errors are raised at once, and so
        is a failure of this process's first connection (a bad URL: the
        caller exits 2, it does not wait)."""
        import psycopg

        deadline = time.monotonic() + RECONNECT_S
        replay = False
        delay = 0.05
        while True:
            try:
                return op(self.conn, replay)
            except (psycopg.OperationalError, pgdb.ConfigError) as exc:
                conn = getattr(self._local, "conn", None)
                lost = conn is None or conn.closed or conn.broken
                if not lost or not self._connected_once:
                    raise
                if time.monotonic() > deadline:
                    raise db.StoreUnavailable(f"database unreachable for {RECONNECT_S:.0f} s: {exc}") from exc
                if conn is not None:
                    conn.close()
                self._local.conn = None
                if not replay:
                    LOG.warning("Database connection lost (%s); reconnecting", " ".join(str(exc).split())[:200])
                replay = True
                time.sleep(delay)
                delay = min(1.0, delay * 2)

    def migrate(self) -> list[str]:
        return self._run(lambda c, _r: pgdb.migrate(c))

    def maintain(self) -> None:
        """Nothing to do: PostgreSQL checkpoints and vacuums by itself."""

    # -- wake-ups -----------------------------------------------------------------------
    def notify(self) -> None:
        """Nothing to do: every write that makes a job claimable sends
        ``NOTIFY imgworker_jobs`` in its own transaction (delivered at commit)."""

    def listen(self) -> "Listener | None":
        """A ``LISTEN imgworker_jobs`` connection to select() on (None if the
        database cannot be reached now: the supervisor polls and asks again)."""
        try:
            return Listener(self.url)
        except Exception as exc:
            LOG.warning("Cannot LISTEN for wake-ups (%s); polling", " ".join(str(exc).split())[:200])
            return None

    # -- producing ----------------------------------------------------------------------
    def enqueue(self, jobs: Iterable[NewJob], max_queue_size: int, max_attempts: int,
                now: int | None = None, before_commit: Callable[[], None] | None = None) -> list[int]:
        """As JobStore.enqueue: all or none, QueueFull past the bound
        (cluster-wide: enqueues are serialised by an advisory lock), and a
        NOTIFY that wakes every supervisor at commit."""
        jobs = list(jobs)
        now = now_ms() if now is None else now
        ids = [j.id for j in jobs]

        def op(c: Any, replay: bool) -> list[int]:
            with pgdb.write(c):
                if replay and c.execute("SELECT count(*) AS n FROM jobs WHERE id = ANY(%s)", (ids,)).fetchone()["n"]:
                    # the first try's COMMIT reached the server before the connection was lost
                    return [self._position(c, j.priority, self._seq(c, j.id)) for j in jobs]
                c.execute("SELECT pg_advisory_xact_lock(%s)", (ENQUEUE_LOCK,))
                positions = sql.insert_jobs(
                    jobs, c.execute(sql.COUNT_WAITING).fetchone()["n"], max_queue_size, max_attempts, now,
                    lambda params: c.execute(sql.pg(sql.INSERT), params).fetchone()["seq"],
                    lambda priority, seq: self._position(c, priority, seq), _jsonb)
                c.execute("UPDATE counters SET value = value + %s WHERE name = 'jobs_total'", (len(jobs),))
                c.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
                if before_commit is not None:
                    before_commit()
                return positions

        return self._run(op)

    @staticmethod
    def _seq(c: Any, job_id: str) -> int:
        return c.execute("SELECT seq FROM jobs WHERE id = %s", (job_id,)).fetchone()["seq"]

    @staticmethod
    def _position(c: Any, priority: int, seq: int) -> int:
        ahead = c.execute(
            "SELECT count(*) AS n FROM jobs WHERE status IN ('queued', 'retrying')"
            " AND (priority > %s OR (priority = %s AND seq < %s))",
            (priority, priority, seq),
        ).fetchone()["n"]
        return ahead + 1

    # -- consuming ------------------------------------------------------------------------
    # Within the highest claimable priority, the client with the fewest
    # running jobs, then the oldest: clients at one priority take turns. The
    # cost grows with the number of clients, not of jobs: the clients come
    # from a loose index scan of jobs_fair (one probe each), and each
    # contributes its CLAIM_CANDIDATES oldest claimable rows, so that rows
    # locked by other claimers are skipped for the next (SKIP LOCKED), never
    # waited for. ``id``: the job completed in the same statement
    # (_COMPLETE_AND_CLAIM, whose claim still sees it processing), None for a
    # plain claim.
    _TOP = f"{sql.IS_WAITING} AND priority = (SELECT p FROM top)"
    _CLAIM = (
        "UPDATE jobs SET status = 'processing', attempts = attempts + 1,"
        " started_at = %(now)s, lease_owner = %(owner)s, lease_expires_at = %(expires)s"
        " WHERE seq = ("
        " WITH RECURSIVE"
        f"  top(p) AS (SELECT priority FROM jobs WHERE {sql.IS_WAITING} AND run_at <= %(now)s"
        "             ORDER BY priority DESC LIMIT 1),"
        f"  cl(client) AS (SELECT min(client) FROM jobs WHERE {_TOP}"
        f"   UNION ALL SELECT (SELECT min(client) FROM jobs WHERE {_TOP} AND client > cl.client)"
        "   FROM cl WHERE cl.client IS NOT NULL),"
        "  running(client, n) AS MATERIALIZED (SELECT client, (SELECT count(*) FROM jobs r"
        "    WHERE r.status = 'processing' AND r.client = cl.client AND r.id IS DISTINCT FROM %(id)s)"
        "   FROM cl WHERE cl.client IS NOT NULL),"
        "  candidates(seq, n) AS (SELECT c.seq, running.n FROM running CROSS JOIN LATERAL"
        f"   (SELECT seq FROM jobs WHERE {_TOP} AND client = running.client AND run_at <= %(now)s"
        f"    ORDER BY seq LIMIT {CLAIM_CANDIDATES}) c)"
        f" SELECT j.seq FROM candidates JOIN jobs j ON j.seq = candidates.seq WHERE j.{sql.IS_WAITING}"
        "  ORDER BY candidates.n, candidates.seq LIMIT 1 FOR UPDATE OF j SKIP LOCKED)"
        " RETURNING *"
    )

    def _claim_stamp(self, now: int | None, lease_ms: int) -> tuple[int, int, bool]:
        """A claim's ``started_at`` and ``lease_expires_at``, and whether the
        pair tells it apart from every earlier claim of this store (a replay
        after a lost reply finds what the lost attempt claimed by owner and
        this pair).

        With ``now`` None: the clock (never earlier than the previous
        claim's, should the clock step back) and now + ``lease_ms``, plus
        1 ms for each earlier claim in the same ms that used that expiry. So
        ``started_at`` stays the clock, even at thousands of claims a second,
        and a lease is at most a few ms longer. An explicit ``now`` (tests)
        is used as given, expiry now + ``lease_ms``; such a claim is not
        told apart, and its replay claims again."""
        if now is not None:
            return now, now + lease_ms, False
        with self._stamp_lock:
            at = max(now_ms(), self._stamp_ms)
            if at != self._stamp_ms:
                self._stamp_ms, self._stamp_expiries = at, set()
            expires = at + lease_ms
            while expires in self._stamp_expiries:
                expires += 1
            self._stamp_expiries.add(expires)
        return at, expires, True

    def claim(self, owner: str, lease_ms: int, now: int | None = None) -> Job | None:
        """Take the next claimable job (highest priority, the client with the
        fewest running jobs, then oldest) in one statement; rows locked by
        other claimers are skipped, not waited for. A replay returns the job
        the lost attempt claimed, if its COMMIT got through, else claims."""
        at, expires, unique = self._claim_stamp(now, lease_ms)

        def op(c: Any, replay: bool) -> Job | None:
            if replay and unique:
                held = self._claimed(c, owner, at, expires)
                if held is not None:
                    return held
            return self._claim(c, owner, at, expires)

        return self._run(op)

    def _claim(self, c: Any, owner: str, now: int, expires: int) -> Job | None:
        row = c.execute(self._CLAIM, {"now": now, "owner": owner, "expires": expires, "id": None}).fetchone()
        return _job(row)

    @staticmethod
    def _claimed(c: Any, owner: str, at: int, expires: int) -> Job | None:
        """The job ``owner`` claimed with this stamp and still holds (a lost
        attempt's claim: nobody extends a lease its holder never learnt of)."""
        return _job(c.execute("SELECT * FROM jobs WHERE status = 'processing' AND lease_owner = %s"
                              " AND started_at = %s AND lease_expires_at = %s", (owner, at, expires)).fetchone())

    @staticmethod
    def _completed(c: Any, job_id: str, output_path: str, at: int, attempt: int | None) -> bool:
        """Whether ``job_id`` is the row a lost completion at ``at`` settled:
        completed at that very ms, with that output, by that attempt (a
        completion clears the lease owner; only the lease holder completes,
        and the attempt count moves on before another claim could)."""
        return c.execute(
            "SELECT 1 FROM jobs WHERE id = %s AND status = 'completed' AND completed_at = %s AND output_path = %s"
            " AND attempts = coalesce(%s, attempts)", (job_id, at, output_path, attempt)).fetchone() is not None

    def complete(self, job_id: str, owner: str, outcome: Outcome, output_path: str, now: int | None = None,
                 attempt: int | None = None) -> bool:
        """As JobStore.complete; a replay whose lost attempt completed the
        job answers True."""
        at = now_ms() if now is None else now

        def op(c: Any, replay: bool) -> bool:
            if replay and self._completed(c, job_id, output_path, at, attempt):
                return True
            return self._complete(c, job_id, owner, outcome, output_path, at, attempt)

        return self._run(op)

    def complete_and_claim(self, job_id: str, owner: str, outcome: Outcome, output_path: str, lease_ms: int,
                           now: int | None = None, attempt: int | None = None) -> tuple[bool, Job | None]:
        """complete then claim atomically, in one statement (one round trip,
        one commit): two data-modifying CTEs on different rows, so the claim
        never waits on the completion. A replay answers what the lost
        attempt did when its COMMIT got through (the job it claimed with
        this call's stamp, whether it completed ``job_id``); else runs it again."""
        at, expires, unique = self._claim_stamp(now, lease_ms)
        params = {"now": at, "owner": owner, "expires": expires, "id": job_id, "output": output_path,
                  "attempt": attempt, **outcome.to_wire()}

        def op(c: Any, replay: bool) -> tuple[bool, Job | None]:
            if replay and unique:
                # one statement: committed whole or not at all; if neither
                # trace is there, running it again does what it would have
                held = self._claimed(c, owner, at, expires)
                done = self._completed(c, job_id, output_path, at, attempt)
                if held is not None or done:
                    return done, held
            row = c.execute(self._COMPLETE_AND_CLAIM, params).fetchone()
            done = bool(row.pop("_done"))
            return done, (_job(row) if row["seq"] is not None else None)

        return self._run(op)

    _COMPLETE_AND_CLAIM = (
        "WITH done AS (UPDATE jobs SET status = 'completed', completed_at = %(now)s, output_path = %(output)s, "
        + ", ".join(f"{col} = %({col})s" for col in OUTCOME_COLUMNS) +
        ",  error_code = NULL, error = NULL, lease_owner = NULL, lease_expires_at = NULL"
        "   WHERE id = %(id)s AND " + sql.HOLDS_LEASE.replace("?", "%(owner)s", 1).replace("?", "%(attempt)s", 1) +
        "   RETURNING 1),"
        " next AS (" + _CLAIM + ")"
        " SELECT (SELECT count(*) FROM done) AS _done, next.* FROM (SELECT 1) AS one LEFT JOIN next ON true"
    )

    @staticmethod
    def _complete(c: Any, job_id: str, owner: str, outcome: Outcome, output_path: str, now: int,
                  attempt: int | None) -> bool:
        params = sql.complete_params(job_id, owner, outcome, output_path, now, attempt)
        return c.execute(sql.pg(sql.COMPLETE), params).rowcount == 1

    def fail(self, job_id: str, owner: str, code: str, message: str, transient: bool,
             policy: RetryPolicy, now: int | None = None, attempt: int | None = None) -> Settlement | None:
        """As JobStore.fail; None if ``owner`` no longer holds the lease."""
        at = now_ms() if now is None else now

        def op(c: Any, _replay: bool) -> Settlement | None:
            with pgdb.write(c):
                row = c.execute(sql.pg(f"SELECT attempts, max_attempts FROM jobs WHERE id = ? AND {sql.HOLDS_LEASE}"
                                       " FOR UPDATE"), (job_id, owner, attempt)).fetchone()
                if row is None:
                    return None
                return self._settle(c, job_id, row["attempts"], row["max_attempts"], code, message, transient,
                                    policy, at)

        return self._run(op)

    @staticmethod
    def _settle(c: Any, job_id: str, attempts: int, max_attempts: int, code: str, message: str,
                transient: bool, policy: RetryPolicy, now: int) -> Settlement:
        return sql.settle(lambda statement, params: c.execute(sql.pg(statement), params), job_id, attempts,
                          max_attempts, code, message, transient, policy, now)

    def release(self, job_id: str, owner: str) -> bool:
        """Give a claimed job back without spending its attempt; wakes claimers."""

        def op(c: Any, _replay: bool) -> bool:
            with pgdb.write(c):
                cur = c.execute(
                    "UPDATE jobs SET status = CASE WHEN error_code IS NULL THEN 'queued' ELSE 'retrying' END,"
                    " attempts = greatest(attempts - 1, 0), run_at = %s, started_at = NULL,"
                    " lease_owner = NULL, lease_expires_at = NULL"
                    " WHERE id = %s AND status = 'processing' AND lease_owner = %s",
                    (now_ms(), job_id, owner),
                )
                if cur.rowcount == 1:
                    c.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
                return cur.rowcount == 1

        return self._run(op)

    def extend(self, job_id: str, owner: str, expires_at: int, attempt: int | None = None) -> bool:
        """As JobStore.extend (idempotent: a replay after a lost reply is harmless)."""

        def op(c: Any, _replay: bool) -> bool:
            with pgdb.write(c):
                params = (expires_at, expires_at, job_id, owner, attempt)
                return c.execute(sql.pg(sql.EXTEND), params).rowcount == 1

        return self._run(op)

    def recover(self, dead_owners: Iterable[str], policy: RetryPolicy,
                now: int | None = None) -> list[Recovered]:
        """Take back ``processing`` jobs whose lease expired (the cross-host
        rule: a pid means nothing on another host) or whose owner is in
        ``dead_owners``; the spent attempt counts. Rows another node is
        recovering at the same moment are skipped (SKIP LOCKED)."""
        at = now_ms() if now is None else now
        dead = list(dead_owners)

        def op(c: Any, _replay: bool) -> list[Recovered]:
            out: list[Recovered] = []
            with pgdb.write(c):
                rows = c.execute(
                    "SELECT id, attempts, max_attempts FROM jobs WHERE status = 'processing'"
                    " AND (lease_expires_at < %s OR lease_owner = ANY(%s)) FOR UPDATE SKIP LOCKED",
                    (at, dead),
                ).fetchall()
                for row in rows:
                    settled = self._settle(
                        c, row["id"], row["attempts"], row["max_attempts"], ErrorCode.WORKER_LOST,
                        "The job's worker or supervisor stopped while processing it", True, policy, at,
                    )
                    out.append(Recovered(row["id"], settled.status))
            return out

        return self._run(op)

    def next_run_at(self) -> int | None:
        return self._run(lambda c, _r: c.execute(
            "SELECT min(run_at) AS t FROM jobs WHERE status IN ('queued', 'retrying')").fetchone()["t"])

    # -- operator actions ---------------------------------------------------------------------
    def cancel(self, job_id: str, now: int | None = None) -> None:
        def op(c: Any, replay: bool) -> None:
            with pgdb.write(c):
                status = self._status(c, job_id)
                if replay and status == "cancelled":
                    return
                sql.check_cancel(job_id, status)
                c.execute(sql.pg(sql.CANCEL), (now_ms() if now is None else now, job_id))

        self._run(op)

    def retry(self, job_id: str, max_queue_size: int, now: int | None = None) -> None:
        def op(c: Any, replay: bool) -> None:
            with pgdb.write(c):
                c.execute("SELECT pg_advisory_xact_lock(%s)", (ENQUEUE_LOCK,))
                status = self._status(c, job_id)
                if replay and status == "queued":
                    return
                sql.check_retry(job_id, status, lambda: c.execute(sql.COUNT_WAITING).fetchone()["n"], max_queue_size)
                c.execute(sql.pg(sql.REQUEUE), (now_ms() if now is None else now, job_id))
                c.execute("SELECT pg_notify(%s, '')", (CHANNEL,))

        self._run(op)

    @staticmethod
    def _status(c: Any, job_id: str) -> str | None:
        row = c.execute("SELECT status FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
        return None if row is None else row["status"]

    # -- reading --------------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None:
        return self._run(lambda c, _r: _job(c.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()))

    def queue_position(self, job: Job) -> int:
        return self._run(lambda c, _r: self._position(c, job.priority, job.seq))

    def list(self, status: str | None = None, limit: int = 50) -> list[Job]:
        def op(c: Any, _r: bool) -> list[Job]:
            if status:
                rows = c.execute("SELECT * FROM jobs WHERE status = %s ORDER BY seq DESC LIMIT %s",
                                 (str(status), limit)).fetchall()
            else:
                rows = c.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT %s", (limit,)).fetchall()
            return [_job(r) for r in rows]

        return self._run(op)

    def batch(self, batch_id: str) -> list[Job]:
        return self._run(lambda c, _r: [_job(r) for r in c.execute(
            "SELECT * FROM jobs WHERE batch_id = %s ORDER BY seq", (batch_id,)).fetchall()])

    def stats(self, now: int | None = None) -> QueueStats:
        at = now_ms() if now is None else now

        def op(c: Any, _r: bool) -> QueueStats:
            counts = {r["status"]: r["n"] for r in c.execute(sql.COUNTS).fetchall()}
            counters = {r["name"]: r["value"] for r in c.execute(sql.COUNTERS).fetchall()}
            average = c.execute(sql.AVERAGE_MS).fetchone()["a"]
            recent = {r["status"]: r["n"] for r in c.execute(sql.pg(sql.RECENT), (at - sql.DAY_MS,)).fetchall()}
            return sql.queue_stats(counts, counters, float(average) if average is not None else None, recent)

        return self._run(op)

    def activity(self, since: int) -> list[MinuteActivity]:
        return self._run(lambda c, _r: sql.activity(c.execute(sql.pg(sql.ACTIVITY), (since,)).fetchall()))

    def waiting_by_priority(self) -> list[PriorityCounts]:
        return self._run(lambda c, _r: sql.by_priority(c.execute(sql.BY_PRIORITY).fetchall()))

    def recent_failures(self, limit: int = 10) -> list[Job]:
        return self._run(lambda c, _r: [_job(r) for r in c.execute(sql.pg(sql.FAILURES), (limit,)).fetchall()])

    # -- housekeeping ---------------------------------------------------------------------------
    def expired(self, older_than: int, limit: int = 1000) -> list[Job]:
        return self._run(lambda c, _r: [_job(r) for r in c.execute(
            "SELECT * FROM jobs WHERE status IN ('completed', 'failed', 'cancelled')"
            " AND completed_at < %s LIMIT %s", (older_than, limit)).fetchall()])

    def delete(self, job_ids: Iterable[str]) -> int:
        ids = list(job_ids)
        if not ids:
            return 0

        def op(c: Any, _r: bool) -> int:
            with pgdb.write(c):
                deleted = c.execute(
                    "DELETE FROM jobs WHERE id = ANY(%s) AND status IN ('completed', 'failed', 'cancelled')"
                    " RETURNING status", (ids,)).fetchall()
                for status, name in (("completed", "jobs_completed"), ("failed", "jobs_failed")):
                    n = sum(1 for r in deleted if r["status"] == status)
                    if n:
                        c.execute("UPDATE counters SET value = value + %s WHERE name = %s", (n, name))
                return len(deleted)

        return self._run(op)

    def known_ids(self, job_ids: Iterable[str]) -> set[str]:
        ids = list(job_ids)
        return self._run(lambda c, _r: {r["id"] for r in c.execute(
            "SELECT id FROM jobs WHERE id = ANY(%s)", (ids,)).fetchall()})

    # -- nodes ------------------------------------------------------------------------------------
    def heartbeat(self, sup_id: str, hostname: str, pid: int, started_at: int, state: dict[str, Any]) -> None:
        def op(c: Any, _r: bool) -> None:
            c.execute(
                "INSERT INTO supervisors (id, hostname, pid, started_at, heartbeat_at, state)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
                " heartbeat_at = excluded.heartbeat_at, state = excluded.state",
                (sup_id, hostname, pid, started_at, now_ms(), _jsonb(state)),
            )

        self._run(op)

    def supervisors(self) -> list[SupervisorRow]:
        """Supervisors only (API nodes register in the same table, kind 'api')."""
        return self._run(lambda c, _r: [SupervisorRow(r["id"], r["hostname"], r["pid"], r["started_at"],
                                                      r["heartbeat_at"], r["state"] or {}) for r in c.execute(
            "SELECT * FROM supervisors WHERE kind = 'supervisor' ORDER BY heartbeat_at DESC").fetchall()])

    def register_api(self, node_id: str, hostname: str, pid: int, started_at: int) -> None:
        """Record (and refresh) an API node's heartbeat; forget API nodes
        silent for a minute (killed without unregistering)."""

        def op(c: Any, _r: bool) -> None:
            now = now_ms()
            c.execute(
                "INSERT INTO supervisors (id, kind, hostname, pid, started_at, heartbeat_at)"
                " VALUES (%s, 'api', %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                (node_id, hostname, pid, started_at, now))
            c.execute("DELETE FROM supervisors WHERE kind = 'api' AND heartbeat_at < %s", (now - 60_000,))

        self._run(op)

    def nodes(self) -> list[dict[str, Any]]:
        """Every registered node, supervisors and APIs, newest heartbeat first."""
        return self._run(lambda c, _r: c.execute(
            "SELECT id, kind, hostname, pid, started_at, heartbeat_at FROM supervisors"
            " ORDER BY heartbeat_at DESC").fetchall())

    # -- the cluster-wide rate limit ---------------------------------------------------------
    def rate_take(self, key: str, wanted: int, limit: int, window_ms: int) -> tuple[int, int, int, int]:
        """Count up to ``wanted`` units for ``key`` in its fixed window, for
        every API node at once: (granted, count now, window start, now), times
        in ms by the database's clock (nodes' clocks may differ). The row
        lock serialises nodes counting the same client."""

        def op(c: Any, _r: bool) -> tuple[int, int, int, int]:
            with pgdb.write(c):
                now = c.execute("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint AS t").fetchone()["t"]
                c.execute("INSERT INTO rate_limits (key, window_start, count) VALUES (%s, %s, 0)"
                          " ON CONFLICT (key) DO NOTHING", (key, now))
                row = c.execute("SELECT window_start, count FROM rate_limits WHERE key = %s FOR UPDATE",
                                (key,)).fetchone()
                start, count = row["window_start"], row["count"]
                if now - start >= window_ms:
                    start, count = now, 0
                granted = max(0, min(wanted, limit - count))
                c.execute("UPDATE rate_limits SET window_start = %s, count = %s WHERE key = %s",
                          (start, count + granted, key))
                return granted, count + granted, start, now

        return self._run(op)

    def rate_prune(self, window_ms: int) -> int:
        """Forget clients whose window has ended (keeps the table small)."""
        return self._run(lambda c, _r: c.execute(
            "DELETE FROM rate_limits WHERE window_start < (extract(epoch FROM clock_timestamp()) * 1000)::bigint - %s",
            (window_ms,)).rowcount)

    def remove_supervisors(self, sup_ids: Iterable[str]) -> None:
        ids = list(sup_ids)
        if ids:
            self._run(lambda c, _r: c.execute("DELETE FROM supervisors WHERE id = ANY(%s)", (ids,)))



class Listener:
    """A dedicated autocommit connection that LISTENs on CHANNEL: readable
    when a notification (or the server's goodbye) arrives. ``drain()``
    consumes pending notifications and returns False once the connection is
    gone (the supervisor then drops it and listens again later)."""

    def __init__(self, url: str):
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=pgdb.CONNECT_TIMEOUT_S,
                                    application_name="imgworker-listen")
        self.conn.execute(f"LISTEN {CHANNEL}")

    def fileno(self) -> int:
        return self.conn.fileno()

    def drain(self) -> bool:
        # libpq directly: read what arrived without blocking; consume_input
        # fails once the server has closed the connection
        from psycopg import pq

        pgconn = self.conn.pgconn
        try:
            # twice: a server going down sends its FATAL message, then closes;
            # the first read takes the message, the second meets the EOF
            pgconn.consume_input()
            pgconn.consume_input()
            while pgconn.notifies() is not None:
                pass
        except Exception:
            return False
        return pgconn.status == pq.ConnStatus.OK

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass
