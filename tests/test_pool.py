"""The supervisor's pool as a state machine, in-process: fake worker
processes (pool.Processes substituted), a fake clock, a real SQLite store.

Each fake worker holds the worker's end of a real socketpair and speaks the
real wire format; the test decides when it is ready, answers, ignores
SIGTERM (as a SIGSTOPped process does) or dies.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest

from imgworker import pool as pool_mod
from imgworker import supervisor as sup_mod
from imgworker.model import JobStatus, Outcome
from imgworker.pool import Processes, WorkerState
from imgworker.store import NewJob
from imgworker.supervisor import Supervisor
from imgworker.wire import done_message, recv, send


class Clock:
    def __init__(self):
        self.now = 1000.0
        self.tick = 0.0  # added on every read (lets bounded waits in shutdown end)

    def __call__(self):
        self.now += self.tick
        return self.now

    def advance(self, seconds):
        self.now += seconds


class FakeWorker:
    def __init__(self, procs, pid, sock):
        self.procs, self.pid, self.sock = procs, pid, sock
        self.ignores_term = False   # a SIGSTOPped, frozen or stubborn process
        self.ignores_eof = False
        self.status = None          # wait status once exited
        self.waited = 0.0           # seconds spent runnable, waiting for a CPU (Processes.waited)

    def ready(self):
        send(self.sock, {"ready": self.pid})

    def take_job(self):
        self.sock.settimeout(2)
        return recv(self.sock)

    def answer(self, job, rss_mb=10):
        msg = done_message(job["id"], Outcome(5, "png", 100, 8, 8, "webp", 40, 8, 8))
        msg["rssMb"] = rss_mb
        send(self.sock, msg)

    def exit(self, status):
        if self.status is None:
            self.status = status
            self.sock.close()
            self.procs.dead.append((self.pid, status))

    def saw_eof(self):
        if self.status is not None:
            return False
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        finally:
            self.sock.setblocking(True)


class FakeProcesses(Processes):
    def __init__(self, clock):
        self.clock = clock
        self.workers = {}
        self.spawned_at = []
        self.signals = []
        self.dead = []
        self.on_spawn = lambda w: None
        self._next = 40000

    def spawn(self, fd, max_mb, scheduling="normal"):
        self._next += 1
        w = FakeWorker(self, self._next, socket.socket(fileno=os.dup(fd)))
        self.workers[w.pid] = w
        self.spawned_at.append(self.clock.now)
        self.on_spawn(w)
        return w.pid

    def signal(self, pid, sig):
        self.signals.append((pid, sig))
        w = self.workers[pid]
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and not w.ignores_term):
            w.exit(sig)  # wait status of a death by signal

    def waited(self, pid):
        return self.workers[pid].waited

    def reap(self):
        for w in self.workers.values():  # a real worker exits when its socket reaches EOF
            if not w.ignores_eof and w.saw_eof():
                w.exit(0)
        while self.dead:
            yield self.dead.pop(0)


@pytest.fixture
def rig(make_config):
    made = []

    def build(**env):
        env = {"MAX_CONCURRENT_JOBS": 1, "MEMORY_PAUSE_PERCENT": 100, "MEMORY_RESUME_PERCENT": 99, **env}
        clock = Clock()
        procs = FakeProcesses(clock)
        sup = Supervisor(make_config(**env), processes=procs, clock=clock)
        sup.start()
        made.append(sup)
        return sup, procs, clock

    yield build
    for sup in made:
        if sup.pool.workers:
            sup.clock.tick = 0.05
            sup.shutdown()


def ready_all(sup, procs):
    for w in procs.workers.values():
        if w.status is None:
            w.ready()
    settle(sup)


def settle(sup, turns=3):
    """Let the supervisor read what fake workers sent and act on it."""
    for _ in range(turns):
        sup.poll(0.05)
        sup.step()


def submit(sup, n=1):
    ids = []
    for i in range(n):
        job_id = os.urandom(16).hex()
        sup.store.enqueue([NewJob(job_id, "/nonexistent", f"f{i}.png", 100)], 100, 4)
        ids.append(job_id)
    return ids


def live(procs):
    return [w for w in procs.workers.values() if w.status is None]


def one_busy(rig, **env):
    """A supervisor whose one worker has taken one job: (sup, procs, clock, worker, job_id)."""
    sup, procs, clock = rig(**env)
    ready_all(sup, procs)
    (job_id,) = submit(sup)
    settle(sup)
    (w,) = live(procs)
    assert w.take_job()["id"] == job_id
    return sup, procs, clock, w, job_id


def test_stuck_worker_is_sigkilled_after_the_grace_and_keeps_its_slot_until_reaped(rig):
    sup, procs, clock = rig(JOB_TIMEOUT_MS=1000)
    ready_all(sup, procs)
    (job_id,) = submit(sup)
    settle(sup)
    (w,) = live(procs)
    assert w.take_job()["id"] == job_id
    w.ignores_term = w.ignores_eof = True  # SIGSTOP: SIGTERM stays pending, nothing is read
    clock.advance(1.0)
    sup.step()
    assert procs.signals == [(w.pid, signal.SIGTERM)]
    assert sup.store.get(job_id).status == JobStatus.RETRYING and sup.store.get(job_id).error_code == "TIMEOUT"
    assert sup.pool.workers[w.pid].state == WorkerState.STOPPING
    settle(sup)
    assert len(live(procs)) == 1 and len(sup.pool.workers) == 1  # no replacement while it lives
    clock.advance(sup_mod.KILL_GRACE_S / 2)
    sup.step()
    assert procs.signals == [(w.pid, signal.SIGTERM)]  # not yet
    clock.advance(sup_mod.KILL_GRACE_S / 2 + 1e-6)
    sup.step()
    assert procs.signals == [(w.pid, signal.SIGTERM), (w.pid, signal.SIGKILL)]
    settle(sup)
    (new,) = live(procs)
    assert new.pid != w.pid and list(sup.pool.workers) == [new.pid]
    assert sup.counters.timeouts == 1 and sup.counters.crashes == 0


def test_time_a_worker_waits_for_a_cpu_is_not_counted_against_the_timeout(rig):
    """A worker under SCHED_IDLE waits while other work fills the cores: that
    wait extends its job's deadline (and the job's lease, so no other node
    takes it back), while running or sleeping time counts as before."""
    sup, procs, clock, w, job_id = one_busy(rig, JOB_TIMEOUT_MS=1000)
    lease = sup.store.get(job_id).lease_expires_at
    w.waited = 0.6  # of the first second, 0.6 s waiting for a CPU
    clock.advance(1.0)
    sup.step()
    assert procs.signals == [] and sup.store.get(job_id).status == JobStatus.PROCESSING
    assert sup.store.get(job_id).lease_expires_at == lease + 600  # moved by the wait
    clock.advance(0.5)
    sup.step()
    assert procs.signals == []
    clock.advance(0.1)  # 1.6 s in, 0.6 s of it waiting: the job has run for its 1 s
    sup.step()
    assert procs.signals == [(w.pid, signal.SIGTERM)]
    assert sup.store.get(job_id).error_code == "TIMEOUT"


def test_the_wait_credit_is_capped(rig):
    """A job starved forever still ends: after (1 + MAX_WAIT_CREDIT) timeouts of wall time."""
    sup, procs, clock, w, _ = one_busy(rig, JOB_TIMEOUT_MS=1000)
    w.waited = 1e6
    clock.advance(1 + pool_mod.MAX_WAIT_CREDIT - 0.01)
    sup.step()
    assert procs.signals == []
    clock.advance(0.01)
    sup.step()
    assert procs.signals == [(w.pid, signal.SIGTERM)]


def test_a_worker_that_dies_on_its_own_is_replaced_and_its_job_retried(rig):
    sup, procs, clock = rig()
    ready_all(sup, procs)
    (job_id,) = submit(sup)
    settle(sup)
    (w,) = live(procs)
    w.take_job()
    w.exit(signal.SIGSEGV)
    settle(sup)
    job = sup.store.get(job_id)
    assert job.status == JobStatus.RETRYING and job.error_code == "WORKER_CRASHED" and "SIGSEGV" in job.error
    assert len(live(procs)) == 1 and sup.counters.crashes == 1 and sup.boot_failures == 0


def test_boot_failures_back_off_then_stop_the_supervisor(rig):
    sup, procs, clock = rig()
    procs.on_spawn = lambda w: w.exit(1 << 8)  # exits with code 1 before it is ready
    (first,) = procs.workers.values()
    first.exit(1 << 8)
    for _ in range(40):
        sup.step()  # spawns when the backoff allows; the new worker dies at once
        sup.step()  # reaps it at the same instant
        clock.advance(0.5)
        if sup.stopping:
            break
    assert sup.stopping and sup.exit_code == sup_mod.EXIT_BOOT_FAILURE
    assert len(procs.spawned_at) == sup_mod.BOOT_FAILURE_LIMIT
    gaps = [b - a for a, b in zip(procs.spawned_at, procs.spawned_at[1:])]
    assert gaps == [1.0, 2.0, 4.0, 8.0]  # 1 s, doubling
    assert "exited with code 1" in sup.state()["lastBootError"]


def test_a_ready_worker_resets_the_boot_failure_count(rig):
    sup, procs, clock = rig()
    (first,) = procs.workers.values()
    first.exit(1 << 8)
    sup.step()
    assert sup.boot_failures == 1 and not live(procs)
    clock.advance(1.0)
    sup.step()
    ready_all(sup, procs)
    assert sup.boot_failures == 0 and sup.pool.alive == 1 and sup.state()["lastBootError"] is None


def test_a_worker_never_ready_is_killed_and_counted(rig):
    sup, procs, clock = rig()
    (w,) = live(procs)
    w.ignores_term = w.ignores_eof = True  # hung while starting
    clock.advance(sup_mod.BOOT_TIMEOUT_S)
    sup.step()
    clock.advance(sup_mod.KILL_GRACE_S)
    sup.step()
    assert (w.pid, signal.SIGKILL) in procs.signals
    sup.step()
    assert sup.boot_failures == 1 and w.pid not in sup.pool.workers


def test_recycled_worker_exits_on_eof_and_is_replaced(rig):
    sup, procs, clock = rig(WORKER_MAX_RSS_MB=16)
    ready_all(sup, procs)
    a, b = submit(sup, 2)
    settle(sup)
    (w,) = live(procs)
    job = w.take_job()
    w.answer(job, rss_mb=100)
    settle(sup)
    ready_all(sup, procs)
    assert sup.store.get(a).status == JobStatus.COMPLETED
    assert sup.store.get(b).status == JobStatus.PROCESSING  # on the replacement, not the recycled one
    (new,) = live(procs)
    assert new.pid != w.pid and w.status == 0 and not procs.signals  # it left on EOF: no signal needed
    assert new.take_job()["id"] == b and sup.counters.recycled == 1


def test_recycled_worker_that_ignores_eof_is_sigkilled(rig):
    sup, procs, clock = rig(WORKER_MAX_RSS_MB=16)
    ready_all(sup, procs)
    submit(sup)
    settle(sup)
    (w,) = live(procs)
    w.ignores_eof = True
    w.answer(w.take_job(), rss_mb=100)
    settle(sup)
    assert sup.pool.workers[w.pid].state == WorkerState.STOPPING and len(sup.pool.workers) == 1
    clock.advance(sup_mod.RECYCLE_GRACE_S)
    settle(sup)
    assert procs.signals == [(w.pid, signal.SIGKILL)] and len(live(procs)) == 1


def test_drain_lets_the_running_job_finish_and_claims_nothing_new(rig):
    sup, procs, clock = rig(MAX_CONCURRENT_JOBS=2)
    ready_all(sup, procs)
    a, b, c = submit(sup, 3)
    settle(sup)
    busy = {w.pid: w for w in live(procs)}
    jobs = {pid: w.take_job() for pid, w in busy.items()}
    sup.handle_term(signal.SIGTERM)
    assert sup.step() is False  # jobs still running
    (first, second) = busy.values()
    first.answer(jobs[first.pid])
    settle(sup)
    assert sup.store.get(c).status == JobStatus.QUEUED  # nothing claimed while stopping
    second.answer(jobs[second.pid])
    sup.poll(0.05)
    assert sup.step() is True
    sup.shutdown()
    assert {sup.store.get(j).status for j in (a, b)} == {JobStatus.COMPLETED}
    assert not sup.pool.workers and not procs.signals  # both left on EOF


def test_drain_past_the_deadline_releases_the_job_without_spending_an_attempt(rig):
    sup, procs, clock, w, job_id = one_busy(rig, SHUTDOWN_TIMEOUT_MS=500)
    sup.handle_term(signal.SIGTERM)
    assert sup.step() is False
    clock.advance(0.5)
    assert sup.step() is True
    job = sup.store.get(job_id)
    assert job.status == JobStatus.QUEUED and job.attempts == 0
    assert procs.signals == [(w.pid, signal.SIGKILL)]
    sup.shutdown()
    assert not sup.pool.workers


def test_state_reports_each_worker_and_the_pool_strength(rig):
    sup, procs, clock = rig(MAX_CONCURRENT_JOBS=2)
    st = sup.state()
    assert st["workers"] == {"configured": 2, "alive": 0, "busy": 0}
    assert [w["state"] for w in st["pool"]] == ["starting", "starting"]
    ready_all(sup, procs)
    submit(sup)
    settle(sup)
    st = sup.state()
    assert st["workers"] == {"configured": 2, "alive": 2, "busy": 1}
    assert sorted(w["state"] for w in st["pool"]) == ["busy", "idle"] and [w["slot"] for w in st["pool"]] == [0, 1]
