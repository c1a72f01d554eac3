"""One database connection per thread and process, for both SQL stores.

A connection is opened lazily by the thread that first needs it, and
reopened after a fork (never used across ``fork``) or when the store says
it is no longer usable; no connection is shared between threads (a status
poll never waits behind an upload's write transaction in another thread).
"""

from __future__ import annotations

import os
import threading
from typing import Any


class ThreadConnections:
    """Mixin: subclasses define ``_open()`` and may refine ``_usable(conn)``."""

    def _init_connections(self) -> None:
        self._local = threading.local()
        self._all: list[Any] = []
        self._all_lock = threading.Lock()

    def _open(self) -> Any:
        raise NotImplementedError

    def _usable(self, conn: Any) -> bool:
        return conn is not None

    @property
    def conn(self) -> Any:
        local = self._local
        if getattr(local, "pid", None) != os.getpid() or not self._usable(getattr(local, "conn", None)):
            local.conn = self._open()
            local.pid = os.getpid()
            with self._all_lock:
                self._all.append(local.conn)
        return local.conn

    def close(self) -> None:
        """Close every connection this process opened through the store."""
        with self._all_lock:
            conns, self._all = self._all, []
        for c in conns:
            try:
                c.close()
            except Exception:  # already closed or broken: nothing to release
                pass
        self._local = threading.local()
