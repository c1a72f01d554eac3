"""The one clock of the package.

Two kinds of time, never mixed: wall-clock milliseconds since the Unix epoch
(:func:`now_ms`) for anything stored or compared across processes and
restarts (job rows, heartbeats), and the monotonic clock
(:func:`monotonic`) for every deadline and duration inside one process, so
that a clock step never fires or postpones a timeout.
"""

from __future__ import annotations

import time

monotonic = time.monotonic


def now_ms() -> int:
    """Wall-clock milliseconds since the Unix epoch."""
    return int(time.time() * 1000)


def iso(ms: int | None) -> str | None:
    """``2024-05-01T12:00:00.123Z`` for epoch milliseconds (None stays None)."""
    if ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


def hms(ms: int) -> str:
    """``12:00:00.123Z``: a time of day for log lines."""
    return time.strftime("%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"
