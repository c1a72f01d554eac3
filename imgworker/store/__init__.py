"""The job store: one contract (base.JobStore), its implementations
(sqlite.py, postgres.py), and :func:`open_store`, the one place that picks
an implementation."""

from __future__ import annotations

from typing import Any

from .base import (Job, JobStore, MinuteActivity, NewJob, PriorityCounts, QueueStats, Recovered, RetryPolicy,
                   Settlement, StoreError, SupervisorRow, backoff_ms)

__all__ = ["Job", "JobStore", "MinuteActivity", "NewJob", "PriorityCounts", "QueueStats", "Recovered",
           "RetryPolicy", "Settlement", "StoreError", "SupervisorRow", "backoff_ms", "open_store"]


def open_store(cfg: Any, durable: bool = True, create: bool = True, role: str = "imgworker") -> JobStore:
    """The store the settings name: PostgreSQL when ``DATABASE_URL`` is set
    (several nodes), else SQLite at ``DATABASE_PATH`` (one VM).

    ``durable``: every commit reaches the disk before it returns (the API,
    which promises a job is kept once it answers 202); the supervisor may
    pass False because its writes can be redone. ``create=False``: the
    operator commands, which never create or migrate a database and fail
    with a StoreError naming it when there is none or it needs migrating.
    ``role`` names the connection on the PostgreSQL side (pg_stat_activity).
    """
    if getattr(cfg, "database_url", ""):
        from .postgres import PgStore

        return PgStore(cfg.database_url, durable=durable, application_name=role, create=create)
    from .sqlite import SqliteStore

    return SqliteStore(cfg.database_path, durable=durable, create=create)
