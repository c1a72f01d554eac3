"""SQLite connections and schema migrations.

Contract:
- :func:`connect` opens one connection for the calling process, in WAL mode
  with a busy timeout, in autocommit mode so that every write transaction is
  opened explicitly by :func:`write` with ``BEGIN IMMEDIATE`` (a deferred
  transaction that later needs the write lock fails at once with "database is
  locked" instead of waiting for it).
- Connections are never carried across ``fork``: workers are fresh
  interpreters and open none; the queue reopens when it sees a new pid.
- Migrations are ``migrations/NNNN_name.sql``, run by migrate.py (the one
  runner for both databases) with the :data:`SQLITE` dialect: each file in
  one BEGIN IMMEDIATE transaction with its ledger row (the write lock
  serialises runners), its statements split with sqlite3.complete_statement.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import quote

from . import migrate as runner
from .migrate import DatabaseError

MIN_SQLITE = (3, 35, 0)  # RETURNING, DROP COLUMN
BUSY_TIMEOUT_MS = 10_000


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
    return runner.available(directory or migrations_dir())


def applied_migrations(conn: sqlite3.Connection) -> dict[int, tuple[str, int]]:
    """version -> (name, applied_at ms) of the migrations recorded as applied."""
    return runner.applied(conn, SQLITE)


def pending_migrations(conn: sqlite3.Connection) -> list[str]:
    """File names of the migrations not yet applied, without writing
    anything (no ledger is created on a database that has none)."""
    return runner.pending(conn, SQLITE)


def migrate(conn: sqlite3.Connection, directory: Path | None = None, target: int | None = None) -> list[str]:
    """Apply pending migrations in order (up to ``target``); return their file names."""
    return runner.run(conn, SQLITE, directory, target)


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


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    for statement in _split_sql(script):
        conn.execute(statement)


SQLITE = runner.Dialect(
    directory=migrations_dir,
    write=write,
    serialise=lambda conn: None,  # BEGIN IMMEDIATE already holds the write lock
    ledger_exists=lambda conn: conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'").fetchone() is not None,
    run_script=_run_script,
    placeholder="?",
    time_type="INTEGER",
)
