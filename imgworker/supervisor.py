"""The supervisor: owns a fixed pool of worker processes and the job outcomes.

Shape (after gunicorn's arbiter): signal handlers only queue the signal and
wake the loop; the main loop dispatches (``handle_term`` etc.), then runs
small steps: reap dead workers, murder timed-out ones, top the pool back up,
heartbeat / recover / clean up, and hand claimed jobs to idle workers.

Contract:
- Only the supervisor writes job outcomes; workers never touch the database.
- A job past JOB_TIMEOUT_MS has its worker's process group killed (SIGTERM,
  short grace, SIGKILL: it may be stuck in C code, so the kill never depends
  on the worker cooperating); the job is retried or failed with TIMEOUT and
  the slot gets a fresh worker.
- A worker that dies on its own is reaped at once, logged with its signal,
  replaced, and its job retried (WORKER_CRASHED).
- On start and periodically, ``processing`` rows whose lease expired or whose
  supervisor is gone are taken back (queue.recover).
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
import selectors
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psutil

from . import config as config_mod
from . import db, log, notify
from .backends import open_queue
from .imaging import Limits
from .memory import MemoryProbe
from .queue import RetryPolicy
from .storage import Storage
from .worker import recv, send

LOG = log.get("supervisor")
HEARTBEAT_S = 1.0
POLL_S = 0.25          # claim poll when no wake-up arrives (other hosts, lost datagrams)
KILL_GRACE_S = 0.2     # between SIGTERM and SIGKILL of a timed-out worker
LEASE_GRACE_MS = 10_000
DEAD_AFTER_MS = 60_000  # a supervisor on another host silent this long is dead
STORAGE_CHECK_S = 2.0   # how often a pause for an unwritable data directory is rechecked
BOOT_BACKOFF_S = 1      # pause before replacing workers that die while starting
PROCESSING_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


@dataclass
class Worker:
    slot: int
    proc: subprocess.Popen
    sock: socket.socket
    ready: bool = False
    job: dict[str, Any] | None = None
    started: float = 0.0          # monotonic start of the current job
    kill_at: float | None = None  # monotonic time for SIGKILL after SIGTERM
    doomed: str | None = None     # why we are killing it (timeout, shutdown, rss)
    rss_mb: int = 0
    jobs_done: int = 0
    retire: bool = False          # recycle after the current job
    writing: str | None = None    # job whose output it may be writing (cleaned up if it dies)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def busy(self) -> bool:
        return self.job is not None


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
    failed_by_code: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0               # input bytes of completed jobs
    bytes_out: int = 0              # output bytes they produced
    # processing time (claim to result, ms) of completed jobs, cumulative
    # per bucket bound of PROCESSING_BUCKETS_MS plus +Inf, as Prometheus wants
    processing_bounds_ms: tuple[int, ...] = PROCESSING_BUCKETS_MS
    processing_buckets: list[int] = field(default_factory=lambda: [0] * (len(PROCESSING_BUCKETS_MS) + 1))
    processing_ms_sum: int = 0

    def observe(self, elapsed_ms: int, result: dict[str, Any]) -> None:
        self.completed += 1
        self.bytes_in += int(result["originalFile"]["size"])
        self.bytes_out += int(result["processedFile"]["size"])
        self.processing_ms_sum += elapsed_ms
        for i, bound in enumerate(PROCESSING_BUCKETS_MS):
            if elapsed_ms <= bound:
                self.processing_buckets[i] += 1
        self.processing_buckets[-1] += 1


class Supervisor:
    def __init__(self, cfg: config_mod.Config):
        self.cfg = cfg
        self.queue = open_queue(cfg, durable=False, role="imgworker-supervisor")
        self.storage = Storage.for_config(cfg)
        self.id = f"{cfg.node_name}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.started_ms = int(time.time() * 1000)
        self.started_mono = time.monotonic()
        self.workers: dict[int, Worker] = {}     # slot -> worker
        self.by_pid: dict[int, Worker] = {}
        self.signals: list[int] = []
        self.stopping = False
        self.stop_deadline: float | None = None
        self.paused = False
        self.pause_reason: str | None = None
        self.memory: dict[str, Any] = {}
        self.storage_problems: list[str] = []  # data directories found unwritable after an I/O error
        self.storage_checked = 0.0
        self.counters = Counters()
        self.memprobe = MemoryProbe()
        self.selector = selectors.DefaultSelector()
        self.next_heartbeat = 0.0
        self.next_cleanup = 0.0
        self.respawn_after = 0.0
        self.announced = False      # READY=1 sent to systemd
        self._apply(cfg)

    def _apply(self, cfg: config_mod.Config) -> None:
        self.cfg = cfg
        self.limits = Limits.from_config(cfg)
        self.policy = RetryPolicy(cfg.retry_base_delay_ms, cfg.retry_max_delay_ms, cfg.max_attempts)
        self.lease_ms = cfg.job_timeout_ms + LEASE_GRACE_MS
        log.setup(cfg.log_level, cfg.log_format)

    # -- life cycle ------------------------------------------------------------------
    def run(self) -> int:
        self.start()
        try:
            while True:
                self.dispatch_signals()
                self.reap_workers()
                if self.stopping and self.drained():
                    break
                self.murder_workers()
                if not self.stopping:
                    self.spawn_workers()
                try:
                    self.housekeeping()
                    self.assign_jobs()
                    self.sleep()
                except db.StoreUnavailable as exc:  # keep the pool; try again in a second
                    LOG.error("Database unavailable: %s", exc)
                    time.sleep(1)
        finally:
            self.shutdown()
        return 0

    def start(self) -> None:
        self.storage.ensure()
        self.queue.migrate()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wake_w)
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        self.selector.register(self._wake_r, selectors.EVENT_READ, "signal")
        self.wake = None
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
            self.wake = self.queue.listen()
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
            self.stop_deadline = time.monotonic()
            return
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.cfg.shutdown_timeout_ms / 1000
        busy = sum(w.busy for w in self.workers.values())
        LOG.info("Received %s: no new jobs; waiting up to %dms for %d running", signal.Signals(sig).name,
                 self.cfg.shutdown_timeout_ms, busy)

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
        if any(w.busy for w in self.workers.values()):
            if time.monotonic() < (self.stop_deadline or 0):
                return False
            for w in self.workers.values():
                if w.busy:
                    self.release(w, "shutdown timeout")
        return True

    def shutdown(self) -> None:
        """Release any job still held, stop every worker, leave no child behind."""
        notify.notify("STOPPING=1")
        for w in list(self.workers.values()):
            if w.busy:
                self.release(w, "supervisor stopping")
            try:
                w.sock.close()  # EOF: an idle worker exits by itself
            except OSError:
                pass
        deadline = time.monotonic() + 2
        while self.by_pid and time.monotonic() < deadline:
            self.reap_workers()
            time.sleep(0.01)
        for w in list(self.by_pid.values()):
            self._signal_group(w, signal.SIGKILL)
            try:
                os.waitpid(w.pid, 0)
            except ChildProcessError:
                pass
            w.proc.returncode = -9
        try:
            self.queue.remove_supervisors([self.id])
        except Exception:  # the database may be the reason we stop
            LOG.exception("Could not unregister")
        signal.set_wakeup_fd(-1)
        self.unlisten()
        self.queue.close()
        LOG.info("Supervisor stopped")

    def release(self, w: Worker, why: str) -> None:
        """Kill a busy worker and give its job back without spending an attempt."""
        job = w.job
        w.job = None
        w.doomed = why
        self._signal_group(w, signal.SIGKILL)
        if job and self.queue.release(job["id"], self.id):
            LOG.info("Returned to the queue (%s)", why, extra={"job": job["id"]})

    # -- the pool -----------------------------------------------------------------------
    def spawn_workers(self) -> None:
        if time.monotonic() < self.respawn_after:
            return  # workers are dying before they start: do not spin
        for slot in range(self.cfg.max_concurrent_jobs):
            if slot not in self.workers:
                self.spawn_worker(slot)

    def spawn_worker(self, slot: int) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "imgworker.worker", str(child.fileno()), str(os.getpid()),
                 str(worker_memory_cap_mb(self.cfg.worker_max_rss_mb))],
                pass_fds=(child.fileno(),), process_group=0, stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            LOG.error("Could not start a worker: %s", exc)
            parent.close()
            return
        finally:
            child.close()
        w = Worker(slot, proc, parent)
        self.workers[slot] = w
        self.by_pid[proc.pid] = w
        self.selector.register(parent, selectors.EVENT_READ, w)
        self.counters.spawned += 1
        LOG.debug("Worker %d started in slot %d", proc.pid, slot)

    def reap_workers(self) -> None:
        """waitpid(-1, WNOHANG) until no dead child is left; settle their jobs."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.by_pid.pop(pid, None)
            if w is None:
                continue
            w.proc.returncode = os.waitstatus_to_exitcode(status)
            self._forget(w)
            if w.writing and not any(o.job and o.job["id"] == w.writing for o in self.workers.values()):
                # killed or crashed mid-job: no half-written output stays behind
                # (unless the job's retry already runs on another worker)
                self.storage.remove_partial_output(w.writing)
            if os.WIFSIGNALED(status):
                sig = signal.Signals(os.WTERMSIG(status)).name
                why = f"killed by {sig}" + (": perhaps out of memory?" if sig == "SIGKILL" and not w.doomed else "")
            else:
                why = f"exited with code {os.WEXITSTATUS(status)}"
            if not w.ready and not w.doomed and not self.stopping:
                self.respawn_after = time.monotonic() + BOOT_BACKOFF_S
                LOG.error("Worker %d %s before it was ready: retrying in %ds", pid, why, BOOT_BACKOFF_S)
            if w.doomed:
                LOG.debug("Worker %d stopped (%s)", pid, w.doomed)
            elif not self.stopping:
                LOG.error("Worker %d %s", pid, why)
            if w.job is not None:  # died on its own while working
                self.counters.crashes += 1
                self.settle_failure(w.job, "WORKER_CRASHED", f"The worker processing this job was {why}", True)

    def _forget(self, w: Worker) -> None:
        try:
            self.selector.unregister(w.sock)
        except (KeyError, ValueError):
            pass
        w.sock.close()
        if self.workers.get(w.slot) is w:
            del self.workers[w.slot]

    def murder_workers(self) -> None:
        """Kill workers whose job ran past JOB_TIMEOUT_MS; SIGKILL after the grace."""
        now = time.monotonic()
        timeout = self.cfg.job_timeout_ms / 1000
        for w in list(self.workers.values()):
            if w.kill_at is not None and now >= w.kill_at:
                self._signal_group(w, signal.SIGKILL)
                w.kill_at = float("inf")
            if w.busy and now - w.started >= timeout:
                job = w.job
                w.job = None
                w.doomed = "timeout"
                self.counters.timeouts += 1
                LOG.warning("Job timed out after %dms: killing worker %d", self.cfg.job_timeout_ms, w.pid,
                            extra={"job": job["id"]})
                self._signal_group(w, signal.SIGTERM)
                w.kill_at = now + KILL_GRACE_S
                self.settle_failure(job, "TIMEOUT", f"Processing took longer than {self.cfg.job_timeout_ms}ms", True)
                # the slot is refilled as soon as the old worker is reaped
                del self.workers[w.slot]

    def _signal_group(self, w: Worker, sig: int) -> None:
        for kill in (lambda: os.killpg(w.pid, sig), lambda: os.kill(w.pid, sig)):
            try:
                kill()
                return
            except ProcessLookupError:
                continue
            except PermissionError:
                continue

    # -- jobs ----------------------------------------------------------------------------
    def assign_jobs(self) -> None:
        if self.stopping:
            return
        idle = [w for w in self.workers.values() if w.ready and not w.busy and not w.doomed and not w.retire]
        if not idle:
            return
        if not self.memory_allows() or not self.storage_allows():
            return
        for w in idle:
            job = self.queue.claim(self.id, self.lease_ms)
            if job is None:
                return
            self.start_job(w, job)

    def start_job(self, w: Worker, job: dict[str, Any]) -> None:
        w.job = job
        w.writing = job["id"]
        w.started = time.monotonic()
        self.counters.started += 1
        msg = {
            "id": job["id"], "input": job["input_path"], "outDir": str(self.storage.processed),
            "name": job["original_name"], "options": job["options"], "limits": self.limits.__dict__,
            "testHooks": self.cfg.env == "test",
        }
        LOG.info("Job started processing (attempt %d/%d, worker %d)", job["attempts"], self.cfg.max_attempts,
                 w.pid, extra={"job": job["id"]})
        try:
            send(w.sock, msg)
        except OSError:
            pass  # the worker is dying; reap_workers settles the job

    def on_message(self, w: Worker) -> None:
        try:
            msg = recv(w.sock)
        except (OSError, ValueError):
            msg = None
        if msg is None:  # EOF: the process is dead or dying; reaping settles it
            self._signal_group(w, signal.SIGKILL)
            try:
                self.selector.unregister(w.sock)
            except (KeyError, ValueError):
                pass
            return
        if "ready" in msg:
            w.ready = True
            self.heartbeat()  # publish the pool's strength at once (a rare event)
            return
        job = w.job
        if job is None or msg.get("id") != job["id"]:
            return  # a late answer for a job we already gave up on
        w.job = w.writing = None
        w.jobs_done += 1
        w.rss_mb = int(msg.get("rssMb") or 0)
        elapsed = round((time.monotonic() - w.started) * 1000)
        over_rss = w.rss_mb > self.cfg.worker_max_rss_mb
        if msg["ok"]:
            result = msg["result"]
            output = str(self.storage.processed / result["processedFile"]["filename"])
            if not over_rss and not self.stopping and self.memory_allows():
                # the common path: settle and take the next job in one commit
                done, following = self.queue.complete_and_claim(job["id"], self.id, result, output, self.lease_ms)
            else:
                done, following = self.queue.complete(job["id"], self.id, result, output), None
            if done:
                self.counters.observe(elapsed, result)
                LOG.info("Job completed in %dms", elapsed, extra={"job": job["id"]})
                self.storage.discard_upload(job["input_path"])  # a completed job is never retried
            if following is not None:
                self.start_job(w, following)
        else:
            if msg.get("detail"):  # decoder internals and paths: for the operator, not the client
                LOG.info("Failure detail: %s", msg["detail"], extra={"job": job["id"]})
            self.settle_failure(job, msg["code"], msg["message"], bool(msg.get("transient")))
        if over_rss:
            LOG.warning("Worker %d uses %d MB (limit %d MB): replacing it", w.pid, w.rss_mb, self.cfg.worker_max_rss_mb)
            self.counters.recycled += 1
            w.retire = True
            w.doomed = "recycled for memory"
            w.sock.close()  # EOF makes it exit; reaping frees the slot
            try:
                self.selector.unregister(w.sock)
            except (KeyError, ValueError):
                pass

    def settle_failure(self, job: dict[str, Any], code: str, message: str, transient: bool) -> None:
        if code == "IO_ERROR":
            self.storage_allows(check=True)
        outcome = self.queue.fail(job["id"], self.id, code, message, transient, self.policy)
        if outcome is None:
            return
        status, run_at = outcome
        if status == "retrying":
            self.counters.retried += 1
            LOG.warning("Job failed: %s (%s); retry scheduled at %s", message, code,
                        time.strftime("%H:%M:%S", time.gmtime(run_at / 1000)) + f".{run_at % 1000:03d}Z",
                        extra={"job": job["id"]})
        else:
            self.counters.failed += 1
            self.counters.failed_by_code[code] = self.counters.failed_by_code.get(code, 0) + 1
            LOG.warning("Job failed: %s (%s)", message, code, extra={"job": job["id"]})

    # -- storage ---------------------------------------------------------------------------
    def storage_allows(self, check: bool = False) -> bool:
        """After a job's I/O error, claim nothing while a data directory
        cannot be written (read-only, permissions, no inodes or space),
        rechecked every STORAGE_CHECK_S: jobs wait in the queue instead of
        spending their retries on a disk that cannot take them."""
        now = time.monotonic()
        if (check or self.storage_problems) and now - self.storage_checked >= STORAGE_CHECK_S:
            problems = self.storage.unwritable()
            if problems and not self.storage_problems:
                LOG.error("Paused claiming jobs: data directory not writable: %s", "; ".join(problems))
            elif self.storage_problems and not problems:
                LOG.info("Resumed claiming jobs: data directory writable again")
            self.storage_problems, self.storage_checked = problems, now
        return not self.storage_problems

    # -- memory ----------------------------------------------------------------------------
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

    # -- periodic work --------------------------------------------------------------------
    def housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self.next_heartbeat:
            self.next_heartbeat = now + HEARTBEAT_S
            if not self.busy_count():
                self.memory = self.memprobe.read()
            self.heartbeat()
            self.recover()
            self.listen()
        if now >= self.next_cleanup:
            self.next_cleanup = now + self.cfg.cleanup_interval_ms / 1000
            try:
                self.storage.cleanup(self.queue, self.cfg.job_retention_ms)
                self.queue.checkpoint()
            except Exception:
                LOG.exception("Cleanup failed")

    def busy_count(self) -> int:
        return sum(w.busy for w in self.workers.values())

    def state(self) -> dict[str, Any]:
        workers = list(self.workers.values())
        return {
            "node": self.id,
            "paused": self.paused,
            "pauseReason": self.pause_reason,
            "stopping": self.stopping,
            "workers": {"configured": self.cfg.max_concurrent_jobs, "alive": sum(w.ready for w in workers),
                        "busy": sum(w.busy for w in workers)},
            "pool": [{"slot": w.slot, "pid": w.pid, "busy": w.busy, "jobId": w.job["id"] if w.job else None,
                      "rssMb": w.rss_mb, "jobsDone": w.jobs_done} for w in workers],
            "memory": self.memory,
            "storage": self.storage_problems or "ok",
            "counters": {**self.counters.__dict__},
            "uptime": round(time.monotonic() - self.started_mono, 1),
        }

    def heartbeat(self) -> None:
        """Publish our state for the API, and tell systemd's watchdog the loop
        still turns (only when the database write worked: a supervisor that
        cannot reach its database is better restarted)."""
        try:
            self.queue.heartbeat(self.id, self.cfg.node_name, os.getpid(), self.started_ms, self.state())
        except Exception:
            LOG.exception("Heartbeat failed")
            return
        if not self.announced:
            return
        busy = self.busy_count()
        notify.notify("WATCHDOG=1", f"STATUS={'paused: ' + self.pause_reason if self.paused else 'running'}, "
                      f"{busy}/{self.cfg.max_concurrent_jobs} workers busy")

    def recover(self, first: bool = False) -> None:
        """Take back jobs of dead supervisors and expired leases. At start,
        when no other supervisor is alive, also delete half-written outputs
        of the previous run."""
        try:
            others = [s for s in self.queue.supervisors() if s["id"] != self.id]
            dead = [s["id"] for s in others if _is_dead(s, self.cfg.node_name)]
            for job_id, status in self.queue.recover(dead, self.policy):
                LOG.warning("Recovered from a stopped worker or supervisor: now %s", status, extra={"job": job_id})
            self.queue.remove_supervisors(dead)
            if first and len(dead) == len(others):
                removed = self.storage.remove_partial_outputs()
                if removed:
                    LOG.info("Removed %d half-written outputs of a previous run", removed)
        except Exception:
            LOG.exception("Recovery failed")

    def sleep(self) -> None:
        timeout = self._next_wakeup()
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
            elif isinstance(key.data, Worker):
                self.on_message(key.data)

    def _next_wakeup(self) -> float:
        now = time.monotonic()
        deadlines = [self.next_heartbeat, now + POLL_S]
        if self.respawn_after > now:
            deadlines.append(self.respawn_after)
        timeout_s = self.cfg.job_timeout_ms / 1000
        for w in self.workers.values():
            if w.busy:
                deadlines.append(w.started + timeout_s)
            if w.kill_at is not None:
                deadlines.append(w.kill_at)
        if self.stop_deadline is not None:
            deadlines.append(self.stop_deadline)
        elif any(w.ready and not w.busy for w in self.workers.values()) and not self.paused:
            run_at = self.queue.next_run_at()  # a delayed retry starts on time, not at the next poll
            if run_at is not None:
                deadlines.append(now + max(0.0, run_at / 1000 - time.time()))
        return max(0.0, min(deadlines) - now)


def worker_memory_cap_mb(max_rss_mb: int) -> int:
    """Address-space ceiling of a worker: twice the RSS it is recycled at
    (one job may briefly need more than a worker keeps), at least 256 MB."""
    return max(256, 2 * max_rss_mb)


def _is_dead(sup: dict[str, Any], node_name: str) -> bool:
    """A supervisor row whose process is gone: same node (NODE_NAME, the host
    name by default) and the pid is not alive (or is another process now),
    or silent for DEAD_AFTER_MS. A pid means nothing on another host: there,
    its jobs come back when their lease expires (queue.recover)."""
    if sup["hostname"] == node_name:
        try:
            proc = psutil.Process(sup["pid"])
            return abs(proc.create_time() * 1000 - sup["started_at"]) > 5000 or proc.status() == psutil.STATUS_ZOMBIE
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return True
    return time.time() * 1000 - sup["heartbeat_at"] > DEAD_AFTER_MS


def run(cfg: config_mod.Config) -> int:
    """Entry point of ``imgworker worker``."""
    return Supervisor(cfg).run()
