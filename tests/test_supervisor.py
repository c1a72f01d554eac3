"""The supervisor and its pool, as real processes on a real SQLite file."""

from __future__ import annotations

import os
import random
import signal
import time

import psutil
import pytest
from PIL import Image, features

from helpers import image_bytes
from conftest import wait_for
from imgworker.imaging import process
from imgworker.limits import Limits

PHOTO = image_bytes("JPEG", (1600, 1200), quality=90)


def status(svc, job_id):
    return svc.store.get(job_id).status


def all_done(svc, ids, want="completed"):
    return all(status(svc, j) == want for j in ids)


def test_jobs_flow_and_outputs_written(service):
    svc = service(MAX_CONCURRENT_JOBS=2)
    ids = [svc.submit(PHOTO, name=f"p{i}.jpg") for i in range(6)]
    wait_for(lambda: all_done(svc, ids), 30, message="jobs completed")
    for j in ids:
        job = svc.store.get(j)
        out = svc.storage.processed / f"processed_{j}.webp"
        assert out.is_file() and job.output_path == str(out)
        assert job.outcome.output_size == out.stat().st_size
    assert "Job completed in" in svc.log() and "Max concurrent jobs: 2" in svc.log()


def test_stuck_job_killed_retried_then_failed_while_others_flow(service):
    """The supervisor's own promptness is measured from the job row's times
    and the process table, not from when this test's polls happen to run:
    on a loaded machine the test (and a fresh worker's imports) may be late,
    the supervisor must not be. Generous deadlines bound only the waiting."""
    svc = service(MAX_CONCURRENT_JOBS=2, JOB_TIMEOUT_MS=700, MAX_RETRIES=1, RETRY_BASE_DELAY_MS=300)
    pool = wait_for(lambda: svc.state()["pool"] if svc.state().get("workers", {}).get("alive") == 2 else None,
                    30, message="pool up")
    before = {w["pid"] for w in pool}
    stuck = svc.submit(PHOTO, _testSleepMs=60_000)
    wait_for(lambda: status(svc, stuck) == "processing", 30, message="stuck job claimed")
    others = [svc.submit(PHOTO) for _ in range(4)]
    wait_for(lambda: status(svc, stuck) == "retrying", 30, message="first timeout")
    job = svc.store.get(stuck)
    assert job.error_code == "TIMEOUT" and job.attempts == 1
    # the retry was scheduled RETRY_BASE_DELAY_MS (+ up to 20 % jitter) after the timeout was settled
    settled_by, settled_from = job.run_at - 300, job.run_at - 360
    assert settled_by - job.started_at < 700 + 1000  # killed within timeout + 1 s of the claim
    dead = wait_for(lambda: [p for p in before if not alive(p)], 30, message="stuck worker killed")
    assert len(dead) == 1
    survivor = (before - set(dead)).pop()
    # a replacement process is started at once (within 2 s of the kill, by the supervisor's clock)
    replacement = wait_for(lambda: [p for p in psutil.Process(svc.proc.pid).children() if p.pid not in before],
                           30, message="a replacement worker started")[0]
    assert started_wall(replacement.pid) - settled_from / 1000 < 2.0

    def full_again():
        st = svc.state()
        pids = {w["pid"] for w in st["pool"]}
        return st["workers"]["alive"] == 2 and dead[0] not in pids and replacement.pid in pids and survivor in pids

    wait_for(full_again, 30, message="pool back to full strength with the replacement")
    wait_for(lambda: all_done(svc, others), 60, message="other jobs completed meanwhile")
    wait_for(lambda: status(svc, stuck) == "failed", 60, message="failed after retries")
    job = svc.store.get(stuck)
    assert job.error_code == "TIMEOUT" and job.attempts == 2
    wait_for(lambda: svc.state()["workers"]["alive"] == 2, 30, message="pool at full strength at the end")
    assert "killing worker" in svc.log() and "retry scheduled at" in svc.log()


def started_wall(pid):
    """When process ``pid`` started, in wall-clock seconds, to 10 ms (psutil's
    create_time counts from the boot time in whole seconds)."""
    ticks = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19])
    booted = time.time() - float(open("/proc/uptime").read().split()[0])
    return booted + ticks / os.sysconf("SC_CLK_TCK")


def alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_worker_killed_mid_job_is_reaped_replaced_and_job_retried(service):
    svc = service(MAX_CONCURRENT_JOBS=1, RETRY_BASE_DELAY_MS=1000)
    pool = wait_for(lambda: svc.state()["pool"] if svc.state().get("workers", {}).get("alive") == 1 else None, 15)
    job_id = svc.submit(PHOTO, _testSleepMs=800)
    wait_for(lambda: status(svc, job_id) == "processing", 5)
    os.kill(pool[0]["pid"], signal.SIGKILL)
    wait_for(lambda: svc.store.get(job_id).error_code == "WORKER_CRASHED", 5, message="crash recorded")
    wait_for(lambda: status(svc, job_id) == "completed", 15)
    job = svc.store.get(job_id)
    assert job.attempts == 2
    assert 0 <= job.started_at - job.run_at < 100  # the retry started on time, not at the next poll
    assert "SIGKILL: perhaps out of memory?" in svc.log()
    new_pids = {w["pid"] for w in svc.state()["pool"]}
    assert pool[0]["pid"] not in new_pids


def test_kill9_of_whole_tree_loses_nothing(service, tmp_path):
    svc = service(start=False, MAX_CONCURRENT_JOBS=2, RETRY_BASE_DELAY_MS=50, MAX_RETRIES=10)
    small = [image_bytes("JPEG", (900 + i, 700), quality=85, color=(i % 255, 100, 50)) for i in range(5)]
    ids = [svc.submit(small[i % 5], name=f"{i}.jpg") for i in range(120)]
    rng = random.Random(7)
    for round_ in range(5):
        svc.start()
        time.sleep(rng.uniform(0.4, 1.2))
        workers = [p for p in psutil.Process(svc.proc.pid).children()]
        svc.kill_tree()
        assert not [p for p in workers if alive(p.pid)]
    svc.start()
    wait_for(lambda: all_done(svc, ids), 90, interval=0.2, message="every job completed after restarts")
    s = svc.store.stats()
    assert s.by_status["processing"] == 0 and s.completed == len(ids)
    outputs = sorted(p.name for p in svc.storage.processed.iterdir())
    assert outputs == sorted(f"processed_{j}.webp" for j in ids)  # exactly one each, no temp files
    assert "Recovered from a stopped worker or supervisor" in svc.log()


def test_memory_pause_then_resume_on_reload(service, tmp_path):
    (tmp_path / ".env").write_text("MEMORY_PAUSE_PERCENT=0\nMEMORY_RESUME_PERCENT=0\n")
    svc = service()
    job_id = svc.submit(PHOTO)
    wait_for(lambda: svc.state().get("paused"), 5, message="paused")
    time.sleep(0.5)  # give it every chance to (wrongly) claim
    assert status(svc, job_id) == "queued"
    assert "MEMORY_PAUSE_PERCENT" in svc.state()["pauseReason"]
    assert "Paused claiming jobs" in svc.log()
    (tmp_path / ".env").write_text("MEMORY_PAUSE_PERCENT=99.9\nMEMORY_RESUME_PERCENT=99\n")
    svc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: status(svc, job_id) == "completed", 10, message="resumed after reload")
    assert not svc.state()["paused"] and "Resumed claiming jobs" in svc.log()


def test_graceful_stop_lets_running_job_finish(service):
    svc = service(MAX_CONCURRENT_JOBS=1)
    job_id = svc.submit(PHOTO, _testSleepMs=1000)
    wait_for(lambda: status(svc, job_id) == "processing", 10)
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(timeout=10) == 0
    assert status(svc, job_id) == "completed"
    assert svc.store.supervisors() == []


def test_graceful_stop_past_timeout_requeues_without_spending_attempt(service):
    svc = service(MAX_CONCURRENT_JOBS=1, SHUTDOWN_TIMEOUT_MS=300)
    pid = wait_for(lambda: svc.state()["pool"] if svc.state().get("workers", {}).get("alive") == 1 else None, 15)[0]["pid"]
    job_id = svc.submit(PHOTO, _testSleepMs=20_000)
    wait_for(lambda: status(svc, job_id) == "processing", 10)
    started = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 3
    job = svc.store.get(job_id)
    assert job.status == "queued" and job.attempts == 0
    assert not alive(pid)


def test_idle_service_starts_a_job_within_milliseconds(service):
    svc = service(MAX_CONCURRENT_JOBS=1)
    wait_for(lambda: svc.state().get("workers", {}).get("alive") == 1, 15)
    time.sleep(0.3)  # fully idle: sleeping in select
    lags = []
    for _ in range(5):
        job_id = svc.submit(image_bytes("PNG", (8, 8)))
        wait_for(lambda: status(svc, job_id) == "completed", 5)
        job = svc.store.get(job_id)
        lags.append(job.started_at - job.created_at)
    assert sorted(lags)[2] < 50, lags  # median well under the 250 ms poll


def test_worker_over_rss_limit_is_recycled(service):
    svc = service(MAX_CONCURRENT_JOBS=1, WORKER_MAX_RSS_MB=16)
    ids = [svc.submit(PHOTO) for _ in range(3)]
    wait_for(lambda: all_done(svc, ids), 30)
    wait_for(lambda: svc.state()["counters"]["recycled"] >= 2, 3, message="recycled count reported")
    assert "replacing it" in svc.log()


def test_workers_hold_no_database_descriptor(service):
    svc = service(MAX_CONCURRENT_JOBS=2)
    pool = wait_for(lambda: svc.state().get("pool") if svc.state().get("workers", {}).get("alive") == 2 else None, 15)
    for w in pool:
        targets = [os.readlink(f"/proc/{w['pid']}/fd/{fd}") for fd in os.listdir(f"/proc/{w['pid']}/fd")]
        assert not [t for t in targets if "imgworker.db" in t], targets
        assert os.getpgid(w["pid"]) == w["pid"]  # own process group


def test_worker_killed_while_writing_leaves_no_partial_output(service):
    svc = service(MAX_CONCURRENT_JOBS=1, RETRY_BASE_DELAY_MS=50)
    pool = wait_for(lambda: svc.state()["pool"] if svc.state().get("workers", {}).get("alive") == 1 else None, 15)
    job_id = svc.submit(PHOTO, _testSleepMs=1000)
    wait_for(lambda: status(svc, job_id) == "processing", 5)
    # what a worker killed in the middle of write_atomic leaves behind
    partial = svc.storage.processed / f".tmp-processed_{job_id}.webp.x1y2z3"
    partial.write_bytes(b"half a webp")
    os.kill(pool[0]["pid"], signal.SIGKILL)
    wait_for(lambda: not partial.exists(), 5, message="partial output removed when the worker was reaped")
    wait_for(lambda: status(svc, job_id) == "completed", 15)
    assert sorted(p.name for p in svc.storage.processed.iterdir()) == [f"processed_{job_id}.webp"]


def test_systemd_notify_ready_watchdog_stopping(service, tmp_path):
    import socket as _socket

    path = str(tmp_path / "notify.sock")
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(15)
    svc = service(NOTIFY_SOCKET=path, WATCHDOG_USEC="2000000")
    messages = []
    while not any("WATCHDOG=1" in m for m in messages):
        messages.append(sock.recv(4096).decode())
    assert messages[0].startswith("READY=1") and "STATUS=supervising 3 workers" in messages[0]
    assert "workers busy" in messages[-1]
    svc.proc.send_signal(signal.SIGTERM)
    while "STOPPING=1" not in messages[-1]:
        messages.append(sock.recv(4096).decode())
    assert svc.proc.wait(timeout=10) == 0
    sock.close()


def test_memory_hungry_image_fails_alone_under_the_worker_cap(service):
    """WORKER_MAX_RSS_MB=64 caps a worker's address space at 256 MB: a 49 Mpx
    RGBA PNG (196 MB decoded) fails with IMAGE_TOO_LARGE, the worker lives on."""
    import io as _io

    from PIL import Image

    buf = _io.BytesIO()
    Image.new("RGBA", (7000, 7000), (10, 20, 30, 255)).save(buf, "PNG", compress_level=1)
    svc = service(MAX_CONCURRENT_JOBS=1, WORKER_MAX_RSS_MB=64)
    pool = wait_for(lambda: svc.state()["pool"] if svc.state().get("workers", {}).get("alive") == 1 else None, 15)
    big = svc.submit(buf.getvalue(), name="huge.png")
    small = svc.submit(image_bytes("PNG", (300, 200)))
    wait_for(lambda: status(svc, big) == "failed" and status(svc, small) == "completed", 30)
    job = svc.store.get(big)
    assert job.error_code == "IMAGE_TOO_LARGE" and job.attempts == 1
    assert svc.state()["counters"]["crashes"] == 0 and alive(pool[0]["pid"])


def test_sigstopped_busy_worker_is_sigkilled_and_the_pool_never_grows(service):
    """A worker that cannot act on SIGTERM (SIGSTOP here; a debugger or a
    kernel freeze alike) is SIGKILLed within JOB_TIMEOUT_MS + the grace, and
    the pool is back to exactly MAX_CONCURRENT_JOBS processes, never more."""
    from imgworker.supervisor import KILL_GRACE_S

    timeout_s = 1.0
    svc = service(MAX_CONCURRENT_JOBS=1, JOB_TIMEOUT_MS=int(timeout_s * 1000), RETRY_BASE_DELAY_MS=60_000)
    pool = wait_for(lambda: svc.state()["pool"] if svc.state().get("workers", {}).get("alive") == 1 else None, 15)
    pid = pool[0]["pid"]
    job_id = svc.submit(PHOTO, _testSleepMs=30_000)
    wait_for(lambda: status(svc, job_id) == "processing", 5)
    claimed = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    supervisor = psutil.Process(svc.proc.pid)

    def workers():
        return [p for p in supervisor.children() if alive(p.pid)]

    most = 0
    while alive(pid):
        most = max(most, len(workers()))
        assert time.monotonic() - claimed < timeout_s + KILL_GRACE_S + 1.0, "the stopped worker was never killed"
        time.sleep(0.01)
    gone = time.monotonic() - claimed
    assert gone >= timeout_s
    job = svc.store.get(job_id)
    assert job.status == "retrying" and job.error_code == "TIMEOUT"
    deadline = time.monotonic() + 3
    while not (svc.state()["workers"]["alive"] == 1 and svc.state()["pool"][0]["pid"] != pid):
        most = max(most, len(workers()))
        assert time.monotonic() < deadline, "the pool did not come back"
        time.sleep(0.01)
    assert most <= 1 and len(workers()) == 1
    assert "did not stop in time (timeout): SIGKILL" in svc.log()


def _policies(pid):
    """The scheduling policy of every thread of ``pid``."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


def test_workers_run_under_sched_idle_and_the_supervisor_does_not(service):
    """WORKER_SCHEDULING=idle (the default): every thread of every worker, a
    replacement included, runs under SCHED_IDLE so that the API and the
    supervisor preempt them at once; the supervisor stays SCHED_OTHER and
    the jobs flow."""
    svc = service(MAX_CONCURRENT_JOBS=2)
    pool = wait_for(lambda: svc.state()["pool"] if svc.state().get("workers", {}).get("alive") == 2 else None, 15)
    ids = [svc.submit(PHOTO, name=f"p{i}.jpg") for i in range(3)]
    wait_for(lambda: all_done(svc, ids), 30, message="jobs completed")
    for w in pool:
        assert _policies(w["pid"]) == {os.SCHED_IDLE}, w
    assert _policies(svc.proc.pid) == {os.SCHED_OTHER}
    os.kill(pool[0]["pid"], signal.SIGKILL)
    new = wait_for(lambda: [w["pid"] for w in svc.state()["pool"] if w["pid"] not in {p["pid"] for p in pool}
                            and w["state"] == "idle"], 15, message="a replacement worker")
    assert _policies(new[0]) == {os.SCHED_IDLE}


@pytest.mark.parametrize("setting, policy", [("batch", os.SCHED_BATCH), ("normal", os.SCHED_OTHER)])
def test_workers_take_the_policy_asked_for(service, setting, policy):
    svc = service(MAX_CONCURRENT_JOBS=1, WORKER_SCHEDULING=setting)
    pool = wait_for(lambda: svc.state()["pool"] if svc.state().get("workers", {}).get("alive") == 1 else None, 15)
    job = svc.submit(PHOTO)
    wait_for(lambda: all_done(svc, [job]), 30)
    assert _policies(pool[0]["pid"]) == {policy}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/self/schedstat")
                    or not features.check("avif"), reason="needs Linux CPU affinity, schedstat and AVIF")
def test_workers_sharing_one_cpu_are_not_killed_for_the_time_they_wait(service, tmp_path):
    """Two workers pinned to one CPU each get half of it, so each job takes
    about twice its CPU time of wall time, past JOB_TIMEOUT_MS; the time a
    worker waits for the CPU is not the job's (a SCHED_IDLE worker waits
    whenever other work fills the cores), so both complete on their first
    attempt. The timeout is set from what the job costs here and now."""
    noise = Image.frombytes("RGB", (800, 600), os.urandom(800 * 600 * 3)).resize((2400, 1800))
    src = tmp_path / "noise.jpg"
    noise.save(src, quality=95)
    costs = []
    for _ in range(2):
        t0 = time.process_time()
        process(src, tmp_path, "calibrate", {"format": "avif"}, Limits())
        costs.append(time.process_time() - t0)
    timeout_ms = max(400, round(min(costs) * 1000 * 1.6))
    svc = service(MAX_CONCURRENT_JOBS=2, JOB_TIMEOUT_MS=timeout_ms)
    pool = wait_for(lambda: svc.state()["pool"] if svc.state().get("workers", {}).get("alive") == 2 else None, 15)
    for w in pool:
        os.sched_setaffinity(w["pid"], {0})
    jobs = [svc.submit(src.read_bytes(), name=f"n{i}.jpg", format="avif") for i in range(2)]
    wait_for(lambda: all(svc.store.get(j).status in ("completed", "failed", "retrying") for j in jobs), 60,
             message="both jobs settled")
    rows = [svc.store.get(j) for j in jobs]
    assert [(r.status, r.attempts, r.error_code) for r in rows] == [("completed", 1, None)] * 2, svc.log()
    # they really shared the CPU: at least one ran past the timeout on the wall clock
    assert max(r.completed_at - r.started_at for r in rows) > timeout_ms
    assert "timed out" not in svc.log()
