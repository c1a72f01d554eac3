"""SQLite connections and schema migrations.

Contract:
- :func:`connect` opens one connection for the calling process, in WAL mode
  with a busy timeout, in autocommit mode so that every write transaction is
  opened explicitly by :func:`write` with ``BEGIN IMMEDIATE`` (a deferred
  transaction that later needs the write lock fails at once with "database is
  locked" instead of waiting for it).
- Connections are never carried across ``fork``: workers are fresh
  interpreters and open none; the queue reopens when it sees a new pid.
- Migrations are ``migrations/NNNN_name.sql``, applied in order, each in one
  transaction together with its row in ``schema_migrations``; applying twice
  is a no-op.
"""

from __future__ import annotations

import re
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from .clock import now_ms
from .store.base import StoreError

MIN_SQLITE = (3, 35, 0)  # RETURNING, DROP COLUMN
BUSY_TIMEOUT_MS = 10_000
_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class DatabaseError(StoreError):
    """The database cannot be used (too old, unreadable, bad migration)."""


class StoreUnavailable(DatabaseError):
    """The database cannot be written now: the server stayed unreachable
    past the store's reconnect budget (PostgreSQL), or the file stayed locked
    past WRITE_WAIT_S or its disk is full or failing (SQLite). The caller
    backs off and tries again (the supervisor) or answers 503 with
    Retry-After (the API); nothing was written."""


def check_sqlite_version(version: str = sqlite3.sqlite_version) -> None:
    """Refuse SQLite older than 3.35 (no RETURNING) with a clear message."""
    parts = tuple(int(p) for p in version.split(".")[:3])
    if parts < MIN_SQLITE:
        raise DatabaseError(
            f"SQLite {version} is too old: imgworker needs {'.'.join(map(str, MIN_SQLITE))} "
            "or newer (for UPDATE ... RETURNING); install a newer libsqlite3"
        )


def connect(path: Path | str, durable: bool = True, must_exist: bool = False) -> sqlite3.Connection:
    """Open a connection configured for the queue (``must_exist``: never
    create the file; sqlite3.OperationalError when it is missing).

    ``durable`` selects ``synchronous=FULL`` (each commit reaches the disk:
    used by the API, which promises a job is kept once it answers 202) or
    ``NORMAL`` (safe against process crashes, may lose the last commits on
    power loss: used by the supervisor, whose writes can be redone because
    outputs are idempotent).
    """
    check_sqlite_version()
    target = f"file:{quote(str(Path(path).resolve()))}?mode=rw" if must_exist else str(path)
    conn = sqlite3.connect(
        target, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False, uri=must_exist
    )
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise DatabaseError(f"could not switch {path} to WAL mode (got {mode})")
    conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
    if durable:
        # Checkpoints (which fsync the database file) happen in the
        # supervisor's connection, off the request path: an upload's commit
        # never waits for one.
        conn.execute("PRAGMA wal_autocheckpoint = 0")
    # Reads through mmap and a bigger page cache: the claim path re-reads
    # the same few index and table pages thousands of times a second.
    conn.execute("PRAGMA mmap_size = 268435456")
    conn.execute("PRAGMA cache_size = -16000")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


WRITE_WAIT_S = 15.0       # how long a write waits for the lock in all before StoreUnavailable
_UNAVAILABLE = ("locked", "busy", "disk is full", "disk i/o error")


def unavailable(exc: sqlite3.OperationalError) -> bool:
    """The database cannot take writes now (locked past the wait, its disk
    full or failing), as opposed to a bug in a statement."""
    return any(mark in str(exc).lower() for mark in _UNAVAILABLE)


@contextmanager
def write(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: BEGIN IMMEDIATE ... COMMIT, ROLLBACK on error.

    The busy timeout makes BEGIN IMMEDIATE wait for the write lock; should it
    still report "locked" (the busy handler gave up under heavy contention),
    we wait and try again rather than let the error escape to a caller, for
    WRITE_WAIT_S in all. A lock held longer than that (an operator's shell
    in BEGIN IMMEDIATE), or a disk that is full or failing, raises
    :class:`StoreUnavailable` with nothing written: callers back off
    (supervisor) or answer 503 with Retry-After (API).
    """
    deadline = time.monotonic() + WRITE_WAIT_S
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                if unavailable(exc):
                    raise StoreUnavailable(f"database cannot take writes: {exc}") from exc
                raise
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"database is locked (waited {WRITE_WAIT_S:g} s for the write lock)") from exc
            time.sleep(0.005)
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException as exc:
        if conn.in_transaction:  # a failed COMMIT (disk full) can leave it open
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.OperationalError) and unavailable(exc):
            raise StoreUnavailable(f"database cannot take writes: {exc}") from exc
        raise


def migrations_dir() -> Path:
    """Where the .sql files are: inside the installed package, else the checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if any(candidate.glob("[0-9][0-9][0-9][0-9]_*.sql")):
            return candidate
    raise DatabaseError(f"no migrations found beside {here}")


def available_migrations(directory: Path | None = None) -> list[tuple[int, str, Path]]:
    """(version, name, path) of every migration file, in order."""
    found = []
    for path in sorted((directory or migrations_dir()).glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path))
    versions = [v for v, _, _ in found]
    if len(versions) != len(set(versions)):
        raise DatabaseError("two migrations share a version number")
    return found


def _ensure_ledger(conn: sqlite3.Connection) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )


def applied_migrations(conn: sqlite3.Connection) -> dict[int, tuple[str, int]]:
    """version -> (name, applied_at ms) of the migrations recorded as applied."""
    _ensure_ledger(conn)
    rows = conn.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
    return {row[0]: (row[1], row[2]) for row in rows}


def pending_migrations(conn: sqlite3.Connection) -> list[str]:
    """File names of the migrations not yet applied, without writing
    anything (no ledger is created on a database that has none)."""
    has_ledger = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ).fetchone()
    applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")} if has_ledger else set()
    return [path.name for version, _, path in available_migrations() if version not in applied]


def migrate(conn: sqlite3.Connection, directory: Path | None = None, target: int | None = None) -> list[str]:
    """Apply pending migrations in order (up to ``target``); return their file names.

    Each file runs inside one BEGIN IMMEDIATE transaction with its ledger row,
    so a crash mid-migration leaves the previous version intact, and two
    processes migrating at once apply each file exactly once.
    """
    done: list[str] = []
    for version, name, path in available_migrations(directory):
        if target is not None and version > target:
            break
        sql = path.read_text(encoding="utf-8")
        with write(conn):
            if version in applied_migrations(conn):
                continue
            for statement in _split_sql(sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (version, name, now_ms()),
            )
        done.append(path.name)
    return done


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (sqlite3.complete_statement aware)."""
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        if not current and line.strip().startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                statements.append(current.strip())
            current = ""
    if current.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in current.splitlines()
    ):
        raise DatabaseError("migration ends with an incomplete statement")
    return statements
