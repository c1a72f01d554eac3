"""Logging: one line per event on stderr, readable in a terminal and in journald.

Text format (LOG_FORMAT=text): ``<UTC time> <LEVEL> <component> [job=<id>] message``.
journald adds its own timestamp; the one here keeps lines useful when
redirected to a file. JSON format (LOG_FORMAT=json): one object per line with
``time, level, component, job, message`` and ``exception`` when there is one.

A log line can never be forged by a client: messages carry request data
(paths, methods, file names) and the formatter escapes every control and
line-separator character in them (``\\n`` becomes the two characters ``\\n``),
so one record is always exactly one line; a traceback's lines are each
prefixed with ``| `` so none can pass for a record. Waitress' own logger goes
through the same formatter.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

# C0, DEL, C1 and the Unicode line/paragraph separators: anything a terminal
# or a log reader could take as a line break or a control sequence
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """``text`` with control characters written as escapes (``\\n``, ``\\x1b``)."""

    def one(m: re.Match[str]) -> str:
        ch = m.group()
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch) or (
            f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")

    return _CONTROL.sub(one, text)


def _stamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a bad format string from a library must not lose the record
        return f"{record.msg!r} {record.args!r}"


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        job = getattr(record, "job", None)
        tag = f" job={escape(str(job))}" if job else ""
        line = (f"{_stamp(record)} {record.levelname:<7} {record.name.removeprefix('imgworker.')}{tag} "
                f"{escape(_message(record))}")
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "".join(f"\n| {escape(part)}" for part in trace.splitlines())
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": _stamp(record), "level": record.levelname,
               "component": record.name.removeprefix("imgworker."), "message": _message(record)}
        job = getattr(record, "job", None)
        if job:
            out["job"] = str(job)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True)  # escapes every control character


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send imgworker's records to stderr at ``level`` (debug/info/warning/error)
    in ``fmt`` (text/json); Waitress' warnings and errors go the same way."""
    formatter = _JsonFormatter() if fmt == "json" else _TextFormatter()
    for name, lvl in (("imgworker", getattr(logging, level.upper(), logging.INFO)), ("waitress", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.setLevel(lvl)
        mine = [h for h in logger.handlers if getattr(h, "_imgworker", False)]
        if not mine:
            handler = logging.StreamHandler(sys.stderr)
            handler._imgworker = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            mine = [handler]
        for handler in mine:
            handler.setFormatter(formatter)
        logger.propagate = False


def get(name: str) -> logging.Logger:
    return logging.getLogger(f"imgworker.{name}")
