"""The ``imgworker`` command: service processes and operator commands.

Exit codes: 0 ok, 1 failure, 2 bad usage or bad configuration (the message
names the key), so systemd's RestartPreventExitStatus=2 stops a restart loop.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Sequence

from . import config as config_mod
from . import log
from .clock import now_ms
from .model import STATUSES, output_filename
from .errors import StoreError  # not from .store: `process` never opens a database

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
CHECKED = "IMGWORKER_SETTINGS_CHECKED"  # set by serve for its children


def _quality(raw: str) -> int:
    """--quality: the range the server accepts, so --local agrees with it."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 100 (got {raw!r})") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to 100 (got {raw!r})")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imgworker", description="Durable image-processing job service.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", help="API + supervisor + worker pool in one command (the everyday start)")
    sub.add_parser("api", help="the HTTP API alone")
    sub.add_parser("worker", help="the supervisor and its worker pool alone")
    m = sub.add_parser("migrate", help="apply database migrations")
    m.add_argument("--status", action="store_true", help="list migrations and whether each is applied")
    pr = sub.add_parser("process", help="upload files to a server, wait, download (local fallback)")
    pr.add_argument("paths", nargs="+", metavar="PATH", help="files or folders (recursive)")
    pr.add_argument("--server", default=None, help="server URL (default http://HOST:PORT)")
    pr.add_argument("--out", default=".", help="output folder (default: current folder)")
    pr.add_argument("--format", default=None, choices=config_mod.OUTPUT_FORMATS)
    pr.add_argument("--priority", type=int, default=0)
    pr.add_argument("--quality", type=_quality, default=None, help="1-100 (as the server accepts)")
    pr.add_argument("--local", action="store_true", help="process here, without a server")
    pr.add_argument("--wait", type=float, default=15.0, metavar="SECONDS",
                    help="when the server goes away mid-batch, wait this long for it before processing here (default 15)")
    pr.add_argument("--json", action="store_true", help="print one JSON result per file")
    j = sub.add_parser("jobs", help="list jobs, newest first")
    j.add_argument("--status", choices=STATUSES)
    j.add_argument("--limit", type=int, default=20)
    j.add_argument("--json", action="store_true")
    one = sub.add_parser("job", help="show one job")
    one.add_argument("id")
    one.add_argument("--json", action="store_true")
    r = sub.add_parser("retry", help="send a failed job back to the queue")
    r.add_argument("id")
    c = sub.add_parser("cancel", help="cancel a queued or retrying job")
    c.add_argument("id")
    s = sub.add_parser("stats", help="queue statistics")
    s.add_argument("--json", action="store_true")
    sub.add_parser("cleanup", help="remove expired jobs, their files and orphan files now")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    if not args.command:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        cfg = config_mod.load()
    except config_mod.ConfigError as exc:
        print(f"imgworker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    log.setup(cfg.log_level, cfg.log_format)
    if not os.environ.get(CHECKED):  # serve's halves load the same settings: said once, by serve
        for warning in cfg.warnings:
            print(f"imgworker: warning: {warning}", file=sys.stderr)
    try:
        return COMMANDS[args.command](cfg, args)
    except config_mod.ConfigError as exc:  # e.g. an unreachable DATABASE_URL
        print(f"imgworker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StoreError as exc:
        print(f"imgworker: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `imgworker jobs | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL


def _prepare(cfg: config_mod.Config) -> None:
    """Data directories and migrations: service start and `migrate` only."""
    from .storage import Storage
    from .store import open_store

    Storage.for_config(cfg).ensure()
    store = open_store(cfg, role="imgworker-cli")
    try:
        store.migrate()
    finally:
        store.close()


def _store(cfg: config_mod.Config):
    """The existing database, for the operator commands: never created or
    migrated here (StoreError when missing or out of date). Says which one
    it is on stderr, so that stdout stays the command's output."""
    from .store import open_store

    store = open_store(cfg, create=False, role="imgworker-cli")
    store.stats()  # open now: a missing database fails before any output
    print(f"imgworker: database {store.location}", file=sys.stderr)
    return store


# -- service processes ------------------------------------------------------------
def cmd_worker(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from . import supervisor

    return supervisor.run(cfg)


def cmd_api(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from . import api

    return api.run(cfg)


def cmd_serve(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """Run ``imgworker api`` and ``imgworker worker`` as two children, the way
    the systemd units do. A child that dies is restarted (after a second, so
    a crash loop does not spin); a configuration error (exit 2) or
    SIGTERM/SIGINT stops both; SIGHUP is passed to both (reload) and serve
    stays up."""
    _prepare(cfg)  # data dirs + migrations, once, before either half starts
    me = log.get("serve")

    def start(name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "imgworker", name], env={**os.environ, CHECKED: "1"})

    children = {name: start(name) for name in ("worker", "api")}
    restart_at: dict[str, float] = {}
    stop: list[int] = []
    hups: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _f: stop.append(s))
    # HUP is the reload signal: pass it on to both halves and stay up (its
    # default action would kill serve and leave the halves running, orphaned)
    signal.signal(signal.SIGHUP, lambda s, _f: hups.append(s))
    code = EXIT_OK
    while not stop:
        if hups:
            hups.clear()
            me.info("Received SIGHUP: asking both halves to reload their settings")
            for proc in children.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGHUP)
        for name, proc in children.items():
            if proc.poll() is None or name in restart_at:
                continue
            if proc.returncode == EXIT_USAGE:
                me.error("The %s process refused its configuration (exit 2); stopping", name)
                stop.append(signal.SIGTERM)
                code = EXIT_USAGE
                break
            me.error("The %s process exited with code %s; restarting it", name, proc.returncode)
            restart_at[name] = time.monotonic() + 1
        for name, when in list(restart_at.items()):
            if time.monotonic() >= when:
                children[name] = start(name)
                del restart_at[name]
        time.sleep(0.1)
    sig = stop[0]
    for p in children.values():
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + cfg.shutdown_timeout_ms / 1000 + 10
    for name, p in children.items():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            me.error("The %s process did not stop in time: killing it", name)
            p.kill()
            p.wait()
        if code == EXIT_OK and p.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
            code = EXIT_FAIL
    return code


# -- database commands ---------------------------------------------------------------
def cmd_migrate(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """Apply pending migrations (or list them with --status) on the
    configured database: PostgreSQL when DATABASE_URL is set, else SQLite."""
    from .storage import Storage

    if cfg.database_url:
        from . import pgdb as dialect

        conn = dialect.connect(cfg.database_url, application_name="imgworker-cli")
    else:
        from . import db as dialect  # type: ignore[no-redef]

        Storage.for_config(cfg).ensure()
        conn = dialect.connect(cfg.database_path)
    try:
        if args.status:
            applied = dialect.applied_migrations(conn)
            print(f"database {cfg.database_label}")
            for version, name, _path in dialect.available_migrations():
                when = applied.get(version)
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when[1] / 1000)) if when else "pending"
                print(f"{version:04d}  {name:<30} {stamp}")
            return EXIT_OK
        done = dialect.migrate(conn)
    finally:
        conn.close()
    print("\n".join(f"applied {n}" for n in done) if done else "database is up to date")
    return EXIT_OK


def _fmt_time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _public(job: Any) -> dict[str, Any]:
    from .views import result_view

    keep = ("id", "batch_id", "status", "priority", "attempts", "max_attempts", "original_name", "input_size",
            "created_at", "started_at", "completed_at", "run_at", "error_code", "error", "options")
    return {**{k: getattr(job, k) for k in keep},
            "result": result_view(job.id, job.original_name, job.outcome) if job.outcome else None}


def cmd_jobs(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    jobs = _store(cfg).list(args.status, args.limit)
    if args.json:
        print(json.dumps([_public(j) for j in jobs], indent=2))
        return EXIT_OK
    rows = [[j.id, j.status, str(j.priority), f"{j.attempts}/{j.max_attempts}",
             _fmt_time(j.created_at), j.original_name[:40], j.error_code or ""] for j in jobs]
    print(_table(rows, ["ID", "STATUS", "PRI", "TRIES", "CREATED", "FILE", "ERROR"]) if rows else "no jobs")
    return EXIT_OK


def cmd_job(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    job = _store(cfg).get(args.id)
    if job is None:
        print(f"imgworker: job {args.id} not found", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps(_public(job), indent=2))
        return EXIT_OK
    fields = [("id", job.id), ("status", job.status), ("priority", job.priority),
              ("attempts", f"{job.attempts}/{job.max_attempts}"), ("file", job.original_name),
              ("size", job.input_size), ("created", _fmt_time(job.created_at)),
              ("started", _fmt_time(job.started_at)), ("finished", _fmt_time(job.completed_at))]
    if job.status == "retrying":
        fields.append(("next retry", _fmt_time(job.run_at)))
    if job.error_code:
        fields.append(("error", f"{job.error_code}: {job.error}"))
    if job.outcome:
        o = job.outcome
        fields.append(("output", f"{output_filename(job.id, o.output_format)} ({o.output_size} bytes, "
                                 f"{o.output_width}x{o.output_height})"))
    print("\n".join(f"{k:<11} {v}" for k, v in fields))
    return EXIT_OK


def _action(fn_name: str, done: str):
    def command(cfg: config_mod.Config, args: argparse.Namespace) -> int:
        from .errors import ServiceError
        from .housekeeping import retry_failed
        from .storage import Storage

        store = _store(cfg)
        try:
            if fn_name == "retry":
                retry_failed(store, args.id, cfg.max_queue_size)
            else:
                job = store.get(args.id)
                store.cancel(args.id)
                Storage.for_config(cfg).discard_upload(job.input_path if job else None)  # never retried
        except ServiceError as exc:
            print(f"imgworker: {exc.message}", file=sys.stderr)
            return EXIT_FAIL
        store.notify()
        print(f"job {args.id} {done}")
        return EXIT_OK

    return command


def cmd_stats(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .views import stats_view

    store = _store(cfg)
    stats = stats_view(store.stats())
    sups = store.supervisors()
    if args.json:
        print(json.dumps({**stats, "supervisors": [asdict(s) for s in sups]}, indent=2))
        return EXIT_OK
    width = max(len(k) for k in stats)
    for k, v in stats.items():
        if k != "byStatus":
            print(f"{k:<{width}}  {v}")
    print("by status".ljust(width) + "  " + ", ".join(f"{k} {v}" for k, v in stats["byStatus"].items()))
    for s in sups:
        st = s.state
        age = (now_ms() - s.heartbeat_at) / 1000
        w = st.get("workers") or {}
        state = f"paused ({st.get('pauseReason') or 'no reason given'})" if st.get("paused") else "running"
        print(f"supervisor {s.id}: {state}, heartbeat {age:.1f}s ago, workers {w.get('alive', 0)}/"
              f"{w.get('configured', 0)} alive, {w.get('busy', 0)} busy")
    return EXIT_OK


def cmd_cleanup(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from .housekeeping import Housekeeper
    from .storage import Storage

    counts = Housekeeper(_store(cfg), Storage.for_config(cfg)).cleanup(cfg.job_retention_ms)
    print(f"removed {counts['jobs']} expired jobs and {counts['files']} files")
    return EXIT_OK


def cmd_process(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    from . import client, heap

    heap.keep_freed_memory()  # this process may run the pipeline on many images (heap.py)
    return client.cli(cfg, args)


COMMANDS = {
    "serve": cmd_serve, "api": cmd_api, "worker": cmd_worker, "migrate": cmd_migrate, "process": cmd_process,
    "jobs": cmd_jobs, "job": cmd_job, "retry": _action("retry", "queued again"),
    "cancel": _action("cancel", "cancelled"), "stats": cmd_stats, "cleanup": cmd_cleanup,
}

if __name__ == "__main__":
    sys.exit(main())
