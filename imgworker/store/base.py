"""The storage contract of the job queue, written once.

Every job store (SQLite today, PostgreSQL next) implements :class:`JobStore`
and passes ``tests/test_store_contract.py``. The rules:

- A job row moves ``queued -> processing -> completed``; a transient failure
  sends it to ``retrying`` (claimable again once ``run_at`` has come); a
  deterministic failure, or a transient one with no attempts left, ends it
  ``failed``. ``queued``/``retrying`` jobs can be ``cancelled``.
- Claim order: highest ``priority`` first, then arrival order.
- A claimed job carries a lease (owner + expiry). Only the lease owner can
  complete, fail or release it (an outcome only for the attempt it ran); a lease that expired or whose owner died is
  taken back by :meth:`JobStore.recover`, which counts the spent attempt.
- Every write is one transaction: all of it or none of it (a batch of
  uploads included). A store that runs an operation again after losing its
  connection (PostgreSQL; SQLite has no connection to lose) answers what
  the lost attempt did when that attempt committed: a claim returns the job
  it claimed (never a second one), a completion reports it completed.
- Times are integer milliseconds since the Unix epoch (wall clock, because
  they are stored and compared across processes, hosts and restarts).
- A store deals in rows only: it never touches files (see housekeeping.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping, Protocol

from ..errors import StoreError
from ..model import JobStatus, Outcome


def backoff_ms(attempt: int, base_ms: int, max_ms: int, rng: random.Random | None = None) -> int:
    """Delay before retry number ``attempt`` (1-based): base x 2^(attempt-1),
    plus up to 20 % jitter so that jobs failing together do not retry in
    lockstep, capped at ``max_ms``."""
    raw = base_ms * (2 ** max(0, attempt - 1))
    jitter = (rng or random).random() * 0.2 * raw
    return int(min(max_ms, raw + jitter))


@dataclass(frozen=True)
class RetryPolicy:
    base_ms: int = 1000
    max_ms: int = 60000
    # The supervisor's attempt limit (MAX_RETRIES + 1), applied when a failure
    # is settled, so a reload reaches jobs queued before it; None: the limit
    # written on the row when it was queued.
    max_attempts: int | None = None

    def delay_ms(self, attempt: int) -> int:
        return backoff_ms(attempt, self.base_ms, self.max_ms)


@dataclass(frozen=True)
class NewJob:
    """What the API hands to :meth:`JobStore.enqueue`."""

    id: str
    input_path: str
    original_name: str
    input_size: int
    input_format: str | None = None
    priority: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    batch_id: str | None = None
    client: str = ""  # who submitted it (http.client_of the peer, after TRUST_PROXY): claims share by client


@dataclass(frozen=True)
class Job:
    """One job row. ``outcome`` is set once the job is ``completed``."""

    seq: int
    id: str
    batch_id: str | None
    status: JobStatus
    priority: int
    attempts: int
    max_attempts: int
    run_at: int
    created_at: int
    started_at: int | None
    completed_at: int | None
    lease_owner: str | None
    lease_expires_at: int | None
    input_path: str
    original_name: str
    input_size: int
    input_format: str | None
    options: dict[str, Any]
    output_path: str | None
    error_code: str | None
    error: str | None
    outcome: Outcome | None = None


# The columns that keep a job's Outcome: named as its fields.
OUTCOME_COLUMNS = tuple(f.name for f in fields(Outcome))
_JOB_COLUMNS = tuple(f.name for f in fields(Job) if f.name not in ("outcome", "options", "status"))


def job_from_row(row: Mapping[str, Any], options: dict[str, Any]) -> Job:
    """A :class:`Job` from a ``SELECT *`` row of the jobs table (any
    backend: columns by name); ``options`` already decoded."""
    outcome = None
    if row["processing_ms"] is not None:
        data = {name: row[name] for name in OUTCOME_COLUMNS}
        data["animated"], data["kept_original"] = bool(data["animated"]), bool(data["kept_original"])
        outcome = Outcome(**data)
    return Job(**{name: row[name] for name in _JOB_COLUMNS}, status=JobStatus(row["status"]), options=options,
               outcome=outcome)


@dataclass(frozen=True)
class Settlement:
    """What :meth:`JobStore.fail` decided: ``retrying`` at ``run_at``, or ``failed``."""

    status: JobStatus
    run_at: int | None = None


@dataclass(frozen=True)
class Recovered:
    job_id: str
    status: JobStatus


@dataclass(frozen=True)
class QueueStats:
    """The original service's queue statistics, in the store's words (the
    API names them). ``completed``/``failed`` include rows since removed by
    cleanup."""

    total: int
    completed: int
    failed: int
    waiting: int
    processing: int
    average_processing_ms: int
    completed_24h: int
    failed_24h: int
    by_status: dict[str, int]


@dataclass(frozen=True)
class MinuteActivity:
    """Jobs finished in one minute (``minute``: its start, epoch ms); the
    completed ones' mean run time (claim to completion), None if none."""

    minute: int
    completed: int
    failed: int
    avg_ms: float | None


@dataclass(frozen=True)
class PriorityCounts:
    """Unfinished jobs of one priority, by status (the JSON keys of the dashboard)."""

    priority: int
    queued: int = 0
    retrying: int = 0
    processing: int = 0


@dataclass(frozen=True)
class SupervisorRow:
    """A supervisor's registration: who and where it is, when it last
    reported, and the state it published (JSON-able, shown by the API)."""

    id: str
    hostname: str
    pid: int
    started_at: int
    heartbeat_at: int
    state: dict[str, Any]


class JobStore(Protocol):
    """The job queue's storage. Implementations: store/sqlite.py."""

    location: str
    """Where the data is, for messages (a path, or a URL without password)."""

    # -- life cycle -----------------------------------------------------------------
    def migrate(self) -> list[str]:
        """Apply pending schema migrations; return their names. Only the
        ``migrate`` command and service start call this."""

    def close(self) -> None:
        """Close every connection this process opened through the store."""

    def maintain(self) -> None:
        """Periodic upkeep of the database itself (may do nothing)."""

    # -- wake-ups -----------------------------------------------------------------------
    def notify(self) -> None:
        """Wake supervisors after jobs became claimable (best effort; they poll too)."""

    def listen(self) -> Any:
        """Something with ``fileno()``, ``drain() -> bool`` (False: the
        listener is broken, ask again later) and ``close()`` that becomes
        readable after :meth:`notify`; None when none can be had now."""

    # -- producing --------------------------------------------------------------------
    def enqueue(self, jobs: Iterable[NewJob], max_queue_size: int, max_attempts: int, now: int | None = None,
                before_commit: Callable[[], None] | None = None) -> list[int]:
        """Insert ``jobs`` as ``queued``, all or none; return each one's
        1-based position in claim order at the moment it was inserted.
        Raises QueueFull (inserting nothing) when queued + retrying jobs plus
        these would exceed ``max_queue_size``. ``before_commit`` runs inside
        the transaction after the inserts; if it raises, nothing is inserted."""

    # -- consuming ----------------------------------------------------------------------
    def claim(self, owner: str, lease_ms: int, now: int | None = None) -> Job | None:
        """Take the next claimable job (``run_at`` has come) for ``owner``:
        the highest priority; within it the client with the fewest
        ``processing`` jobs (clients at one priority take turns, so one
        client's backlog never starves another), then the oldest. ``processing``, one more attempt,
        a lease expiring at now + ``lease_ms``. None when there is none.

        ``started_at`` is ``now`` (the clock when None). A store that
        recognises a replayed claim by its start and lease expiry
        (PostgreSQL) keeps that pair distinct among its own claims when
        ``now`` is None: a claim in the same ms as an earlier one of the
        store gets its lease 1 ms longer (2 ms for the next, ...)."""

    def complete(self, job_id: str, owner: str, outcome: Outcome, output_path: str, now: int | None = None,
                 attempt: int | None = None) -> bool:
        """Mark a job ``completed`` with its outcome. False (and no change)
        if ``owner`` no longer holds the job's lease, or ``attempt`` (the
        claimed Job's ``attempts``; None: any) is not the attempt running:
        a late outcome of an earlier attempt never settles a later one."""

    def complete_and_claim(self, job_id: str, owner: str, outcome: Outcome, output_path: str, lease_ms: int,
                           now: int | None = None, attempt: int | None = None) -> tuple[bool, Job | None]:
        """:meth:`complete` then :meth:`claim` in one transaction, both at
        the same time (the claim's lease as :meth:`claim` sets it)."""

    def fail(self, job_id: str, owner: str, code: str, message: str, transient: bool, policy: RetryPolicy,
             now: int | None = None, attempt: int | None = None) -> Settlement | None:
        """Record a failure of the lease holder's attempt: transient with
        attempts left -> ``retrying`` at now + backoff(attempts), otherwise
        ``failed``. None if ``owner`` no longer holds the lease or
        ``attempt`` is not the one running (as :meth:`complete`)."""

    def release(self, job_id: str, owner: str) -> bool:
        """Give a claimed job back without spending its attempt (graceful
        stop): ``queued`` (``retrying`` if it had failed before), claimable
        at once. False if ``owner`` does not hold it."""

    def extend(self, job_id: str, owner: str, expires_at: int, attempt: int | None = None) -> bool:
        """Move the lease of a job ``owner`` holds to expire at ``expires_at``
        (epoch ms; never earlier than it is): its worker waited for a CPU and
        the job may run that much longer. False if ``owner`` does not hold it
        or ``attempt`` is not the one running (as :meth:`complete`)."""

    def recover(self, dead_owners: Iterable[str], policy: RetryPolicy, now: int | None = None) -> list[Recovered]:
        """Take back ``processing`` jobs whose lease expired or whose owner is
        in ``dead_owners``; the spent attempt counts (``retrying`` with
        backoff, or ``failed`` with WORKER_LOST when none is left)."""

    def next_run_at(self) -> int | None:
        """Earliest ``run_at`` among waiting jobs (to sleep until it)."""

    # -- operator actions -------------------------------------------------------------
    def cancel(self, job_id: str, now: int | None = None) -> None:
        """Cancel a ``queued``/``retrying`` job. NotFound / Conflict otherwise."""

    def retry(self, job_id: str, max_queue_size: int, now: int | None = None) -> None:
        """Send a ``failed`` job back to ``queued`` with a fresh attempt
        budget. NotFound / Conflict / QueueFull otherwise. Whether the upload
        still exists is the caller's check (housekeeping.retry_failed): a
        store never touches files."""

    # -- reading ------------------------------------------------------------------------
    def get(self, job_id: str) -> Job | None: ...

    def queue_position(self, job: Job) -> int:
        """1-based position of a waiting job in claim order (ignoring run_at)."""

    def list(self, status: str | None = None, limit: int = 50) -> list[Job]:
        """Newest first, optionally of one status."""

    def batch(self, batch_id: str) -> list[Job]:
        """The jobs of a batch in submission order."""

    def stats(self, now: int | None = None) -> QueueStats: ...

    def activity(self, since: int) -> list[MinuteActivity]:
        """Per minute since ``since`` (ms), minutes with activity only, oldest first."""

    def waiting_by_priority(self) -> list[PriorityCounts]:
        """Queued, retrying and processing jobs per priority, highest first."""

    def recent_failures(self, limit: int = 10) -> list[Job]:
        """The latest failed jobs, newest failure first."""

    # -- housekeeping (rows only) -----------------------------------------------------------
    def expired(self, older_than: int, limit: int = 1000) -> list[Job]:
        """Finished jobs completed before ``older_than`` (at most ``limit``)."""

    def delete(self, job_ids: Iterable[str]) -> int:
        """Delete finished jobs' rows, keeping the completed/failed totals.
        Returns rows deleted (unfinished ones are never deleted)."""

    def known_ids(self, job_ids: Iterable[str]) -> set[str]:
        """Which of ``job_ids`` have a row."""

    # -- supervisors --------------------------------------------------------------------------
    def heartbeat(self, sup_id: str, hostname: str, pid: int, started_at: int, state: dict[str, Any]) -> None:
        """Register or refresh supervisor ``sup_id`` with its current state."""

    def supervisors(self) -> list[SupervisorRow]:
        """Every registered supervisor, most recent heartbeat first."""

    def remove_supervisors(self, sup_ids: Iterable[str]) -> None: ...
