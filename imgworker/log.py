"""Logging: one line per event on stderr, readable in a terminal and in journald.

Format: ``<UTC time> <LEVEL> <component> [job=<id>] message``. journald adds
its own timestamp; the one here keeps lines useful when redirected to a file.
"""

from __future__ import annotations

import logging
import sys
import time


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"
        job = getattr(record, "job", None)
        tag = f" job={job}" if job else ""
        line = f"{stamp} {record.levelname:<7} {record.name.removeprefix('imgworker.')}{tag} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup(level: str = "info") -> None:
    """Send imgworker's records to stderr at ``level`` (debug/info/warning/error)."""
    root = logging.getLogger("imgworker")
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    if not any(getattr(h, "_imgworker", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter())
        handler._imgworker = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"imgworker.{name}")
