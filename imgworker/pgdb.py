"""PostgreSQL connections and schema migrations (``DATABASE_URL``).

Contract:
- :func:`connect` opens one psycopg 3 connection in autocommit mode, so that
  every write transaction is opened explicitly (:func:`write`), as with the
  SQLite store. It raises :class:`config.ConfigError` naming DATABASE_URL,
  with the password masked, when psycopg is missing or the server cannot be
  reached at start: the CLI turns that into exit code 2.
- Migrations are ``migrations/postgres/NNNN_name.sql`` (the PostgreSQL
  dialect of ``migrations/NNNN_name.sql``), run by migrate.py with the
  :data:`POSTGRES` dialect: each file in one transaction with its ledger row
  (DDL is transactional), after a transaction-level advisory lock that
  serialises nodes migrating at once.
- Connections are never carried across ``fork`` (the store reopens per pid).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from . import db
from . import migrate as runner
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
    return runner.available(directory or migrations_dir())


def applied_migrations(conn: Any) -> dict[int, tuple[str, int]]:
    """version -> (name, applied_at ms) of the migrations recorded as applied
    (empty, without creating anything, on a database never migrated)."""
    return runner.applied(conn, POSTGRES)


def migrate(conn: Any, directory: Path | None = None, target: int | None = None) -> list[str]:
    """Apply pending migrations in order (up to ``target``); return their file names."""
    return runner.run(conn, POSTGRES, directory, target)


POSTGRES = runner.Dialect(
    directory=migrations_dir,
    write=write,
    serialise=lambda conn: conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,)),
    ledger_exists=lambda conn: conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL AS x").fetchone()["x"],
    run_script=lambda conn, script: conn.execute(script),  # one execute: psycopg sends the whole file
    placeholder="%s",
    time_type="BIGINT",
)
