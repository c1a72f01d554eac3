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
