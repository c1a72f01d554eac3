"""Faults of the supervisor's surroundings (issue 15, items 7, 13, 14), in
process: the pool's fake workers and fake clock (test_pool.py), a real
SQLite file, and a second real connection that holds the database's write
lock as a `sqlite3` shell would."""

from __future__ import annotations

import sqlite3

from imgworker.model import JobStatus
from test_pool import live, ready_all, rig, settle, submit  # noqa: F401  (rig is a fixture)


def test_a_stalled_supervisor_reads_a_finished_job_before_judging_its_timeout(rig):
    """Item 14: the supervisor was paused (SIGSTOP) past JOB_TIMEOUT_MS while
    its worker finished: the answer waiting in the socket wins over the
    timeout (before: TIMEOUT, the job ran again)."""
    sup, procs, clock = rig(JOB_TIMEOUT_MS=1000)
    ready_all(sup, procs)
    (job_id,) = submit(sup)
    settle(sup)
    (w,) = live(procs)
    job = w.take_job()
    w.answer(job)          # the worker finished in time ...
    clock.advance(5.0)     # ... but the supervisor only wakes up 5 s later
    sup.step()             # the turn after the stall judges timeouts first
    done = sup.store.get(job_id)
    assert done.status == JobStatus.COMPLETED and done.attempts == 1 and done.error_code is None
    assert sup.counters.timeouts == 0 and procs.signals == []
    assert live(procs) == [w]  # and its worker was not killed


def test_a_job_that_times_out_twice_in_a_row_is_not_retried_again(rig):
    """Item 7: a timeout on the same input is not transient the second time
    (before: retried until MAX_RETRIES, each attempt holding a worker for
    JOB_TIMEOUT_MS)."""
    sup, procs, clock = rig(JOB_TIMEOUT_MS=1000, RETRY_BASE_DELAY_MS=1, RETRY_MAX_DELAY_MS=1)
    ready_all(sup, procs)
    (job_id,) = submit(sup)  # max_attempts 4
    for attempt in (1, 2):
        settle(sup)
        ready_all(sup, procs)  # the replacement of the worker killed last time
        (w,) = live(procs)
        assert w.take_job()["id"] == job_id
        clock.advance(1.0)
        sup.step()
        job = sup.store.get(job_id)
        assert job.attempts == attempt and job.error_code == "TIMEOUT"
        if attempt == 1:
            assert job.status == JobStatus.RETRYING
    assert job.status == JobStatus.FAILED and "two attempts in a row" in job.error
    assert sup.counters.timeouts == 2 and sup.counters.failed_by_code == {"TIMEOUT": 1}
