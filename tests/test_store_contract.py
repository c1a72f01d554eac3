"""The JobStore contract: every implementation in conftest.STORE_FACTORIES
must pass every test here (claim order, priorities, leases, retries, cancel,
batch all-or-none, stats, recovery, housekeeping rows, supervisors)."""

from __future__ import annotations

import random

import pytest

from imgworker.clock import now_ms
from imgworker.errors import Conflict, NotFound, QueueFull
from imgworker.model import ErrorCode, JobStatus
from imgworker.store import NewJob, Recovered, RetryPolicy, backoff_ms

from conftest import make_outcome

POLICY = RetryPolicy(base_ms=1000, max_ms=60000)


def drain(store, owner="sup"):
    out = []
    while (job := store.claim(owner, 60000)) is not None:
        out.append(job.id)
    return out


def test_priority_then_fifo(store, add_jobs):
    low = add_jobs(3, priority=0)
    high = add_jobs(2, priority=5)
    mid = add_jobs(2, priority=1)
    assert drain(store) == high + mid + low


def test_negative_priorities_come_last(store, add_jobs):
    late = add_jobs(1, priority=-5)
    normal = add_jobs(2)
    assert drain(store) == normal + late


def test_claim_sets_lease_and_counts_attempt(store, add_jobs):
    (job_id,) = add_jobs(1, format="png")
    t = now_ms()
    job = store.claim("owner-a", 5000, now=t)
    assert job.id == job_id and job.status == JobStatus.PROCESSING and job.status == "processing"
    assert job.attempts == 1 and job.lease_owner == "owner-a" and job.started_at == t
    assert job.lease_expires_at == t + 5000
    assert job.options == {"format": "png"} and job.outcome is None
    assert store.claim("owner-b", 5000) is None  # nothing else claimable


def test_run_at_respected(store, add_jobs):
    (job_id,) = add_jobs(1)
    t = now_ms()
    store.claim("s", 1000, now=t)
    settled = store.fail(job_id, "s", ErrorCode.IO_ERROR, "disk hiccup", True, POLICY, now=t)
    assert settled.status == JobStatus.RETRYING and t + 1000 <= settled.run_at <= t + 1200
    assert store.claim("s", 1000, now=settled.run_at - 1) is None
    assert store.next_run_at() == settled.run_at
    again = store.claim("s", 1000, now=settled.run_at)
    assert again.id == job_id and again.attempts == 2


def test_backoff_schedule_doubles_with_jitter_and_cap():
    rng = random.Random(1)
    for attempt, base in [(1, 1000), (2, 2000), (3, 4000), (4, 8000)]:
        d = backoff_ms(attempt, 1000, 60000, rng)
        assert base <= d <= base * 1.2
    assert backoff_ms(20, 1000, 60000, rng) == 60000


def test_retry_backoff_grows_then_fails_when_attempts_spent(store, add_jobs):
    (job_id,) = add_jobs(1, max_attempts=3)
    t = now_ms()
    delays = []
    for attempt in range(1, 4):
        job = store.claim("s", 1000, now=t)
        assert job.attempts == attempt
        settled = store.fail(job_id, "s", ErrorCode.TIMEOUT, "too slow", True, POLICY, now=t)
        if attempt < 3:
            assert settled.status == JobStatus.RETRYING
            delays.append(settled.run_at - t)
            t = settled.run_at
        else:
            assert settled.status == JobStatus.FAILED and settled.run_at is None
    assert 1000 <= delays[0] <= 1200 and 2000 <= delays[1] <= 2400
    job = store.get(job_id)
    assert job.status == "failed" and job.error_code == "TIMEOUT" and job.error == "too slow"
    assert job.completed_at is not None and job.lease_owner is None
    assert store.stats().failed == 1


def test_deterministic_failure_fails_at_once(store, add_jobs):
    (job_id,) = add_jobs(1)
    store.claim("s", 1000)
    assert store.fail(job_id, "s", ErrorCode.INVALID_IMAGE, "corrupt", False, POLICY).status == "failed"
    assert store.get(job_id).attempts == 1


def test_lease_expiry_returns_job_and_counts_attempt(store, add_jobs):
    (job_id,) = add_jobs(1, max_attempts=2)
    t = now_ms()
    store.claim("s", 100, now=t)
    assert store.recover([], POLICY, now=t + 50) == []  # lease still valid
    assert store.recover([], POLICY, now=t + 101) == [Recovered(job_id, JobStatus.RETRYING)]
    job = store.get(job_id)
    assert job.attempts == 1 and job.error_code == "WORKER_LOST" and job.lease_owner is None
    store.claim("s", 100, now=job.run_at)
    assert store.recover([], POLICY, now=job.run_at + 200) == [Recovered(job_id, JobStatus.FAILED)]


def test_an_extended_lease_is_not_recovered_and_only_its_holder_extends_it(store, add_jobs):
    (job_id,) = add_jobs(1)
    t = now_ms()
    store.claim("s", 100, now=t)
    assert store.extend(job_id, "other", t + 500) is False
    assert store.extend(job_id, "s", t + 500, attempt=2) is False  # a late word of another attempt
    assert store.extend(job_id, "s", t + 500) is True
    assert store.extend(job_id, "s", t + 50) is True  # never moves it earlier
    assert store.get(job_id).lease_expires_at == t + 500
    assert store.recover([], POLICY, now=t + 400) == []
    assert store.recover([], POLICY, now=t + 501) == [Recovered(job_id, JobStatus.RETRYING)]
    assert store.extend(job_id, "s", t + 900) is False  # no longer held


def test_dead_owner_recovered_before_lease_ends(store, add_jobs):
    a, b = add_jobs(2)
    store.claim("dead", 10**9)
    store.claim("alive", 10**9)
    assert store.recover(["dead"], POLICY) == [Recovered(a, JobStatus.RETRYING)]
    assert store.get(b).status == "processing"


def test_only_lease_holder_can_settle(store, add_jobs):
    (job_id,) = add_jobs(1)
    store.claim("a", 1000)
    assert store.complete(job_id, "b", make_outcome(), "/out") is False
    assert store.fail(job_id, "b", ErrorCode.IO_ERROR, "y", True, POLICY) is None
    assert store.release(job_id, "b") is False
    assert store.complete(job_id, "a", make_outcome(12), "/out") is True
    job = store.get(job_id)
    assert job.status == "completed" and job.outcome == make_outcome(12) and job.output_path == "/out"
    assert store.complete(job_id, "a", make_outcome(), "/out") is False  # not twice


def test_a_late_outcome_of_an_earlier_attempt_settles_nothing(store, add_jobs):
    """The lease is the owner's and the attempt's: after a job was taken back
    (its lease expired) and the same owner claimed it again, that owner's
    late outcome of the first attempt changes nothing; the second attempt's
    own outcome settles it (before: the stale outcome completed or failed the
    running attempt's row)."""
    (job_id,) = add_jobs(1)
    t = now_ms()
    first = store.claim("s", 1000, now=t)
    store.recover([], RetryPolicy(0, 0), now=t + 1001)  # its lease expired
    second = store.claim("s", 1000, now=t + 1002)
    assert (first.attempts, second.id, second.attempts) == (1, job_id, 2)
    assert store.complete(job_id, "s", make_outcome(), "/late", attempt=1) is False
    assert store.fail(job_id, "s", ErrorCode.INVALID_IMAGE, "late", False, POLICY, attempt=1) is None
    assert store.complete_and_claim(job_id, "s", make_outcome(), "/late", 1000, attempt=1) == (False, None)
    job = store.get(job_id)
    assert (job.status, job.attempts, job.output_path, job.error_code) == ("processing", 2, None, "WORKER_LOST")
    assert store.complete(job_id, "s", make_outcome(3), "/out", attempt=2) is True
    assert store.get(job_id).output_path == "/out"


def test_outcome_round_trips_every_field(store, add_jobs):
    (job_id,) = add_jobs(1)
    store.claim("a", 1000)
    outcome = make_outcome(7, input_format="gif", input_size=5000, input_width=300, input_height=200,
                           output_format="gif", output_size=4000, output_width=150, output_height=100,
                           frames_in=12, frames_out=12, animated=True, kept_original=True)
    store.complete(job_id, "a", outcome, "/out")
    job = store.get(job_id)
    assert job.outcome == outcome
    assert job.input_format == "gif" and job.input_size == 5000  # the pipeline's reading of the upload


def test_complete_and_claim_in_one_step(store, add_jobs):
    a, b = add_jobs(2)
    store.claim("s", 1000)
    done, following = store.complete_and_claim(a, "s", make_outcome(), "/o", 1000)
    assert done and following.id == b and following.status == "processing"
    done, following = store.complete_and_claim(b, "s", make_outcome(), "/o", 1000)
    assert done and following is None
    assert store.complete_and_claim(b, "s", make_outcome(), "/o", 1000) == (False, None)


def test_release_spends_no_attempt(store, add_jobs):
    (job_id,) = add_jobs(1)
    store.claim("a", 1000)
    assert store.release(job_id, "a")
    job = store.get(job_id)
    assert job.status == "queued" and job.attempts == 0 and job.started_at is None
    assert store.claim("b", 1000).id == job_id  # claimable at once


def test_release_of_a_retried_job_keeps_it_retrying(store, add_jobs):
    (job_id,) = add_jobs(1)
    t = now_ms()
    store.claim("a", 1000, now=t)
    run_at = store.fail(job_id, "a", ErrorCode.TIMEOUT, "slow", True, POLICY, now=t).run_at
    store.claim("a", 1000, now=run_at)
    assert store.release(job_id, "a")
    job = store.get(job_id)
    assert job.status == "retrying" and job.attempts == 1


def test_queue_full_bounds_queued_plus_retrying(store, add_jobs):
    ids = add_jobs(3, max_queue=3)
    with pytest.raises(QueueFull):
        add_jobs(1, max_queue=3)
    store.claim("s", 1000)  # one leaves the waiting set
    add_jobs(1, max_queue=3)
    with pytest.raises(QueueFull):
        add_jobs(2, max_queue=4)  # all or nothing
    assert store.stats().waiting == 3
    assert len(store.list(limit=100)) == 4 and ids[0] in {j.id for j in store.list()}


def test_batch_enqueue_is_all_or_none(store):
    def boom():
        raise OSError("the uploads could not be moved")

    jobs = [NewJob(f"b{i}", "/in", "x", 1, batch_id="bb") for i in range(3)]
    with pytest.raises(OSError):
        store.enqueue(jobs, 100, 1, before_commit=boom)
    assert store.batch("bb") == [] and store.stats().total == 0
    store.enqueue(jobs, 100, 1)
    assert [j.id for j in store.batch("bb")] == ["b0", "b1", "b2"] and store.stats().total == 3


def test_cancel(store, add_jobs):
    a, b = add_jobs(2)
    store.cancel(a)
    job = store.get(a)
    assert job.status == "cancelled" and job.completed_at is not None
    with pytest.raises(Conflict):
        store.cancel(a)
    with pytest.raises(NotFound):
        store.cancel("nope")
    store.claim("s", 1000)
    with pytest.raises(Conflict):
        store.cancel(b)  # processing
    assert drain(store) == []  # a cancelled job is never claimed


def test_manual_retry(store, add_jobs):
    a, b = add_jobs(2)
    store.claim("s", 1000)
    with pytest.raises(Conflict):
        store.retry(a, 100)  # processing, not failed
    with pytest.raises(NotFound):
        store.retry("nope", 100)
    store.fail(a, "s", ErrorCode.INVALID_IMAGE, "bad", False, POLICY)
    with pytest.raises(QueueFull):
        store.retry(a, 1)  # b already fills a queue of one
    store.retry(a, 100)
    job = store.get(a)
    assert job.status == "queued" and job.attempts == 0 and job.error_code is None and job.completed_at is None
    assert drain(store) == [a, b]  # it keeps its place in arrival order


def test_stats_and_positions(store, add_jobs):
    ids = add_jobs(4)
    urgent = add_jobs(1, priority=9)[0]
    assert store.queue_position(store.get(urgent)) == 1
    assert store.queue_position(store.get(ids[2])) == 4
    job = store.claim("s", 1000)
    store.complete(job.id, "s", make_outcome(100), "/o")
    job = store.claim("s", 1000)
    store.complete(job.id, "s", make_outcome(300), "/o")
    job = store.claim("s", 1000)
    store.fail(job.id, "s", ErrorCode.INVALID_IMAGE, "bad", False, POLICY)
    store.claim("s", 1000)
    s = store.stats()
    assert s.total == 5 and s.completed == 2 and s.failed == 1
    assert s.waiting == 1 and s.processing == 1
    assert s.average_processing_ms == 200
    assert s.completed_24h == 2 and s.failed_24h == 1
    assert s.by_status == {"queued": 1, "processing": 1, "completed": 2, "failed": 1, "retrying": 0, "cancelled": 0}


def test_batch_and_expiry_listing(store, add_jobs):
    ids = add_jobs(3, batch_id="b1")
    add_jobs(1)
    assert [j.id for j in store.batch("b1")] == ids
    job = store.claim("s", 1000)
    store.complete(job.id, "s", make_outcome(), "/o", now=1000)
    assert [j.id for j in store.expired(older_than=2000)] == [job.id]
    assert store.expired(older_than=500) == []
    assert store.delete([job.id, ids[1]]) == 1  # an unfinished job is never deleted
    assert store.known_ids(ids) == set(ids[1:])
    assert store.stats().completed == 1  # the total survives the deletion


def test_list_newest_first_and_by_status(store, add_jobs):
    ids = add_jobs(3)
    store.cancel(ids[1])
    assert [j.id for j in store.list()] == ids[::-1]
    assert [j.id for j in store.list(status="cancelled")] == [ids[1]]
    assert [j.id for j in store.list(limit=1)] == [ids[2]]


def test_enqueue_returns_claim_positions(store):
    assert store.enqueue([NewJob(f"a{i}", "/in", "x", 1) for i in range(3)], 100, 1) == [1, 2, 3]
    assert store.enqueue([NewJob("urgent", "/in", "x", 1, priority=5)], 100, 1) == [1]
    mixed = [NewJob("low", "/in", "x", 1, priority=-1), NewJob("mid", "/in", "x", 1, priority=5)]
    assert store.enqueue(mixed, 100, 1) == [5, 2]  # each at the moment it was inserted
    assert store.queue_position(store.get("a0")) == 3 and store.queue_position(store.get("low")) == 6


def test_supervisor_registry(store):
    store.heartbeat("a", "host1", 10, 1000, {"workers": {"alive": 2}})
    store.heartbeat("b", "host2", 20, 2000, {})
    store.heartbeat("a", "host1", 10, 1000, {"workers": {"alive": 3}})  # refresh, not a second row
    rows = {s.id: s for s in store.supervisors()}
    assert set(rows) == {"a", "b"} and rows["a"].state == {"workers": {"alive": 3}}
    assert rows["a"].hostname == "host1" and rows["a"].pid == 10 and rows["a"].started_at == 1000
    beats = [s.heartbeat_at for s in store.supervisors()]
    assert beats == sorted(beats, reverse=True) and rows["a"].heartbeat_at >= rows["b"].heartbeat_at  # latest first
    store.remove_supervisors(["a"])
    assert [s.id for s in store.supervisors()] == ["b"]


def test_dashboard_reads(store, add_jobs):
    """What /api/dashboard draws: per-minute activity, the queue by priority,
    the latest failures."""
    from imgworker.store import MinuteActivity, PriorityCounts

    add_jobs(2, priority=5)
    add_jobs(1)
    t0 = (now_ms() // 60_000 + 1) * 60_000  # the next whole minute (after the jobs' run_at)
    job = store.claim("s", 10**9, now=t0)
    store.complete(job.id, "s", make_outcome(), "/o", now=t0 + 400)
    job = store.claim("s", 10**9, now=t0 + 60_000)
    store.fail(job.id, "s", ErrorCode.INVALID_IMAGE, "bad", False, POLICY, now=t0 + 60_100)
    assert store.activity(t0) == [MinuteActivity(t0, 1, 0, 400.0), MinuteActivity(t0 + 60_000, 0, 1, None)]
    assert store.activity(t0 + 120_000) == []
    assert store.waiting_by_priority() == [PriorityCounts(0, queued=1)]
    store.claim("s", 10**9, now=t0 + 70_000)
    assert store.waiting_by_priority() == [PriorityCounts(0, processing=1)]
    (failure,) = store.recent_failures(10)
    assert (failure.id, failure.error_code, failure.error, failure.completed_at, failure.attempts) == \
        (job.id, "INVALID_IMAGE", "bad", t0 + 60_100, 1)


def test_attempt_limit_is_read_when_a_failure_is_settled(store, add_jobs):
    """The supervisor's MAX_RETRIES (in the policy) decides at settle time,
    not the limit frozen on the row at enqueue."""
    a, b = add_jobs(2, max_attempts=4)
    job = store.claim("s", 1000)
    assert store.fail(job.id, "s", ErrorCode.TIMEOUT, "slow", True, RetryPolicy(max_attempts=1)).status == "failed"
    assert store.get(a).max_attempts == 1
    job = store.claim("s", 1000)
    assert store.fail(job.id, "s", ErrorCode.TIMEOUT, "slow", True, RetryPolicy()).status == "retrying"  # the row's 4


def test_clients_at_one_priority_take_turns(store, add_jobs):
    """Issue 15 item 8: a client's backlog does not starve another client at
    the same priority (before: b's job waited behind all of a's)."""
    a = add_jobs(4, client="198.51.100.7")
    b = add_jobs(2, client="203.0.113.9")
    c = add_jobs(1, client="2001:db8::/64")
    order = [store.claim("s1", 60_000).id for _ in range(3)]
    assert order == [a[0], b[0], c[0]]  # each client's oldest, one each
    assert store.claim("s1", 60_000).id == a[1]  # all have one running: oldest head
    store.complete(a[0], "s1", make_outcome(), "/out")
    store.complete(a[1], "s1", make_outcome(), "/out")
    assert store.claim("s1", 60_000).id == a[2]  # a has none running now, b and c one each
    store.complete(b[0], "s1", make_outcome(), "/out")
    assert store.claim("s1", 60_000).id == b[1]  # fewer running beats older (a[3])
    urgent = add_jobs(1, priority=3, client="198.51.100.7")
    assert store.claim("s1", 60_000).id == urgent[0]  # priority still comes first, whoever runs most
    assert store.claim("s1", 60_000).id == a[3]
    assert store.claim("s1", 60_000) is None
