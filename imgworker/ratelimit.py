"""Per-client rate limit of the work-creating requests (the POSTs).

The unit is a job: a batch of N files costs N, so a batch cannot carry more
work past the limit than single uploads could (issue 15 item 3). A client
already at the limit is refused from the request headers (:meth:`blocked`),
before the server reads its body; the files are counted once the body is
parsed (:meth:`take`). Status polls, downloads and health checks never
count, so a client polling every 500 ms is never locked out by its polling.
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """Fixed window per client key; memory is bounded by the clients active
    in the last window (expired entries are pruned once per window)."""

    def __init__(self, limit: int, window_s: float):
        self.limit = limit
        self.window = window_s
        self._hits: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._next_prune = 0.0

    def _current(self, key: str, now: float) -> tuple[float, int]:
        """(window start, count) of ``key``; caller holds the lock."""
        if now >= self._next_prune:
            self._hits = {k: v for k, v in self._hits.items() if now - v[0] < self.window}
            self._next_prune = now + self.window
        start, count = self._hits.get(key, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        return start, count

    def _headers(self, start: float, count: int, now: float) -> dict[str, str]:
        reset = max(1, int(start + self.window - now + 0.999))
        return {"RateLimit-Limit": str(self.limit), "RateLimit-Remaining": str(max(0, self.limit - count)),
                "RateLimit-Reset": str(reset)}

    def blocked(self, key: str) -> dict[str, str] | None:
        """The RateLimit-* headers if ``key`` has nothing left in this
        window (refuse it now, from the headers), else None. Counts nothing."""
        now = time.monotonic()
        with self._lock:
            start, count = self._current(key, now)
        return self._headers(start, count, now) if count >= self.limit else None

    def take(self, key: str, wanted: int = 1) -> tuple[int, dict[str, str]]:
        """Count up to ``wanted`` jobs for ``key``: (granted, RateLimit-* headers).
        ``granted`` < ``wanted`` when the window has fewer left."""
        now = time.monotonic()
        with self._lock:
            start, count = self._current(key, now)
            granted = max(0, min(wanted, self.limit - count))
            count += granted
            self._hits[key] = (start, count)
        return granted, self._headers(start, count, now)


class SharedRateLimiter(RateLimiter):
    """The same limit held across every API node of a PostgreSQL cluster.

    :meth:`take` counts in the database (one small table, a row per client
    updated under its row lock, by the database's clock: see
    ``PgStore.rate_take``), so N nodes together grant no more than the
    limit. :meth:`blocked` runs on the server's I/O thread and must not wait
    on the network: it answers from what this node last learnt about the
    client; a client this node has not seen yet is refused by :meth:`take`.
    """

    def __init__(self, limit: int, window_s: float, store: object):
        super().__init__(limit, window_s)
        self.store = store

    def take(self, key: str, wanted: int = 1) -> tuple[int, dict[str, str]]:
        window_ms = int(self.window * 1000)
        granted, count, start_ms, now_ms = self.store.rate_take(key, wanted, self.limit, window_ms)
        now = time.monotonic()
        start = now - (now_ms - start_ms) / 1000  # the window's start on this node's monotonic clock
        with self._lock:
            self._current(key, now)  # prunes this node's memory once per window
            self._hits[key] = (start, count)
            prune = now >= self._next_db_prune
            if prune:
                self._next_db_prune = now + self.window
        if prune:
            self.store.rate_prune(window_ms)
        return granted, self._headers(start, count, now)

    _next_db_prune = 0.0
