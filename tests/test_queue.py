"""The queue contract, on both stores: a real SQLite file and a real
PostgreSQL database (the private test server)."""

from __future__ import annotations

import random

import pytest

from imgworker.errors import Conflict, NotFound, QueueFull
from imgworker.queue import RetryPolicy, backoff_ms, now_ms

POLICY = RetryPolicy(base_ms=1000, max_ms=60000)


@pytest.fixture
def queue(any_queue):
    return any_queue


def drain(queue, owner="sup"):
    out = []
    while (job := queue.claim(owner, 60000)) is not None:
        out.append(job["id"])
    return out


def test_priority_then_fifo(queue, add_jobs):
    low = add_jobs(3, priority=0)
    high = add_jobs(2, priority=5)
    mid = add_jobs(2, priority=1)
    assert drain(queue) == high + mid + low


def test_claim_sets_lease_and_counts_attempt(queue, add_jobs):
    (job_id,) = add_jobs(1)
    t = now_ms()
    job = queue.claim("owner-a", 5000, now=t)
    assert job["id"] == job_id and job["status"] == "processing"
    assert job["attempts"] == 1 and job["lease_owner"] == "owner-a"
    assert job["lease_expires_at"] == t + 5000
    assert queue.claim("owner-b", 5000) is None  # nothing else claimable


def test_run_at_respected(queue, add_jobs):
    (job_id,) = add_jobs(1)
    t = now_ms()
    queue.claim("s", 1000, now=t)
    status, run_at = queue.fail(job_id, "s", "IO_ERROR", "disk hiccup", True, POLICY, now=t)
    assert status == "retrying" and t + 1000 <= run_at <= t + 1200
    assert queue.claim("s", 1000, now=run_at - 1) is None
    assert queue.next_run_at() == run_at
    again = queue.claim("s", 1000, now=run_at)
    assert again["id"] == job_id and again["attempts"] == 2


def test_backoff_schedule_doubles_with_jitter_and_cap():
    rng = random.Random(1)
    for attempt, base in [(1, 1000), (2, 2000), (3, 4000), (4, 8000)]:
        d = backoff_ms(attempt, 1000, 60000, rng)
        assert base <= d <= base * 1.2
    assert backoff_ms(20, 1000, 60000, rng) == 60000


def test_retry_backoff_grows_then_fails_when_attempts_spent(queue, add_jobs):
    (job_id,) = add_jobs(1, max_attempts=3)
    t = now_ms()
    delays = []
    for attempt in range(1, 4):
        job = queue.claim("s", 1000, now=t)
        assert job["attempts"] == attempt
        status, run_at = queue.fail(job_id, "s", "TIMEOUT", "too slow", True, POLICY, now=t) or (None, None)
        if attempt < 3:
            assert status == "retrying"
            delays.append(run_at - t)
            t = run_at
        else:
            assert status == "failed" and run_at is None
    assert 1000 <= delays[0] <= 1200 and 2000 <= delays[1] <= 2400
    job = queue.get(job_id)
    assert job["status"] == "failed" and job["error_code"] == "TIMEOUT" and job["error"] == "too slow"
    assert queue.stats()["failedJobs"] == 1


def test_deterministic_failure_fails_at_once(queue, add_jobs):
    (job_id,) = add_jobs(1)
    queue.claim("s", 1000)
    assert queue.fail(job_id, "s", "INVALID_IMAGE", "corrupt", False, POLICY)[0] == "failed"
    assert queue.get(job_id)["attempts"] == 1


def test_lease_expiry_returns_job_and_counts_attempt(queue, add_jobs):
    (job_id,) = add_jobs(1, max_attempts=2)
    t = now_ms()
    queue.claim("s", 100, now=t)
    assert queue.recover([], POLICY, now=t + 50) == []  # lease still valid
    assert queue.recover([], POLICY, now=t + 101) == [(job_id, "retrying")]
    job = queue.get(job_id)
    assert job["attempts"] == 1 and job["error_code"] == "WORKER_LOST" and job["lease_owner"] is None
    queue.claim("s", 100, now=job["run_at"])
    assert queue.recover([], POLICY, now=job["run_at"] + 200) == [(job_id, "failed")]


def test_dead_owner_recovered_before_lease_ends(queue, add_jobs):
    a, b = add_jobs(2)
    queue.claim("dead", 10**9)
    queue.claim("alive", 10**9)
    assert queue.recover(["dead"], POLICY) == [(a, "retrying")]
    assert queue.get(b)["status"] == "processing"


def test_only_lease_holder_can_settle(queue, add_jobs):
    (job_id,) = add_jobs(1)
    queue.claim("a", 1000)
    assert queue.complete(job_id, "b", {"x": 1}, "/out") is False
    assert queue.fail(job_id, "b", "X", "y", True, POLICY) is None
    assert queue.release(job_id, "b") is False
    assert queue.complete(job_id, "a", {"processingTime": 12}, "/out") is True
    job = queue.get(job_id)
    assert job["status"] == "completed" and job["result"] == {"processingTime": 12}
    assert queue.complete(job_id, "a", {}, "/out") is False  # not twice


def test_release_spends_no_attempt(queue, add_jobs):
    (job_id,) = add_jobs(1)
    queue.claim("a", 1000)
    assert queue.release(job_id, "a")
    job = queue.get(job_id)
    assert job["status"] == "queued" and job["attempts"] == 0 and job["started_at"] is None


def test_queue_full_bounds_queued_plus_retrying(queue, add_jobs):
    ids = add_jobs(3, max_queue=3)
    with pytest.raises(QueueFull):
        add_jobs(1, max_queue=3)
    queue.claim("s", 1000)  # one leaves the waiting set
    add_jobs(1, max_queue=3)
    with pytest.raises(QueueFull):
        add_jobs(2, max_queue=4)  # all or nothing
    assert queue.stats()["currentQueueSize"] == 3
    assert len(queue.list(limit=100)) == 4 and ids[0] in {j["id"] for j in queue.list()}


def test_cancel_and_manual_retry(queue, add_jobs, tmp_path):
    a, b = add_jobs(2)
    queue.cancel(a)
    assert queue.get(a)["status"] == "cancelled"
    with pytest.raises(Conflict):
        queue.cancel(a)
    with pytest.raises(NotFound):
        queue.cancel("nope")
    queue.claim("s", 1000)
    with pytest.raises(Conflict):
        queue.cancel(b)  # processing
    with pytest.raises(Conflict):
        queue.retry(b, 100)  # not failed
    queue.fail(b, "s", "INVALID_IMAGE", "bad", False, POLICY)
    with pytest.raises(Conflict):
        queue.retry(b, 100)  # upload is gone
    (tmp_path / "in-1").write_bytes(b"x")
    queue.retry(b, 100)
    job = queue.get(b)
    assert job["status"] == "queued" and job["attempts"] == 0 and job["error_code"] is None


def test_stats_and_positions(queue, add_jobs):
    ids = add_jobs(4)
    urgent = add_jobs(1, priority=9)[0]
    assert queue.queue_position(queue.get(urgent)) == 1
    assert queue.queue_position(queue.get(ids[2])) == 4
    job = queue.claim("s", 1000)
    queue.complete(job["id"], "s", {"processingTime": 100}, "/o")
    job = queue.claim("s", 1000)
    queue.complete(job["id"], "s", {"processingTime": 300}, "/o")
    job = queue.claim("s", 1000)
    queue.fail(job["id"], "s", "INVALID_IMAGE", "bad", False, POLICY)
    queue.claim("s", 1000)
    s = queue.stats()
    assert s["totalJobs"] == 5 and s["completedJobs"] == 2 and s["failedJobs"] == 1
    assert s["currentQueueSize"] == 1 and s["currentProcessingCount"] == 1
    assert s["averageProcessingTime"] == 200
    assert s["completedInLast24h"] == 2 and s["failedInLast24h"] == 1


def test_batch_and_expiry_listing(queue, add_jobs):
    ids = add_jobs(3, batch_id="b1")
    add_jobs(1)
    assert [j["id"] for j in queue.batch("b1")] == ids
    job = queue.claim("s", 1000)
    queue.complete(job["id"], "s", {}, "/o", now=1000)
    assert [j["id"] for j in queue.expired(older_than=2000)] == [job["id"]]
    assert queue.expired(older_than=500) == []
    assert queue.delete([job["id"]]) == 1
    assert queue.known_ids(ids) == set(ids[1:])


def test_enqueue_returns_claim_positions(queue):
    from imgworker.queue import NewJob

    assert queue.enqueue([NewJob(f"a{i}", "/in", "x", 1) for i in range(3)], 100, 1) == [1, 2, 3]
    assert queue.enqueue([NewJob("urgent", "/in", "x", 1, priority=5)], 100, 1) == [1]
    mixed = [NewJob("low", "/in", "x", 1, priority=-1), NewJob("mid", "/in", "x", 1, priority=5)]
    assert queue.enqueue(mixed, 100, 1) == [5, 2]  # each at the moment it was inserted
    assert queue.queue_position(queue.get("a0")) == 3 and queue.queue_position(queue.get("low")) == 6


def test_dashboard_reads(queue, add_jobs):
    """What /api/dashboard draws: per-minute activity, the queue by priority,
    the latest failures (the same answers from both stores)."""
    add_jobs(2, priority=5)
    add_jobs(1)
    import time

    t0 = (int(time.time() * 1000) // 60_000 + 1) * 60_000  # the next whole minute (after the jobs' run_at)
    job = queue.claim("s", 10**9, now=t0)
    queue.complete(job["id"], "s", {}, "/o", now=t0 + 400)
    job = queue.claim("s", 10**9, now=t0 + 60_000)
    queue.fail(job["id"], "s", "INVALID_IMAGE", "bad", False, POLICY, now=t0 + 60_100)
    assert queue.activity(t0) == [{"minute": t0, "completed": 1, "failed": 0, "avgMs": 400},
                                  {"minute": t0 + 60_000, "completed": 0, "failed": 1, "avgMs": None}]
    assert queue.activity(t0 + 120_000) == []
    assert queue.waiting_by_priority() == [{"priority": 0, "queued": 1, "retrying": 0, "processing": 0}]
    queue.claim("s", 10**9, now=t0 + 70_000)
    assert queue.waiting_by_priority() == [{"priority": 0, "queued": 0, "retrying": 0, "processing": 1}]
    (failure,) = queue.recent_failures(10)
    assert failure == {"jobId": job["id"], "filename": job["original_name"], "code": "INVALID_IMAGE", "error": "bad",
                       "failedAt": t0 + 60_100, "attempts": 1}


def test_attempt_limit_is_read_when_a_failure_is_settled(queue, add_jobs):
    """Bug 2: the supervisor's MAX_RETRIES (in the policy) decides at settle
    time, not the limit frozen on the row at enqueue."""
    a, b = add_jobs(2, max_attempts=4)
    job = queue.claim("s", 1000)
    assert queue.fail(job["id"], "s", "TIMEOUT", "slow", True, RetryPolicy(max_attempts=1))[0] == "failed"
    assert queue.get(a)["max_attempts"] == 1
    job = queue.claim("s", 1000)
    assert queue.fail(job["id"], "s", "TIMEOUT", "slow", True, RetryPolicy())[0] == "retrying"  # the row's 4
