"""The worker pool as a state machine (after gunicorn's arbiter).

One registry, keyed by pid, holds every worker process from spawn until it
is reaped; slot occupancy is derived from it, so the pool never has more
live processes than slots, even while a worker that ignores SIGTERM (or is
stopped by SIGSTOP, a debugger, a kernel freeze) is being killed.

A worker's state::

    STARTING --ready--> IDLE --job--> BUSY --outcome--> IDLE
        \\                 \\             \\
         `------------------`-------------`--stop(reason)--> STOPPING --reaped--> (gone)

``stop`` detaches the worker (its socket is closed: EOF tells an idle worker
to exit), sends a signal if asked, and sets a kill deadline; at the deadline
:meth:`Pool.escalate` sends SIGKILL to its process group. The kill never
depends on the worker cooperating.

Processes are started, signalled and reaped through :class:`Processes`, the
one seam to the operating system (tests substitute fakes).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Iterator

from . import log
from .store import Job

LOG = log.get("supervisor")

# Time a busy worker waits for a CPU is not counted against JOB_TIMEOUT_MS, up
# to this many timeouts: a job on a saturated machine gets longer, but every
# job still ends within (1 + this) x JOB_TIMEOUT_MS of wall time.
MAX_WAIT_CREDIT = 9


class WorkerState(str, Enum):
    STARTING = "starting"   # spawned, not yet ready
    IDLE = "idle"           # ready, waiting for a job
    BUSY = "busy"           # running ``job``
    STOPPING = "stopping"   # being stopped (``stop_reason``), SIGKILL at ``kill_at``; in the registry until reaped


@dataclass
class Worker:
    pid: int
    slot: int
    sock: socket.socket
    spawned_at: float                   # monotonic
    state: WorkerState = WorkerState.STARTING
    job: Job | None = None
    job_started: float = 0.0            # monotonic start of the current job
    ready: bool = False                 # has reported ready once (a boot failure is a death before that)
    stop_reason: str | None = None
    kill_at: float | None = None        # monotonic SIGKILL deadline while STOPPING
    killed: bool = False                # SIGKILL sent
    writing: str | None = None          # job whose output it may be writing (removed if it dies)
    rss_mb: int = 0
    jobs_done: int = 0
    waited_at_start: float | None = None  # its CPU wait (Processes.waited) when the job started
    wait_credit: float = 0.0            # CPU wait during the job so far, not counted against the timeout

    @property
    def busy(self) -> bool:
        return self.state == WorkerState.BUSY


class Processes:
    """How worker processes are started, signalled and reaped: the real OS."""

    def spawn(self, fd: int, max_mb: int, scheduling: str = "normal") -> int:
        """Start ``python -m imgworker.worker`` in its own process group with
        ``fd`` (one end of a socketpair) inherited, its address space capped
        at ``max_mb``, under the CPU policy ``scheduling`` (idle, batch or
        normal); return its pid."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "imgworker.worker", str(fd), str(os.getpid()), str(max_mb), scheduling],
            pass_fds=(fd,), process_group=0, stdin=subprocess.DEVNULL,
        )
        return proc.pid

    def signal(self, pid: int, sig: int) -> None:
        """Signal the worker's process group (anything it started too), or
        the process alone if the group is gone; a dead process is no error."""
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, sig)
                return
            except (ProcessLookupError, PermissionError):
                continue

    def waited(self, pid: int) -> float | None:
        """Seconds ``pid``'s main thread has spent runnable but waiting for a
        CPU (the second field of /proc/PID/schedstat, in ns); None where the
        kernel does not tell (another OS, schedstats compiled out)."""
        try:
            with open(f"/proc/{pid}/schedstat") as fh:
                return int(fh.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return None

    def reap(self) -> Iterator[tuple[int, int]]:
        """(pid, wait status) of every child that has exited, without blocking."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            yield pid, status


class Pool:
    """The registry of worker processes (pid -> Worker until reaped)."""

    def __init__(self, size: int, selector: selectors.BaseSelector, processes: Processes,
                 clock: Callable[[], float], max_mb: int):
        self.size = size
        self.selector = selector
        self.processes = processes
        self.clock = clock
        self.max_mb = max_mb
        self.scheduling = "normal"  # the workers' CPU policy (WORKER_SCHEDULING)
        self.workers: dict[int, Worker] = {}

    # -- views -------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Worker]:
        return iter(list(self.workers.values()))

    def in_state(self, *states: WorkerState) -> list[Worker]:
        return [w for w in self.workers.values() if w.state in states]

    @property
    def alive(self) -> int:
        """Workers ready for work or working."""
        return len(self.in_state(WorkerState.IDLE, WorkerState.BUSY))

    @property
    def busy(self) -> int:
        return len(self.in_state(WorkerState.BUSY))

    def free_slots(self) -> list[int]:
        """Slots with no process in the registry (a stopping one still holds its slot)."""
        taken = {w.slot for w in self.workers.values()}
        return [s for s in range(self.size) if s not in taken]

    def running(self, job_id: str) -> bool:
        return any(w.job is not None and w.job.id == job_id for w in self.workers.values())

    # -- transitions -------------------------------------------------------------------
    def spawn(self, slot: int) -> Worker | None:
        """Start a worker in ``slot`` (STARTING). None if the OS refused."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = self.processes.spawn(child.fileno(), self.max_mb, self.scheduling)
        except OSError as exc:
            LOG.error("Could not start a worker: %s", exc)
            parent.close()
            return None
        finally:
            child.close()
        w = Worker(pid, slot, parent, self.clock())
        self.workers[pid] = w
        self.selector.register(parent, selectors.EVENT_READ, w)
        LOG.debug("Worker %d started in slot %d", pid, slot)
        return w

    def ready(self, w: Worker) -> None:
        if w.state == WorkerState.STARTING:
            w.state, w.ready = WorkerState.IDLE, True

    def assign(self, w: Worker, job: Job) -> None:
        w.state, w.job, w.writing, w.job_started = WorkerState.BUSY, job, job.id, self.clock()
        w.waited_at_start, w.wait_credit = self.processes.waited(w.pid), 0.0

    def overdue(self, w: Worker, job_timeout_s: float) -> bool:
        """Whether ``w``'s job has run for ``job_timeout_s``: the time since
        it started, less the time the worker sat runnable waiting for a CPU
        (a worker under SCHED_IDLE waits while other work fills the cores;
        a job is not stuck for that). The credit is capped at
        MAX_WAIT_CREDIT timeouts, so a job is killed after (1 + that) x
        JOB_TIMEOUT_MS of wall time whatever the machine does. A worker
        stuck in C code burns CPU or sleeps, neither of which is credited,
        and a stopped one (SIGSTOP) is not runnable: both die on time."""
        if self.clock() < self.job_deadline(w, job_timeout_s):
            return False
        waited = self.processes.waited(w.pid) if w.waited_at_start is not None else None
        if waited is not None:
            w.wait_credit = min(max(0.0, waited - w.waited_at_start), MAX_WAIT_CREDIT * job_timeout_s)
        return self.clock() >= self.job_deadline(w, job_timeout_s)

    @staticmethod
    def job_deadline(w: Worker, job_timeout_s: float) -> float:
        return w.job_started + job_timeout_s + w.wait_credit

    def finish(self, w: Worker) -> Job | None:
        """The worker answered for its job: back to IDLE; returns the job."""
        job, w.job, w.writing = w.job, None, None
        if w.state == WorkerState.BUSY:
            w.state = WorkerState.IDLE
            w.jobs_done += 1
        return job

    def stop(self, w: Worker, reason: str, grace_s: float, sig: int | None = signal.SIGTERM) -> Job | None:
        """STOPPING: detach, send ``sig`` (None: the EOF alone asks it to
        exit), SIGKILL once ``grace_s`` has passed. Returns the job it held
        (the caller settles it). Stopping twice keeps the earlier deadline."""
        job, w.job = w.job, None
        if w.state == WorkerState.STOPPING:
            return job
        w.state, w.stop_reason = WorkerState.STOPPING, reason
        self.detach(w)
        if grace_s <= 0:
            self.kill(w)
        else:
            if sig is not None:
                self.processes.signal(w.pid, sig)
            w.kill_at = self.clock() + grace_s
        return job

    def lost(self, w: Worker) -> None:
        """Its socket closed or spoke nonsense: the process is dead or dying
        on its own. Detach and SIGKILL it; its state and job stay, so reaping
        treats it as a death on its own (the job is retried as a crash)."""
        self.detach(w)
        self.kill(w)

    def kill(self, w: Worker) -> None:
        self.processes.signal(w.pid, signal.SIGKILL)
        w.killed = True

    def escalate(self) -> None:
        """SIGKILL every stopping worker whose grace has run out."""
        now = self.clock()
        for w in self.in_state(WorkerState.STOPPING):
            if not w.killed and w.kill_at is not None and now >= w.kill_at:
                LOG.warning("Worker %d did not stop in time (%s): SIGKILL", w.pid, w.stop_reason)
                self.kill(w)

    def detach(self, w: Worker) -> None:
        """Stop listening to ``w`` and close our end of its socket (EOF for it)."""
        try:
            self.selector.unregister(w.sock)
        except (KeyError, ValueError):
            pass
        try:
            w.sock.close()
        except OSError:
            pass

    def reaped(self, pid: int) -> Worker | None:
        """Forget a reaped process; None if it was not one of ours."""
        w = self.workers.pop(pid, None)
        if w is not None:
            self.detach(w)
        return w

    def next_deadline(self, job_timeout_s: float) -> float | None:
        """The earliest job timeout or kill deadline, monotonic."""
        times = [self.job_deadline(w, job_timeout_s) for w in self.in_state(WorkerState.BUSY)]
        times += [w.kill_at for w in self.in_state(WorkerState.STOPPING) if w.kill_at is not None and not w.killed]
        return min(times, default=None)
