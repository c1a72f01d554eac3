"""The schema migration runner, one for both databases.

Contract:
- Migrations are ``NNNN_name.sql`` files in a dialect's directory
  (``migrations/`` for SQLite, ``migrations/postgres/`` for PostgreSQL: the
  same versions and meaning), applied in version order up to an optional
  target; the file names applied are returned.
- Each file runs in one write transaction together with its row in
  ``schema_migrations``: a file that fails leaves the previous version, and
  runners on several processes or nodes at once apply each file exactly once
  (the ledger is read inside the transaction, after :attr:`Dialect.serialise`).
- Reading the ledger (:func:`applied`, :func:`pending`) never creates it.

What differs between the databases is all in a :class:`Dialect`, written
beside each one's connection code (``db.SQLITE``, ``pgdb.POSTGRES``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

from .clock import now_ms
from .store.base import StoreError

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class DatabaseError(StoreError):
    """The database cannot be used (too old, unreadable, bad migration)."""


@dataclass(frozen=True)
class Dialect:
    """How one database runs the migrations."""

    directory: Callable[[], Path]                # where its migration files are
    write: Callable[[Any], ContextManager[Any]]  # one write transaction on a connection
    serialise: Callable[[Any], None]             # first thing in it: makes concurrent runners wait their turn
    ledger_exists: Callable[[Any], bool]         # without creating it
    run_script: Callable[[Any, str], None]       # a migration file's statements, in the open transaction
    placeholder: str                             # "?" (sqlite3) or "%s" (psycopg)
    time_type: str                               # the ledger's column type for milliseconds


def available(directory: Path) -> list[tuple[int, str, Path]]:
    """(version, name, path) of every migration file in ``directory``, in order."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    versions = [v for v, _, _ in found]
    if len(versions) != len(set(versions)):
        raise DatabaseError("two migrations share a version number")
    return found


def applied(conn: Any, dialect: Dialect) -> dict[int, tuple[str, int]]:
    """version -> (name, applied_at ms) of the migrations recorded as applied
    (empty, creating nothing, on a database never migrated)."""
    if not dialect.ledger_exists(conn):
        return {}
    rows = conn.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
    return {r["version"]: (r["name"], r["applied_at"]) for r in rows}


def pending(conn: Any, dialect: Dialect) -> list[str]:
    """File names of the migrations not applied yet (nothing is written)."""
    done = applied(conn, dialect)
    return [path.name for version, _, path in available(dialect.directory()) if version not in done]


def run(conn: Any, dialect: Dialect, directory: Path | None = None, target: int | None = None) -> list[str]:
    """Apply the pending migrations in order (up to ``target``); return their file names."""
    p = dialect.placeholder
    done: list[str] = []
    for version, name, path in available(directory or dialect.directory()):
        if target is not None and version > target:
            break
        script = path.read_text(encoding="utf-8")
        with dialect.write(conn):
            dialect.serialise(conn)
            conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                         f" version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at {dialect.time_type} NOT NULL)")
            if version in applied(conn, dialect):
                continue  # another runner applied it while we waited
            dialect.run_script(conn, script)
            conn.execute(f"INSERT INTO schema_migrations (version, name, applied_at) VALUES ({p}, {p}, {p})",
                         (version, name, now_ms()))
        done.append(path.name)
    return done
