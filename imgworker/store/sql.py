"""What the two SQL stores share: statements both dialects accept (written
with ``?`` placeholders; :func:`pg` turns them into psycopg's ``%s``) and
the decisions made on their results, so that SQLite and PostgreSQL settle,
complete and count jobs the same way."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

from ..errors import Conflict, NotFound, QueueFull
from ..model import FINISHED, STATUSES, WAITING, JobStatus, Outcome
from .base import OUTCOME_COLUMNS, MinuteActivity, NewJob, PriorityCounts, QueueStats, RetryPolicy, Settlement


def _in(statuses: tuple[JobStatus, ...]) -> str:
    return "status IN (%s)" % ", ".join(f"'{s.value}'" for s in statuses)


IS_WAITING = _in(WAITING)
IS_FINISHED = _in(FINISHED)

COUNT_WAITING = f"SELECT count(*) AS n FROM jobs WHERE {IS_WAITING}"
INSERT = ("INSERT INTO jobs (id, batch_id, status, priority, max_attempts, run_at, created_at,"
          " input_path, original_name, input_size, input_format, options, client)"
          " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq")
SETTLE_RETRY = ("UPDATE jobs SET status = 'retrying', run_at = ?, error_code = ?, error = ?, max_attempts = ?,"
                " lease_owner = NULL, lease_expires_at = NULL WHERE id = ?")
SETTLE_FAIL = ("UPDATE jobs SET status = 'failed', completed_at = ?, error_code = ?, error = ?, max_attempts = ?,"
               " lease_owner = NULL, lease_expires_at = NULL WHERE id = ?")
# The lease a settle must hold: ``processing`` for this owner and, when the
# caller names it, this attempt: a late outcome of an earlier attempt (its
# owner claimed the job again after it was taken back) changes nothing.
HOLDS_LEASE = "status = 'processing' AND lease_owner = ? AND attempts = coalesce(?, attempts)"
# Move a held lease later, never earlier (store.extend); CASE, not max() or
# greatest(), so that one statement serves both databases.
EXTEND = ("UPDATE jobs SET lease_expires_at = CASE WHEN lease_expires_at < ? THEN ? ELSE lease_expires_at END"
          f" WHERE id = ? AND {HOLDS_LEASE}")
COMPLETE = ("UPDATE jobs SET status = 'completed', completed_at = ?, output_path = ?, "
            + ", ".join(f"{col} = ?" for col in OUTCOME_COLUMNS)
            + ", error_code = NULL, error = NULL, lease_owner = NULL, lease_expires_at = NULL"
            f" WHERE id = ? AND {HOLDS_LEASE}")
AVERAGE_MS = ("SELECT avg(processing_ms) AS a FROM (SELECT processing_ms FROM jobs WHERE status = 'completed'"
              " ORDER BY completed_at DESC LIMIT 100) r")
COUNTS = "SELECT status, count(*) AS n FROM jobs GROUP BY status"
COUNTERS = "SELECT name, value FROM counters"
RECENT = ("SELECT status, count(*) AS n FROM jobs WHERE status IN ('completed', 'failed')"
          " AND completed_at >= ? GROUP BY status")
DAY_MS = 86_400_000
# the dashboard's reads
ACTIVITY = ("SELECT (completed_at / 60000) * 60000 AS minute,"
            " sum(CASE WHEN status = 'completed' THEN 1 ELSE 0 END) AS completed,"
            " sum(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) AS failed,"
            " avg(CASE WHEN status = 'completed' THEN completed_at - started_at END) AS avg_ms"
            " FROM jobs WHERE status IN ('completed', 'failed') AND completed_at >= ?"
            " GROUP BY minute ORDER BY minute")
BY_PRIORITY = (f"SELECT priority, status, count(*) AS n FROM jobs WHERE {IS_WAITING} OR status = 'processing'"
               " GROUP BY priority, status ORDER BY priority DESC")
FAILURES = "SELECT * FROM jobs WHERE status = 'failed' ORDER BY completed_at DESC LIMIT ?"


def pg(statement: str) -> str:
    """The statement with psycopg's placeholders."""
    return statement.replace("?", "%s")


def insert_jobs(jobs: list[NewJob], waiting: int, max_queue_size: int, max_attempts: int, now: int,
                insert: Callable[[tuple], int], position: Callable[[int, int], int],
                encode_options: Callable[[dict], Any]) -> list[int]:
    """Insert ``jobs`` (QueueFull first if they do not fit beside ``waiting``)
    in the caller's transaction; return each one's position in claim order
    at the moment it was inserted. ``insert(params)`` runs INSERT and
    returns the new ``seq``; ``position(priority, seq)`` counts."""
    if waiting + len(jobs) > max_queue_size:
        raise QueueFull(f"The queue is full ({waiting} of {max_queue_size} jobs waiting); try again later")
    positions: list[int] = []
    same_priority = len({j.priority for j in jobs}) == 1
    for j in jobs:
        seq = insert((j.id, j.batch_id, j.priority, max_attempts, now, now, j.input_path, j.original_name,
                      j.input_size, j.input_format, encode_options(j.options), j.client))
        if same_priority and positions:  # each one right behind the previous
            positions.append(positions[-1] + 1)
        else:
            positions.append(position(j.priority, seq))
    return positions


CANCEL = "UPDATE jobs SET status = 'cancelled', completed_at = ? WHERE id = ?"
REQUEUE = ("UPDATE jobs SET status = 'queued', attempts = 0, run_at = ?, started_at = NULL,"
           " completed_at = NULL, error_code = NULL, error = NULL WHERE id = ?")


def check_cancel(job_id: str, status: str | None) -> None:
    """NotFound / Conflict unless a job in ``status`` may be cancelled."""
    if status is None:
        raise NotFound(f"Job {job_id} not found")
    if status not in WAITING:
        raise Conflict(f"Job {job_id} is {status}; only queued or retrying jobs can be cancelled")


def check_retry(job_id: str, status: str | None, waiting: Callable[[], int], max_queue_size: int) -> None:
    """NotFound / Conflict / QueueFull unless a job in ``status`` may be sent
    back to the queue now (``waiting()`` counts the queue, asked last)."""
    if status is None:
        raise NotFound(f"Job {job_id} not found")
    if status != JobStatus.FAILED:
        raise Conflict(f"Job {job_id} is {status}; only failed jobs can be retried")
    if waiting() >= max_queue_size:
        raise QueueFull("The queue is full; try again later")


def settle(execute: Callable[[str, tuple], Any], job_id: str, attempts: int, max_attempts: int, code: str,
           message: str, transient: bool, policy: RetryPolicy, now: int) -> Settlement:
    """A failed attempt: ``retrying`` after the backoff when it is transient
    and attempts are left (the policy's limit when it has one, else the
    row's), else ``failed``. ``execute(sql, params)`` runs a ``?`` statement
    in the caller's transaction."""
    limit = policy.max_attempts or max_attempts
    if transient and attempts < limit:
        run_at = now + policy.delay_ms(attempts)
        execute(SETTLE_RETRY, (run_at, str(code), message, limit, job_id))
        return Settlement(JobStatus.RETRYING, run_at)
    execute(SETTLE_FAIL, (now, str(code), message, limit, job_id))
    return Settlement(JobStatus.FAILED)


def complete_params(job_id: str, owner: str, outcome: Outcome, output_path: str, now: int,
                    attempt: int | None) -> tuple:
    data = outcome.to_wire()
    return (now, output_path, *(data[f] for f in OUTCOME_COLUMNS), job_id, owner, attempt)


def activity(rows: Iterable[Mapping[str, Any]]) -> list[MinuteActivity]:
    return [MinuteActivity(int(r["minute"]), int(r["completed"]), int(r["failed"]),
                           float(r["avg_ms"]) if r["avg_ms"] is not None else None) for r in rows]


def by_priority(rows: Iterable[Mapping[str, Any]]) -> list[PriorityCounts]:
    """Rows of (priority, status, n), highest priority first, folded into one per priority."""
    counts: dict[int, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r["priority"], {})[r["status"]] = int(r["n"])
    return [PriorityCounts(priority, **by_status) for priority, by_status in counts.items()]


def queue_stats(counts: Mapping[str, int], counters: Mapping[str, int], average_ms: float | None,
                recent: Mapping[str, int]) -> QueueStats:
    """QueueStats from jobs per status, the counters table, the mean
    processing time of the last 100 completed jobs and the last day's
    completed/failed counts."""
    return QueueStats(
        total=counters.get("jobs_total", 0),
        # rows removed by cleanup are tallied in counters by delete()
        completed=counts.get("completed", 0) + counters.get("jobs_completed", 0),
        failed=counts.get("failed", 0) + counters.get("jobs_failed", 0),
        waiting=counts.get("queued", 0) + counts.get("retrying", 0),
        processing=counts.get("processing", 0),
        average_processing_ms=round(average_ms) if average_ms is not None else 0,
        completed_24h=recent.get("completed", 0),
        failed_24h=recent.get("failed", 0),
        by_status={s: counts.get(s, 0) for s in STATUSES},
    )
