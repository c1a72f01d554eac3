"""PostgreSQL connections and schema migrations (``DATABASE_URL``).

Contract:
- :func:`connect` opens one psycopg 3 connection in autocommit mode, so that
  every write transaction is opened explicitly (:func:`write`), as with the
  SQLite store. It raises :class:`config.ConfigError` naming DATABASE_URL,
  with the password masked, when psycopg is missing or the server cannot be
  reached at start: the CLI turns that into exit code 2.
- Migrations are ``migrations/postgres/NNNN_name.sql`` (the PostgreSQL
  dialect of ``migrations/NNNN_name.sql``), applied in order, each in one
  transaction with its row in ``schema_migrations``. A transaction-level
  advisory lock serialises nodes that migrate at once, so each file is
  applied exactly once.
- Connections are never carried across ``fork`` (the store reopens per pid).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from . import db
from .config import ConfigError, mask_password

CONNECT_TIMEOUT_S = 10
# pg_advisory_xact_lock key of the migration runner ("imgw" in ASCII)
MIGRATION_LOCK = 0x696D6777


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            "bad value for DATABASE_URL: the PostgreSQL store needs psycopg 3 "
            "(pip install 'imgworker[postgres]')"
        ) from None
    return psycopg


def connect(url: str, application_name: str = "imgworker") -> Any:
    """Open an autocommit connection with dict rows. ConfigError if the
    server cannot be reached or refuses us (bad host, database, user,
    password), naming DATABASE_URL with the password masked."""
    psycopg = _psycopg()
    from psycopg.rows import dict_row

    try:
        return psycopg.connect(url, autocommit=True, row_factory=dict_row, connect_timeout=CONNECT_TIMEOUT_S,
                               application_name=application_name)
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(
            f"bad value for DATABASE_URL: {mask_password(url)!r} (cannot connect: {mask_password(reason)})"
        ) from None
    except psycopg.ProgrammingError as exc:  # an unknown option in the URL
        raise ConfigError(f"bad value for DATABASE_URL: {mask_password(url)!r} ({exc})") from None


@contextmanager
def write(conn: Any) -> Iterator[Any]:
    """One write transaction: BEGIN ... COMMIT, ROLLBACK on error (the
    autocommit connection's ``transaction()`` block)."""
    with conn.transaction():
        yield conn


def migrations_dir() -> Path:
    """The PostgreSQL migrations, beside the SQLite ones."""
    path = db.migrations_dir() / "postgres"
    if not any(path.glob("[0-9][0-9][0-9][0-9]_*.sql")):
        raise db.DatabaseError(f"no PostgreSQL migrations in {path}")
    return path


def available_migrations(directory: Path | None = None) -> list[tuple[int, str, Path]]:
    return db.available_migrations(directory or migrations_dir())


def _ensure_ledger(conn: Any) -> None:
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
    )


def applied_migrations(conn: Any) -> dict[int, tuple[str, int]]:
    """version -> (name, applied_at ms) of the migrations recorded as applied
    (empty, without creating anything, on a database never migrated)."""
    exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL AS x").fetchone()["x"]
    if not exists:
        return {}
    rows = conn.execute("SELECT version, name, applied_at FROM schema_migrations").fetchall()
    return {r["version"]: (r["name"], r["applied_at"]) for r in rows}


def migrate(conn: Any, directory: Path | None = None, target: int | None = None) -> list[str]:
    """Apply pending migrations in order (up to ``target``); return their
    file names. Each file and its ledger row commit together (PostgreSQL
    DDL is transactional), so a failed file leaves the previous version."""
    done: list[str] = []
    for version, name, path in available_migrations(directory):
        if target is not None and version > target:
            break
        sql = path.read_text(encoding="utf-8")
        with write(conn):
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            _ensure_ledger(conn)
            if version in applied_migrations(conn):
                continue
            conn.execute(sql)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (%s, %s, %s)",
                (version, name, int(time.time() * 1000)),
            )
        done.append(path.name)
    return done
