"""Which job store a process uses: the one place that reads DATABASE_URL.

``DATABASE_URL`` set: the PostgreSQL store (pgqueue.py, several nodes);
unset: the embedded SQLite store at DATABASE_PATH (queue.py, one VM).
"""

from __future__ import annotations

from typing import Any

from . import config as config_mod
from .queue import JobQueue


def open_queue(cfg: config_mod.Config, durable: bool = True, role: str = "imgworker") -> Any:
    """The job store for ``cfg``. ``durable=False`` is the supervisor's
    setting (outcomes may be redone after a crash; see each store), ``role``
    names the connection on the PostgreSQL side (pg_stat_activity)."""
    if cfg.database_url:
        from .pgqueue import PgJobQueue

        return PgJobQueue(cfg.database_url, durable=durable, application_name=role)
    return JobQueue(cfg.database_path, durable=durable)
