"""Housekeeping: the one owner of what outlives its use. It composes the job
store (rows only) and the storage (files only), which never reach into each
other.

- :meth:`Housekeeper.cleanup`: finished jobs older than the retention go,
  rows and files; orphan files (temp files, uploads and outputs without a
  job row) older than ORPHAN_AGE_S go.
- :meth:`Housekeeper.sweep_dead`: files of processes that died mid-upload go
  at once, whatever their age; at the API's start also the uploads of
  finished jobs that a crash left behind.
- :func:`retry_failed`: the manual retry of a failed job, which needs its
  upload: the file is checked here, before the store's write transaction.
"""

from __future__ import annotations

import os

from . import log
from .clock import now_ms
from .errors import Conflict, NotFound
from .model import JobStatus
from .storage import Storage
from .store import JobStore

LOG = log.get("cleanup")
ORPHAN_AGE_S = 15 * 60  # older than any upload in flight or job being written


class Housekeeper:
    def __init__(self, store: JobStore, storage: Storage):
        self.store = store
        self.storage = storage

    def cleanup(self, retention_ms: int, now: int | None = None) -> dict[str, int]:
        """Remove expired jobs with their files, and orphan files. Returns counts."""
        now = now_ms() if now is None else now
        removed_jobs = removed_files = 0
        while expired := self.store.expired(older_than=now - retention_ms):
            for job in expired:
                removed_files += self.storage.remove_job_files(job.input_path, job.output_path)
            removed_jobs += self.store.delete([job.id for job in expired])
        cutoff_s = now / 1000 - ORPHAN_AGE_S
        removed_files += self.sweep_dead()
        removed_files += self.storage.remove_old_temp_files(cutoff_s) + self.storage.remove_old_partials(cutoff_s)
        removed_files += self._remove_unknown(self.storage.old_job_files(cutoff_s))
        if removed_jobs or removed_files:
            LOG.info("Cleanup removed %d expired jobs and %d files", removed_jobs, removed_files)
        return {"jobs": removed_jobs, "files": removed_files}

    def sweep_dead(self, finished: bool = False) -> int:
        """Delete temp uploads of dead processes, and their uploads whose
        job row never committed. With ``finished`` (the API's start, after a
        crash of the tree) also their uploads whose job is completed or
        cancelled: a crash between the supervisor's commit and its removal of
        the upload leaves one, needed by nothing (only failed jobs are
        retried); one row read each. Returns files removed."""
        by_job = self.storage.uploads_of_dead_processes()
        removed = self.storage.remove_dead_temp_uploads() + self._remove_unknown(by_job)
        if finished:
            for job_id, paths in by_job.items():
                job = self.store.get(job_id)
                if job is not None and job.status in (JobStatus.COMPLETED, JobStatus.CANCELLED):
                    removed += self.storage.remove(paths)
        return removed

    def _remove_unknown(self, by_job: dict[str, list]) -> int:
        if not by_job:
            return 0
        known = self.store.known_ids(by_job)
        return sum(self.storage.remove(paths) for job_id, paths in by_job.items() if job_id not in known)


def retry_failed(store: JobStore, job_id: str, max_queue_size: int) -> None:
    """Send a failed job back to the queue (NotFound / Conflict / QueueFull).
    Its upload must still exist: checked here, outside the write transaction."""
    job = store.get(job_id)
    if job is None:
        raise NotFound(f"Job {job_id} not found")
    if job.status == JobStatus.FAILED and not os.path.exists(job.input_path):
        raise Conflict(f"Job {job_id} can no longer be retried: its upload is gone")
    store.retry(job_id, max_queue_size)
