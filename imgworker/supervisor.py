"""The supervisor: owns the worker pool (pool.py) and every job outcome.

Shape (after gunicorn's arbiter): signal handlers only queue the signal and
wake the loop; each turn of the loop (:meth:`Supervisor.step`) dispatches
signals, reaps dead workers, times out stuck jobs, escalates kills, tops the
pool up, does the periodic work and hands claimed jobs to idle workers.

Contract:
- Only the supervisor writes job outcomes; workers never touch the database.
- A job past JOB_TIMEOUT_MS has its worker stopped: SIGTERM to its process
  group, SIGKILL KILL_GRACE_S later whatever the worker does (it may be
  stuck in C code, stopped by SIGSTOP or ignoring SIGTERM); the job is
  retried or failed with TIMEOUT; a job whose previous attempt timed out
  too is failed at once (a deterministic input that is slow twice is slow
  every time: retrying it only holds a worker). Timeouts are judged only after reading
  what the late workers already sent (a supervisor that was itself stalled
  records their completions, not TIMEOUT). The stopped worker keeps its slot until
  it is reaped, so the pool never exceeds MAX_CONCURRENT_JOBS processes.
- A worker that dies on its own is reaped at once, logged with its signal,
  replaced, and its job retried (WORKER_CRASHED).
- A worker that dies before it is ready is a boot failure: the next start
  waits BOOT_BACKOFF_S, doubling up to BOOT_BACKOFF_MAX_S; after
  BOOT_FAILURE_LIMIT in a row the supervisor stops with exit code 3 (like
  gunicorn's WORKER_BOOT_ERROR) rather than spawn forever.
- On start and periodically, ``processing`` rows whose lease expired or whose
  supervisor is gone are taken back (store.recover).
- Before each claim memory use is read; at or above MEMORY_PAUSE_PERCENT no
  job is claimed until use is below MEMORY_RESUME_PERCENT.
- A job's I/O error (IO_ERROR, transient: retried with backoff) makes it
  check that the data directories can be written; while one cannot, no job
  is claimed (rechecked every STORAGE_CHECK_S), so jobs wait, not fail.
- SIGTERM/SIGINT: stop claiming, let running jobs finish within
  SHUTDOWN_TIMEOUT_MS, then kill and release the rest without spending an
  attempt; exit 0. SIGHUP: re-read settings (thresholds, timeouts, log level).
"""

from __future__ import annotations

import os
import select
import selectors
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil

from . import config as config_mod
from . import db, log, notify
from .clock import hms, monotonic, now_ms
from .housekeeping import Housekeeper
from .limits import Limits
from .memory import MemoryProbe
from .model import ErrorCode, JobStatus, Outcome, output_filename
from .pool import Pool, Processes, Worker, WorkerState
from .storage import Storage
from .store import Job, RetryPolicy, SupervisorRow, open_store
from .wire import job_message, parse_report, recv, send

LOG = log.get("supervisor")
HEARTBEAT_S = 1.0
POLL_S = 0.25             # claim poll when no wake-up arrives (other hosts, lost datagrams)
KILL_GRACE_S = 0.2        # SIGTERM -> SIGKILL of a timed-out worker
RECYCLE_GRACE_S = 5.0     # EOF -> SIGKILL of an idle worker asked to exit (recycling, shutdown)
SHUTDOWN_REAP_S = 2.0     # how long shutdown waits for idle workers to exit on EOF
BOOT_TIMEOUT_S = 30.0     # a worker not ready by then is killed (a boot failure)
BOOT_BACKOFF_S = 1.0      # pause before replacing a worker that died while starting; doubles
BOOT_BACKOFF_MAX_S = 30.0
DB_BACKOFF_S = 1.0        # pause after a turn the database could not be written in; doubles
DB_BACKOFF_MAX_S = 8.0
BOOT_FAILURE_LIMIT = 5    # boot failures in a row after which the supervisor stops
EXIT_BOOT_FAILURE = 3
LEASE_GRACE_MS = 10_000
DEAD_AFTER_MS = 60_000    # a supervisor on another host silent this long is dead
STORAGE_CHECK_S = 2.0     # how often a pause for an unwritable data directory is rechecked
PROCESSING_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


@dataclass
class Counters:
    started: int = 0
    completed: int = 0
    failed: int = 0
    retried: int = 0
    timeouts: int = 0
    crashes: int = 0
    recycled: int = 0
    spawned: int = 0
    db_unavailable: int = 0         # turns ended because the database could not be written
    failed_by_code: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0               # input bytes of completed jobs
    bytes_out: int = 0              # output bytes they produced
    # processing time (claim to result, ms) of completed jobs, cumulative
    # per bucket bound of PROCESSING_BUCKETS_MS plus +Inf, as Prometheus wants
    processing_bounds_ms: tuple[int, ...] = PROCESSING_BUCKETS_MS
    processing_buckets: list[int] = field(default_factory=lambda: [0] * (len(PROCESSING_BUCKETS_MS) + 1))
    processing_ms_sum: int = 0

    def observe(self, elapsed_ms: int, outcome: Outcome) -> None:
        self.completed += 1
        self.bytes_in += outcome.input_size
        self.bytes_out += outcome.output_size
        self.processing_ms_sum += elapsed_ms
        for i, bound in enumerate(PROCESSING_BUCKETS_MS):
            if elapsed_ms <= bound:
                self.processing_buckets[i] += 1
        self.processing_buckets[-1] += 1


class Supervisor:
    """``processes`` and ``clock`` are the seams to the operating system and
    to time (tests pass fakes); everything else is real."""

    def __init__(self, cfg: config_mod.Config, processes: Processes | None = None,
                 clock: Callable[[], float] = monotonic):
        self.clock = clock
        self.store = open_store(cfg, durable=False, role="imgworker-supervisor")
        self.storage = Storage.for_config(cfg)
        self.id = f"{cfg.node_name}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.started_ms = now_ms()
        self.started_mono = clock()
        self.selector = selectors.DefaultSelector()
        self.pool = Pool(cfg.max_concurrent_jobs, self.selector, processes or Processes(), clock,
                         worker_memory_cap_mb(cfg.worker_max_rss_mb))
        self.signals: list[int] = []
        self.stopping = False
        self.stop_deadline: float | None = None
        self.exit_code = 0
        self.paused = False
        self.pause_reason: str | None = None
        self.memory: dict[str, Any] = {}
        self.storage_problems: list[str] = []  # data directories found unwritable after an I/O error
        self.storage_checked = 0.0
        self.counters = Counters()
        self.memprobe = MemoryProbe()
        self.next_heartbeat = 0.0
        self.next_cleanup = 0.0
        self.respawn_after = 0.0
        self.boot_failures = 0            # in a row; a worker becoming ready resets it
        self.last_boot_error: str | None = None
        self.announced = False            # READY=1 sent to systemd
        self.signals_installed = False
        self.wake: Any = None             # the store's wake-up listener (store.listen)
        self.unsettled: list[Callable[[], Any]] = []  # outcome writes the database refused; redone first
        self.db_failures = 0              # turns in a row ended by StoreUnavailable
        self._apply(cfg)

    def _apply(self, cfg: config_mod.Config) -> None:
        self.cfg = cfg
        self.limits = Limits.from_config(cfg)
        self.policy = RetryPolicy(cfg.retry_base_delay_ms, cfg.retry_max_delay_ms, cfg.max_attempts)
        self.lease_ms = cfg.job_timeout_ms + LEASE_GRACE_MS
        self.pool.max_mb = worker_memory_cap_mb(cfg.worker_max_rss_mb)
        self.pool.scheduling = cfg.worker_scheduling
        log.setup(cfg.log_level)

    # -- life cycle ------------------------------------------------------------------
    def run(self) -> int:
        self.install_signals()
        self.start()
        try:
            while not self.turn():
                pass
        finally:
            self.shutdown()
        return self.exit_code

    def turn(self) -> bool:
        """One step and the wait after it; True once a stop has drained.

        A database that cannot take writes (locked past db.WRITE_WAIT_S, its
        disk full, a PostgreSQL server gone) never stops the supervisor: the
        turn ends, the pool keeps running, outcomes already received are kept
        in memory (``unsettled``) and written first once it works again, and
        the next turn waits DB_BACKOFF_S, doubling up to DB_BACKOFF_MAX_S."""
        try:
            if self.step():
                return True
            self.db_failures = 0
            self.sleep()
        except db.StoreUnavailable as exc:
            delay = min(DB_BACKOFF_MAX_S, DB_BACKOFF_S * 2 ** self.db_failures)
            self.db_failures += 1
            self.counters.db_unavailable += 1
            LOG.error("Database unavailable (%s): %d outcome(s) kept in memory, trying again in %gs", exc,
                      len(self.unsettled), delay)
            time.sleep(delay)
        return False

    def step(self) -> bool:
        """One turn of the main loop. True once a stop has drained."""
        self.dispatch_signals()
        self.write_unsettled()
        self.reap_workers()
        if self.stopping and self.drained():
            return True
        self.murder_workers()
        self.pool.escalate()
        if not self.stopping:
            self.spawn_workers()
        self.housekeeping()
        self.assign_jobs()
        return False

    def install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "signal")
        self.signals_installed = True

    def start(self) -> None:
        self.storage.ensure()
        self.store.migrate()
        self.listen()
        self.heartbeat()
        self.recover(first=True)
        LOG.info("Image processing supervisor started (pid %d, database %s)", os.getpid(), self.cfg.database_path)
        LOG.info("Max concurrent jobs: %d", self.cfg.max_concurrent_jobs)
        LOG.info("Job timeout: %dms", self.cfg.job_timeout_ms)
        self.spawn_workers()
        notify.notify("READY=1", f"STATUS=supervising {self.cfg.max_concurrent_jobs} workers")
        self.announced = True

    def listen(self) -> None:
        """Register the store's wake-up listener (an abstract socket on
        SQLite, LISTEN/NOTIFY on PostgreSQL); polling covers the time
        without one, and the heartbeat asks again."""
        if self.wake is None:
            self.wake = self.store.listen()
            if self.wake is not None:
                self.selector.register(self.wake, selectors.EVENT_READ, "wake")

    def unlisten(self) -> None:
        if self.wake is not None:
            try:
                self.selector.unregister(self.wake)
            except (KeyError, ValueError):
                pass
            self.wake.close()
            self.wake = None

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals.append(signum)  # acted on by the main loop, never here

    def dispatch_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.handle_term(sig)
            elif sig == signal.SIGHUP:
                self.handle_hup()
            # SIGCHLD only wakes the loop; reap_workers runs next

    def handle_term(self, sig: int) -> None:
        if self.stopping:  # a second signal: stop now, running jobs go back to the queue
            LOG.info("Received %s again: stopping now", signal.Signals(sig).name)
            self.stop_deadline = self.clock()
            return
        LOG.info("Received %s: no new jobs; waiting up to %dms for %d running", signal.Signals(sig).name,
                 self.cfg.shutdown_timeout_ms, self.pool.busy)
        self.begin_stop()

    def begin_stop(self) -> None:
        self.stopping = True
        self.stop_deadline = self.clock() + self.cfg.shutdown_timeout_ms / 1000

    def handle_hup(self) -> None:
        try:
            cfg = config_mod.load()
        except config_mod.ConfigError as exc:
            LOG.error("Reload refused, keeping the running settings: %s", exc)
            return
        for key in ("MAX_CONCURRENT_JOBS", "DATABASE_PATH", "DATA_DIR"):
            if cfg.values[key] != self.cfg.values[key]:
                LOG.warning("%s changed: takes effect at the next restart", key)
        values = dict(cfg.values)
        for key in ("MAX_CONCURRENT_JOBS", "DATABASE_PATH", "DATA_DIR"):
            values[key] = self.cfg.values[key]
        changed = config_mod.changes(self.cfg, config_mod.Config(values))
        self._apply(config_mod.Config(values))
        LOG.info("Settings reloaded: %s", "; ".join(changed) if changed else "nothing changed")

    def drained(self) -> bool:
        """Stopping: True once no job runs, or the shutdown budget is spent
        (the jobs still running are then released)."""
        busy = self.pool.in_state(WorkerState.BUSY)
        if busy and self.clock() < (self.stop_deadline or 0):
            return False
        for w in busy:
            self.release(w, "shutdown timeout")
        return True

    def shutdown(self) -> None:
        """Release any job still held, stop every worker, leave no child behind."""
        notify.notify("STOPPING=1")
        self.stopping = True
        for w in self.pool:
            if w.busy:
                self.release(w, "supervisor stopping")
            else:  # EOF: an idle worker exits by itself; SIGKILL if it has not by the deadline
                self.pool.stop(w, "supervisor stopping", SHUTDOWN_REAP_S, sig=None)
        deadline = self.clock() + SHUTDOWN_REAP_S + 1
        while self.pool.workers and self.clock() < deadline:
            self.reap_workers()
            self.pool.escalate()
            time.sleep(0.01)
        for w in self.pool:  # still there: killed, and the kernel's parent-death signal backs this up
            self.pool.kill(w)
        try:
            self.store.remove_supervisors([self.id])
        except Exception:  # the database may be the reason we stop
            LOG.exception("Could not unregister")
        if self.signals_installed:
            signal.set_wakeup_fd(-1)
        self.unlisten()
        self.store.close()
        LOG.info("Supervisor stopped")

    def release(self, w: Worker, why: str) -> None:
        """Kill a busy worker now and give its job back without spending an attempt."""
        job = self.pool.stop(w, why, 0)
        try:
            if job and self.store.release(job.id, self.id):
                LOG.info("Returned to the queue (%s)", why, extra={"job": job.id})
        except db.StoreUnavailable as exc:  # its lease expires and recovery takes it back
            LOG.error("Could not return the job to the queue (%s): %s", why, exc, extra={"job": job.id})

    # -- the pool -----------------------------------------------------------------------
    def spawn_workers(self) -> None:
        if self.clock() < self.respawn_after:
            return  # workers are dying before they start: do not spin
        for slot in self.pool.free_slots():
            if self.pool.spawn(slot) is None:
                self.boot_failed("could not be started")
                return
            self.counters.spawned += 1

    def reap_workers(self) -> None:
        """Every dead child: forget it, settle its job, clean up after it."""
        for pid, status in self.pool.processes.reap():
            w = self.pool.reaped(pid)
            if w is not None:
                self.on_reaped(w, status)

    def on_reaped(self, w: Worker, status: int) -> None:
        if os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status)).name
            why = f"killed by {sig}" + (": perhaps out of memory?" if sig == "SIGKILL" and not w.stop_reason else "")
        else:
            why = f"exited with code {os.WEXITSTATUS(status)}"
        if w.writing and not self.pool.running(w.writing):
            # killed or crashed mid-job: no half-written output stays behind
            # (unless the job's retry already runs on another worker)
            self.storage.remove_partial_output(w.writing)
        if w.stop_reason:
            LOG.debug("Worker %d stopped (%s): %s", w.pid, w.stop_reason, why)
        elif not self.stopping:
            LOG.error("Worker %d %s", w.pid, why)
        if not w.ready and not self.stopping:
            self.boot_failed(f"{w.pid} {why}")
        if w.job is not None:  # died on its own while working
            self.counters.crashes += 1
            self.settle_failure(w.job, ErrorCode.WORKER_CRASHED, f"The worker processing this job was {why}")

    def boot_failed(self, what: str) -> None:
        """A worker died (or could not be started) before it was ready."""
        self.boot_failures += 1
        self.last_boot_error = f"worker {what} before it was ready"
        if self.boot_failures >= BOOT_FAILURE_LIMIT:
            LOG.error("Workers failed to start %d times in a row (last: %s): stopping", self.boot_failures,
                      self.last_boot_error)
            self.exit_code = EXIT_BOOT_FAILURE
            self.begin_stop()
            return
        delay = min(BOOT_BACKOFF_MAX_S, BOOT_BACKOFF_S * 2 ** (self.boot_failures - 1))
        self.respawn_after = self.clock() + delay
        LOG.error("Worker %s before it was ready: retrying in %gs", what, delay)

    def murder_workers(self) -> None:
        """Stop workers whose job ran past JOB_TIMEOUT_MS, and workers not
        ready within BOOT_TIMEOUT_S. Their SIGKILL follows in Pool.escalate."""
        now = self.clock()
        timeout_s = self.cfg.job_timeout_ms / 1000
        late = []
        for w in self.pool.in_state(WorkerState.BUSY):
            credit = w.wait_credit
            if self.pool.overdue(w, timeout_s):
                late.append(w)
            elif w.wait_credit > credit:
                self.extend_lease(w)
        if late:
            # After a stall of ours (SIGSTOP, a long database wait) a worker
            # may have finished long ago: its answer waiting in the socket
            # wins over the timeout (issue 15 item 14).
            self.read_waiting(late)
        for w in late:
            if w.busy and self.pool.overdue(w, timeout_s):  # (an answer read above may have brought a new job)
                self.counters.timeouts += 1
                LOG.warning("Job timed out after %dms: killing worker %d", self.cfg.job_timeout_ms, w.pid,
                            extra={"job": w.job.id})
                job = self.pool.stop(w, "timeout", KILL_GRACE_S, signal.SIGTERM)
                message = f"Processing took longer than {self.cfg.job_timeout_ms}ms"
                if job.error_code == ErrorCode.TIMEOUT:
                    # the previous attempt timed out too: the same input is
                    # slow every time, and a third run only blocks a worker
                    # for another JOB_TIMEOUT_MS (issue 15 item 7)
                    self.settle_failure(job, ErrorCode.TIMEOUT, message + " on two attempts in a row; not retried",
                                        transient=False)
                else:
                    self.settle_failure(job, ErrorCode.TIMEOUT, message)
        for w in self.pool.in_state(WorkerState.STARTING):
            if now - w.spawned_at >= BOOT_TIMEOUT_S:
                LOG.error("Worker %d not ready after %gs: killing it", w.pid, BOOT_TIMEOUT_S)
                self.pool.stop(w, "not ready in time", KILL_GRACE_S, signal.SIGTERM)

    def extend_lease(self, w: Worker) -> None:
        """The job's worker waited for a CPU, so the job may run that much
        past the lease taken at its claim: move the lease by the same wait,
        or another node's recovery would take back a job still running."""
        if w.job.lease_expires_at is None:
            return
        try:
            self.store.extend(w.job.id, self.id, w.job.lease_expires_at + round(w.wait_credit * 1000),
                              attempt=w.job.attempts)
        except db.StoreUnavailable as exc:  # at worst it expires and the job is run again
            LOG.warning("Could not extend a job's lease: %s", exc, extra={"job": w.job.id})

    def recycle(self, w: Worker) -> None:
        LOG.warning("Worker %d uses %d MB (limit %d MB): replacing it", w.pid, w.rss_mb, self.cfg.worker_max_rss_mb)
        self.counters.recycled += 1
        self.pool.stop(w, "recycled for memory", RECYCLE_GRACE_S, sig=None)  # EOF makes it exit

    # -- messages from workers ---------------------------------------------------------------
    def on_message(self, w: Worker) -> None:
        try:
            msg = recv(w.sock)
        except (OSError, ValueError):
            msg = None
        if msg is None:  # EOF: the process is dead or dying; reaping settles its job
            self.pool.lost(w)
        elif "ready" in msg:
            self.on_ready(w)
        else:
            self.on_outcome(w, msg)

    def read_waiting(self, workers: list[Worker]) -> None:
        """Handle every message ``workers`` already sent, without waiting."""
        for w in workers:
            while w.state == WorkerState.BUSY and _readable(w.sock):
                self.on_message(w)

    def on_ready(self, w: Worker) -> None:
        self.pool.ready(w)
        self.boot_failures, self.last_boot_error = 0, None
        self.heartbeat()  # publish the pool's strength at once (a rare event)

    def on_outcome(self, w: Worker, msg: dict[str, Any]) -> None:
        try:
            report = parse_report(msg)
        except (ValueError, TypeError, KeyError) as exc:
            LOG.error("Worker %d sent a malformed message (%s): killing it", w.pid, exc)
            self.pool.lost(w)
            return
        job = w.job
        if job is None or report.job_id != job.id:
            return  # a late answer for a job we already gave up on
        elapsed = round((self.clock() - w.job_started) * 1000)
        self.pool.finish(w)
        w.rss_mb = report.rss_mb
        over_rss = w.rss_mb > self.cfg.worker_max_rss_mb
        if report.outcome is not None:
            self.on_done(w, job, report.outcome, elapsed, take_next=not over_rss)
        else:
            if report.detail:  # decoder internals and paths: for the operator, not the client
                LOG.info("Failure detail: %s", report.detail, extra={"job": job.id})
            self.settle_failure(job, report.code, report.message)
        if over_rss:
            self.recycle(w)

    def on_done(self, w: Worker, job: Job, outcome: Outcome, elapsed_ms: int, take_next: bool) -> None:
        output = str(self.storage.processed / output_filename(job.id, outcome.output_format))

        def completed(done: bool) -> None:
            if done:
                self.counters.observe(elapsed_ms, outcome)
                LOG.info("Job completed in %dms", elapsed_ms, extra={"job": job.id})
                self.storage.discard_upload(job.input_path)  # a completed job is never retried

        if take_next and not self.stopping and self.memory_allows():
            # the common path: settle and take the next job in one commit
            try:
                done, following = self.store.complete_and_claim(job.id, self.id, outcome, output, self.lease_ms,
                                                                attempt=job.attempts)
            except db.StoreUnavailable:
                self.unsettled.append(lambda: completed(self.store.complete(job.id, self.id, outcome, output,
                                                                            attempt=job.attempts)))
                raise
            completed(done)
            if following is not None:
                self.start_job(w, following)
        else:
            self.write_or_keep(lambda: completed(self.store.complete(job.id, self.id, outcome, output,
                                                                     attempt=job.attempts)))

    # -- jobs ----------------------------------------------------------------------------
    def assign_jobs(self) -> None:
        if self.stopping:
            return
        idle = self.pool.in_state(WorkerState.IDLE)
        if not idle or not self.memory_allows() or not self.storage_allows():
            return
        for w in idle:
            job = self.store.claim(self.id, self.lease_ms)
            if job is None:
                return
            self.start_job(w, job)

    def start_job(self, w: Worker, job: Job) -> None:
        self.pool.assign(w, job)
        self.counters.started += 1
        LOG.info("Job started processing (attempt %d/%d, worker %d)", job.attempts, self.cfg.max_attempts,
                 w.pid, extra={"job": job.id})
        try:
            send(w.sock, job_message(job.id, job.input_path, str(self.storage.processed), job.options, self.limits))
        except OSError:
            pass  # the worker is dying; reaping settles the job

    def settle_failure(self, job: Job, code: ErrorCode, message: str, transient: bool | None = None) -> None:
        """Record a failed attempt; retried or not is the code's business
        unless ``transient`` says otherwise."""
        if code == ErrorCode.IO_ERROR:
            self.storage_allows(check=True)
        self.write_or_keep(lambda: self._failed(job, code, message,
                                                code.transient if transient is None else transient))

    def _failed(self, job: Job, code: ErrorCode, message: str, transient: bool) -> None:
        settled = self.store.fail(job.id, self.id, code, message, transient, self.policy, attempt=job.attempts)
        if settled is None:
            return
        if settled.status == JobStatus.RETRYING:
            self.counters.retried += 1
            LOG.warning("Job failed: %s (%s); retry scheduled at %s", message, code, hms(settled.run_at),
                        extra={"job": job.id})
        else:
            self.counters.failed += 1
            self.counters.failed_by_code[code] = self.counters.failed_by_code.get(code, 0) + 1
            LOG.warning("Job failed: %s (%s)", message, code, extra={"job": job.id})

    def write_or_keep(self, write: Callable[[], Any]) -> None:
        """Record an outcome; if the database cannot take it now, keep it for
        :meth:`write_unsettled` (the worker's work is never thrown away) and
        let StoreUnavailable end the turn."""
        try:
            write()
        except db.StoreUnavailable:
            self.unsettled.append(write)
            raise

    def write_unsettled(self) -> None:
        """Write the outcomes the database refused earlier, oldest first."""
        while self.unsettled:
            self.unsettled[0]()
            self.unsettled.pop(0)

    def memory_allows(self) -> bool:
        self.memory = self.memprobe.read()
        pct = self.memory["percent"]
        if not self.paused and pct >= self.cfg.memory_pause_percent:
            self.paused = True
            self.pause_reason = (f"memory use {pct}% ({self.memory['source']}) is at or above "
                                 f"MEMORY_PAUSE_PERCENT={self.cfg.memory_pause_percent}")
            LOG.warning("Paused claiming jobs: %s", self.pause_reason)
            self.heartbeat()
        elif self.paused and pct < self.cfg.memory_resume_percent:
            LOG.info("Resumed claiming jobs: memory use %s%% is below MEMORY_RESUME_PERCENT=%s",
                     pct, self.cfg.memory_resume_percent)
            self.paused, self.pause_reason = False, None
            self.heartbeat()
        return not self.paused

    # -- storage ---------------------------------------------------------------------------
    def storage_allows(self, check: bool = False) -> bool:
        """After a job's I/O error, claim nothing while a data directory
        cannot be written (read-only, permissions, no inodes or space),
        rechecked every STORAGE_CHECK_S: jobs wait in the queue instead of
        spending their retries on a disk that cannot take them."""
        now = self.clock()
        if (check or self.storage_problems) and now - self.storage_checked >= STORAGE_CHECK_S:
            problems = self.storage.unwritable()
            if problems and not self.storage_problems:
                LOG.error("Paused claiming jobs: data directory not writable: %s", "; ".join(problems))
            elif self.storage_problems and not problems:
                LOG.info("Resumed claiming jobs: data directory writable again")
            self.storage_problems, self.storage_checked = problems, now
        return not self.storage_problems

    # -- periodic work --------------------------------------------------------------------
    def housekeeping(self) -> None:
        now = self.clock()
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + HEARTBEAT_S
            if not self.pool.busy:
                self.memory = self.memprobe.read()
            self.heartbeat(strict=True)
            self.recover()
            self.listen()
        if now >= self.next_cleanup:
            self.next_cleanup = now + self.cfg.cleanup_interval_ms / 1000
            try:
                Housekeeper(self.store, self.storage).cleanup(self.cfg.job_retention_ms)
                self.store.maintain()
            except db.StoreUnavailable:
                raise
            except Exception:
                LOG.exception("Cleanup failed")

    def state(self) -> dict[str, Any]:
        return {
            "node": self.id,
            "paused": self.paused,
            "pauseReason": self.pause_reason,
            "stopping": self.stopping,
            "workers": {"configured": self.cfg.max_concurrent_jobs, "alive": self.pool.alive, "busy": self.pool.busy},
            "pool": [{"slot": w.slot, "pid": w.pid, "state": w.state.value, "busy": w.busy,
                      "jobId": w.job.id if w.job else None, "rssMb": w.rss_mb, "jobsDone": w.jobs_done}
                     for w in sorted(self.pool, key=lambda w: w.slot)],
            "bootFailures": self.boot_failures,
            "lastBootError": self.last_boot_error,
            "memory": self.memory,
            "storage": self.storage_problems or "ok",
            "counters": {**self.counters.__dict__},
            "uptime": round(self.clock() - self.started_mono, 1),
        }

    def heartbeat(self, strict: bool = False) -> None:
        """Publish our state for the API, and tell systemd's watchdog the loop
        still turns (only when the database write worked: a supervisor that
        cannot reach its database is better restarted). ``strict`` (the
        periodic one): StoreUnavailable ends the turn, so that a locked
        database costs one wait per turn, not one per write."""
        try:
            self.store.heartbeat(self.id, self.cfg.node_name, os.getpid(), self.started_ms, self.state())
        except db.StoreUnavailable:
            if strict:
                raise
            LOG.error("Heartbeat failed: the database is unavailable")
            return
        except Exception:
            LOG.exception("Heartbeat failed")
            return
        if not self.announced:
            return
        notify.notify("WATCHDOG=1", f"STATUS={'paused: ' + self.pause_reason if self.paused else 'running'}, "
                      f"{self.pool.busy}/{self.cfg.max_concurrent_jobs} workers busy")

    def recover(self, first: bool = False) -> None:
        """Take back jobs of dead supervisors and expired leases. At start,
        when no other supervisor is alive, also delete half-written outputs
        of the previous run."""
        try:
            others = [s for s in self.store.supervisors() if s.id != self.id]
            dead = [s.id for s in others if _is_dead(s, self.cfg.node_name)]
            for found in self.store.recover(dead, self.policy):
                LOG.warning("Recovered from a stopped worker or supervisor: now %s", found.status,
                            extra={"job": found.job_id})
            self.store.remove_supervisors(dead)
            if first and len(dead) == len(others):
                removed = self.storage.remove_partial_outputs()
                if removed:
                    LOG.info("Removed %d half-written outputs of a previous run", removed)
        except db.StoreUnavailable:
            raise
        except Exception:
            LOG.exception("Recovery failed")

    def sleep(self) -> None:
        self.poll(self._next_wakeup())

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for a signal, a wake-up or a worker's message, and handle it."""
        for key, _ in self.selector.select(timeout):
            if key.data == "signal":
                try:
                    while os.read(self._wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            elif key.data == "wake":
                if not self.wake.drain():  # the database went away: listen again at the next heartbeat
                    self.unlisten()
            elif isinstance(key.data, Worker) and key.data.state != WorkerState.STOPPING:
                self.on_message(key.data)

    def _next_wakeup(self) -> float:
        now = self.clock()
        deadlines = [self.next_heartbeat, now + POLL_S]
        if self.respawn_after > now:
            deadlines.append(self.respawn_after)
        pool_deadline = self.pool.next_deadline(self.cfg.job_timeout_ms / 1000)
        if pool_deadline is not None:
            deadlines.append(pool_deadline)
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        elif self.pool.in_state(WorkerState.IDLE) and not self.paused:
            run_at = self.store.next_run_at()  # a delayed retry starts on time, not at the next poll
            if run_at is not None:
                deadlines.append(now + max(0.0, (run_at - now_ms()) / 1000))
        return max(0.0, min(deadlines) - now)


def _readable(sock: socket.socket) -> bool:
    """True when ``sock`` has data (or EOF) to read now."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):  # closed meanwhile
        return False


def worker_memory_cap_mb(max_rss_mb: int) -> int:
    """Address-space ceiling of a worker: twice the RSS it is recycled at
    (one job may briefly need more than a worker keeps), at least 256 MB."""
    return max(256, 2 * max_rss_mb)


def _is_dead(sup: SupervisorRow, node_name: str) -> bool:
    """A supervisor row whose process is gone: same node (NODE_NAME, the host
    name by default) and the pid is not alive (or is another process now),
    or silent for DEAD_AFTER_MS. A pid means nothing on another host: there,
    its jobs come back when their lease expires (store.recover)."""
    if sup.hostname == node_name:
        try:
            proc = psutil.Process(sup.pid)
            return abs(proc.create_time() * 1000 - sup.started_at) > 5000 or proc.status() == psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return True
    return now_ms() - sup.heartbeat_at > DEAD_AFTER_MS


def run(cfg: config_mod.Config) -> int:
    """Entry point of ``imgworker worker``."""
    return Supervisor(cfg).run()
