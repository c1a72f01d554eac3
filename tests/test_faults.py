"""Failing disks (issue 15 item 12): an unwritable data directory is an
I/O error, transient on both sides. Jobs wait and retry with backoff instead
of failing as PROCESSING_ERROR; uploads get 503 with Retry-After instead of
500; /api/health says degraded and why; all recovers when the disk does."""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from conftest import wait_for
from helpers import image_bytes
from imgworker.errors import ImageError
from imgworker.imaging import write_atomic
from imgworker.storage import Storage
from test_service import poll, served  # noqa: F401  (fixture)


@contextlib.contextmanager
def unwritable(folder):
    """No file can be created in ``folder`` while inside: chattr +i as root
    (which ignores permission bits), chmod 555 otherwise. Skips the test
    when neither works here."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available (root ignores permissions)")
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
        undo = None
    try:
        yield
    finally:
        if undo:
            subprocess.run(undo, check=True)
        else:
            folder.chmod(0o755)


def test_write_atomic_maps_an_unwritable_directory_to_a_transient_io_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with unwritable(out):
        with pytest.raises(ImageError) as err:
            write_atomic(out / "processed_x.webp", b"data")
    assert err.value.code == "IO_ERROR" and err.value.transient
    assert list(out.iterdir()) == []


def test_storage_reports_what_cannot_be_written(tmp_path):
    storage = Storage(tmp_path / "data")
    storage.ensure()
    assert storage.unwritable() == []
    with unwritable(storage.processed):
        problems = storage.unwritable()
    assert len(problems) == 1 and problems[0].startswith("processed/: ")
    assert storage.unwritable() == [] and list(storage.processed.iterdir()) == []


def test_unwritable_output_directory_jobs_wait_and_health_says_why(served):
    svc, http = served(RETRY_BASE_DELAY_MS=100, RETRY_MAX_DELAY_MS=300, MAX_RETRIES=2)
    with unwritable(svc.storage.processed):
        job_id = http.upload(files=[("image", "a.png", image_bytes("PNG", (200, 100)))]).json["jobId"]
        job = wait_for(lambda: (lambda j: j if j["attempts"] >= 1 and j["status"] != "processing" else None)(
            http.get(f"/api/job/{job_id}").json), 20, 0.05, "first attempt settled")
        assert job["status"] in ("retrying", "queued"), job  # not failed with PROCESSING_ERROR
        # health checks the directories at most every 2 s
        health = wait_for(lambda: (lambda r: r if r.status == 503 else None)(http.get("/api/health")), 5, 0.1,
                          "health degraded")
        assert health.json["status"] == "degraded"
        assert "processed/" in health.json["reason"] and health.json["storage"]
        # the supervisor holds the job back while the disk cannot take it: its retries are not spent
        wait_for(lambda: "Paused claiming jobs: data directory not writable" in svc.log(), 10, 0.05, "pause logged")
        attempts = http.get(f"/api/job/{job_id}").json["attempts"]
        assert attempts <= 2 and http.get(f"/api/job/{job_id}").json["status"] != "failed"
    job = poll(http, job_id)
    assert job["status"] == "completed", job
    wait_for(lambda: http.get("/api/health").status == 200, 10, 0.05, "healthy again")


def test_upload_that_cannot_be_stored_gets_503_with_retry_after(served):
    svc, http = served()
    with unwritable(svc.storage.tmp):
        r = http.upload(files=[("image", "a.png", image_bytes("PNG", (40, 40)))])
        assert r.status == 503 and r.json["code"] == "STORAGE_UNAVAILABLE" and int(r.getheader("Retry-After")) > 0
        assert "tmp" not in r.json["error"] and "/" not in r.json["error"]  # no server paths for clients
        health = wait_for(lambda: (lambda r: r if r.status == 503 else None)(http.get("/api/health")), 5, 0.1,
                          "health degraded")
        assert "tmp/" in health.json["reason"]
        # while it lasts, uploads are refused from their headers (nothing read)
        r = http.upload(files=[("image", "b.png", image_bytes("PNG", (40, 40)))])
        assert r.status == 503 and r.json["code"] == "STORAGE_UNAVAILABLE"
    # recovers on its own once the directory is writable (admission rechecks)
    r = wait_for(lambda: (lambda r: r if r.status == 202 else None)(
        http.upload(files=[("image", "c.png", image_bytes("PNG", (40, 40)))])), 10, 0.2, "uploads accepted again")
    assert poll(http, r.json["jobId"])["status"] == "completed"
    assert svc.store.stats().total == 1  # the refused uploads left no row
