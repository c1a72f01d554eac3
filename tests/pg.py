"""A private, throwaway PostgreSQL server for the tests.

Started from Debian's ``postgresql`` binaries: ``initdb`` into a fresh temp
directory (as the ``postgres`` user when we are root: the server refuses to
run as root), listening only on a Unix socket inside that directory (no TCP
at all), stopped and removed at the end. Nothing else on the machine is
touched: no system cluster, no port, no file outside the temp directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path
from urllib.parse import quote

# Settings for a disposable test server: durability is not what the tests
# measure (fsync off), and a small footprint on a shared 2-core machine.
SERVER_OPTIONS = (
    "-c listen_addresses='' -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    " -c max_connections=200 -c shared_buffers=64MB -c log_min_messages=warning"
)


def find_bindir() -> Path | None:
    """Directory of initdb/pg_ctl/postgres: PG_BINDIR, else Debian's newest
    /usr/lib/postgresql/<v>/bin, else wherever initdb is on PATH."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                      key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    if versions:
        return Path(versions[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _run_as() -> str | None:
    """The user the server runs as: ourselves unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    return None


class PgServer:
    """One server in its own temp directory; :meth:`url` names a database."""

    def __init__(self, bindir: Path, options: str = SERVER_OPTIONS):
        self.bindir = bindir
        self.options = options
        self.user = _run_as()
        # short path: a Unix socket path is limited to ~107 bytes
        self.root = Path(tempfile.mkdtemp(prefix="imgw-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        # who owns this server: a later run sweeps it if this process dies
        # without its teardown (killed test run), see sweep_orphans
        (self.root / "owner").write_text(str(os.getpid()))
        if self.user:
            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self.started = False

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bindir / args[0]), *args[1:]], user=self.user, cwd=self.root,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, check=check, timeout=120)

    def start(self) -> "PgServer":
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--locale=C")
        self.ctl("start")
        self.started = True
        return self

    def ctl(self, action: str) -> None:
        """``pg_ctl start|stop|restart`` on this server, waiting for it."""
        args = ["pg_ctl", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.log)]
        if action in ("start", "restart"):
            args += ["-o", f"-k {self.root} {self.options}"]
        if action in ("stop", "restart"):
            args += ["-m", "fast"]
        try:
            self._run(*args, action)
        except subprocess.CalledProcessError as exc:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl {action} failed: {exc.stderr}\n{tail}") from None

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@/{dbname}?host={quote(str(self.root), safe='')}"

    def create_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.split("/")[3].split("?")[0]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        """Stop the server (immediately: it is thrown away) and remove everything."""
        if self.started:
            self._run("pg_ctl", "-D", str(self.data), "-w", "-m", "immediate", "stop", check=False)
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def sweep_orphans() -> None:
    """Stop and remove servers this helper started for test runs that died
    without their teardown (their ``owner`` process is gone). Directories
    without an owner file are not ours to judge and are left alone."""
    import signal

    for root in glob.glob("/tmp/imgw-pg-*"):
        try:
            owner = int(Path(root, "owner").read_text())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            continue
        try:
            postmaster = int(Path(root, "data", "postmaster.pid").read_text().split()[0])
            if _alive(postmaster):
                os.kill(postmaster, signal.SIGQUIT)  # immediate shutdown; it is thrown away
        except (OSError, ValueError, IndexError):
            pass
        shutil.rmtree(root, ignore_errors=True)


def start_server() -> tuple[PgServer | None, str]:
    """Start a server, or (None, why not) when PostgreSQL or psycopg is absent."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return None, "psycopg is not installed (pip install 'imgworker[postgres]')"
    bindir = find_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        return None, "PostgreSQL server binaries not found (apt-get install postgresql)"
    if os.geteuid() == 0 and _run_as() is None:
        return None, "running as root and no unprivileged user to run PostgreSQL as"
    sweep_orphans()
    server = PgServer(bindir)
    try:
        return server.start(), ""
    except BaseException:
        server.stop()
        raise
