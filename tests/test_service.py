"""End to end: a real `imgworker serve` (API + supervisor + pool) on 127.0.0.1."""

from __future__ import annotations

import io
import re
import signal
import time

import pytest
from PIL import Image

import hostile
from helpers import Http, free_port, image_bytes, noisy_jpeg
from conftest import wait_for


@pytest.fixture
def served(service):
    def start(**env):
        port = free_port()
        svc = service("serve", PORT=port, **env)
        http = Http(f"http://127.0.0.1:{port}")
        wait_for(lambda: _health(http) == 200, 20, interval=0.05, message="service healthy")
        return svc, http

    return start


def _health(http):
    try:
        return http.get("/api/health").status
    except OSError:
        return None


def poll(http, job_id, timeout=30):
    return wait_for(lambda: (lambda j: j if j["status"] in ("completed", "failed", "cancelled") else None)(
        http.get(f"/api/job/{job_id}").json), timeout, interval=0.05, message=f"job {job_id} finished")


def test_single_round_trip(served):
    svc, http = served()
    photo = image_bytes("JPEG", (3024, 4032), quality=92)
    r = http.upload(files=[("image", "image.jpg", photo)])
    assert r.status == 202
    job = poll(http, r.json["jobId"])
    assert job["status"] == "completed" and job["attempts"] == 1 and job["completedAt"]
    res = job["result"]
    assert set(res) >= {"success", "processingTime", "originalFile", "processedFile", "optimization"}
    assert res["originalFile"] == {"name": "image.jpg", "size": len(photo), "format": "jpeg",
                                   "dimensions": {"width": 3024, "height": 4032}}
    pf = res["processedFile"]
    assert pf["format"] == "webp" and pf["dimensions"] == {"width": 768, "height": 1024}
    assert set(res["optimization"]) >= {"wasResized", "formatChanged", "compressionRatio", "sizeSaved"}
    img = http.get(pf["url"])
    assert img.status == 200 and len(img.body) == pf["size"]
    assert Image.open(io.BytesIO(img.body)).size == (768, 1024)
    health = http.get("/api/health").json
    assert health["status"] == "ok" and health["workers"]["configured"] == 3


def test_batch_round_trip_with_rejections(served):
    svc, http = served(MAX_CONCURRENT_JOBS=2)
    files = [("images", f"p{i}.png", image_bytes("PNG", (1500 + i, 900))) for i in range(3)]
    files.append(("images", "fake.jpg", b"MZ\x90\x00 not an image"))
    r = http.upload("/api/process/batch", files=files, fields={"format": "jpeg"})
    assert r.status == 202 and len(r.json["jobs"]) == 3 and r.json["rejected"][0]["code"] == "UNSUPPORTED_FORMAT"
    batch_url = f"/api/batch/{r.json['batchId']}"
    batch = wait_for(lambda: (lambda b: b if b["completed"] == 3 else None)(http.get(batch_url).json), 30,
                     interval=0.05)
    assert batch["total"] == 3 and batch["failed"] == 0
    for job in batch["jobs"]:
        out = http.get(job["result"]["processedFile"]["url"])
        im = Image.open(io.BytesIO(out.body))
        assert im.format == "JPEG" and im.width == 1024


def test_corpus_bad_files_through_http(served, corpus):
    svc, http = served()
    pending = {}
    for path in sorted((corpus / "bad").iterdir()):
        r = http.upload(files=[("image", path.name, path.read_bytes())])
        assert r.status in (202, 400, 413, 415, 422), (path.name, r.status)
        if r.status == 202:
            pending[path.name] = r.json["jobId"]
        else:
            assert r.json["code"] in ("UNSUPPORTED_FORMAT", "INVALID_IMAGE", "IMAGE_TOO_LARGE", "NO_FILE")
    for name, job_id in pending.items():  # only a full decode finds these
        job = poll(http, job_id, 20)
        assert job["status"] == "failed" and job["errorCode"] in ("INVALID_IMAGE", "IMAGE_TOO_LARGE"), (name, job)
        assert job["attempts"] == 1  # never retried
    assert http.get("/api/health").status == 200
    assert svc.store.stats().by_status["processing"] == 0


def test_sigterm_stops_everything_cleanly(served):
    svc, http = served()
    job_id = http.upload(files=[("image", "a.jpg", image_bytes("JPEG", (800, 600)))]).json["jobId"]
    poll(http, job_id)
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(timeout=20) == 0
    log = svc.log()
    assert "API stopped" in log and "Supervisor stopped" in log
    with pytest.raises(OSError):
        http.get("/api/health")


def test_metrics_parse_and_move(served):
    from prometheus_client.parser import text_string_to_metric_families

    svc, http = served()

    def scrape():
        r = http.get("/metrics")
        assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain")
        samples = {}
        for family in text_string_to_metric_families(r.body.decode()):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    before = scrape()
    job_id = http.upload(files=[("image", "a.png", image_bytes("PNG", (300, 300)))]).json["jobId"]
    http.upload(files=[("image", "b.png", b"not an image")])
    cut = http.upload(files=[("image", "cut.png", hostile.png_corrupt_deflate())]).json["jobId"]
    poll(http, job_id)
    assert poll(http, cut)["errorCode"] == "INVALID_IMAGE"  # the header passed; the decode did not
    after = wait_for(lambda: (lambda m: m if m.get(("imgworker_processing_seconds_count", ())) == 1
                              and m.get(("imgworker_jobs_failed_by_code_total", (("code", "INVALID_IMAGE"),)))
                              else None)(scrape()), 5, message="supervisor state published")
    assert after[("imgworker_jobs_completed_total", ())] == before[("imgworker_jobs_completed_total", ())] + 1
    assert after[("imgworker_jobs", (("status", "completed"),))] == 1
    assert after[("imgworker_jobs_failed_by_code_total", (("code", "INVALID_IMAGE"),))] == 1
    assert after[("imgworker_rejections_total", (("code", "UNSUPPORTED_FORMAT"),))] == 1
    assert after[("imgworker_upload_bytes_total", ())] > 0
    assert after[("imgworker_workers", (("state", "configured"),))] == 3
    assert after[("imgworker_paused", ())] == 0
    assert ("imgworker_http_request_seconds_count", ()) in after
    assert after[("imgworker_processing_seconds_count", ())] == 1
    assert after[("imgworker_processing_seconds_bucket", (("le", "+Inf"),))] == 1
    assert after[("imgworker_processed_output_bytes_total", ())] > 0
    assert after[("imgworker_processed_input_bytes_total", ())] > after[("imgworker_processed_output_bytes_total", ())]


def test_log_level_is_honoured(served):
    svc, http = served(LOG_LEVEL="warning")
    job_id = http.upload(files=[("image", "a.png", image_bytes("PNG", (64, 64)))]).json["jobId"]
    poll(http, job_id)
    http.upload(files=[("image", "b.png", b"nope")])
    log = svc.log()
    assert "Job started" not in log and "Job completed" not in log and "INFO" not in log
    assert svc.stop() == 0
    svc.log_path.unlink()
    svc2, http2 = served(LOG_LEVEL="info")
    job_id = http2.upload(files=[("image", "a.png", image_bytes("PNG", (64, 64)))]).json["jobId"]
    poll(http2, job_id)
    wait_for(lambda: f"job={job_id} Job completed in" in svc2.log(), 5)
    line = next(l for l in svc2.log().splitlines() if "Job completed" in l)
    assert re.match(r"^\d{4}-\d\d-\d\dT[\d:.]+Z INFO +supervisor job=[0-9a-f-]{36} Job completed in \d+ms$", line)


def test_serve_restarts_a_dead_half(served):
    import psutil

    svc, http = served()
    children = {" ".join(p.cmdline()).rsplit(" ", 1)[-1]: p for p in psutil.Process(svc.proc.pid).children()}
    children["api"].kill()
    wait_for(lambda: not _health(http), 5, message="API down")
    wait_for(lambda: _health(http) == 200, 20, interval=0.1, message="API restarted")
    job_id = http.upload(files=[("image", "a.png", image_bytes("PNG", (64, 64)))]).json["jobId"]
    assert poll(http, job_id)["status"] == "completed"
    assert "The api process exited with code -9; restarting it" in svc.log()


def test_serve_stops_on_configuration_error(service):
    svc = service("serve", PORT=free_port(), MAX_QUEUE_SIZE="lots")
    assert svc.proc.wait(timeout=20) == 2
    assert "MAX_QUEUE_SIZE" in svc.log()


def test_api_sigterm_finishes_the_upload_in_flight(service):
    import socket as _socket

    from helpers import multipart

    port = free_port()
    svc = service("api", PORT=port)
    http = Http(f"http://127.0.0.1:{port}")
    wait_for(lambda: _health(http) is not None, 20, interval=0.05, message="API listening")
    body, ctype = multipart(files=[("image", "a.jpg", image_bytes("JPEG", (400, 300)))])
    with _socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST /api/process/single HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body[:1000])
        time.sleep(0.3)  # the request is in flight when the signal arrives
        svc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        s.sendall(body[1000:])
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 202"), reply[:300]
    assert svc.proc.wait(timeout=15) == 0
    assert svc.store.stats().total == 1
    with pytest.raises(OSError):
        http.get("/api/health")  # no longer listening


def test_port_in_use_is_a_clear_configuration_error(service):
    import socket as _socket

    with _socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        svc = service("serve", PORT=port)
        # a bound on a hang, not a speed test: three interpreters start and stop (slow on a loaded machine)
        assert svc.proc.wait(timeout=90) == 2
    log = svc.log()
    assert f"Cannot listen on HOST=127.0.0.1 PORT={port}" in log and "Traceback" not in log


def test_hup_reloads_both_halves_and_serve_stays_up(served):
    """kill -HUP of serve (the PID a user has) reaches both halves; serve and
    its children stay up with the same PIDs; SIGTERM then stops the tree."""
    import psutil

    svc, http = served()
    before = {p.pid for p in psutil.Process(svc.proc.pid).children()}
    assert len(before) == 2
    (svc.tmp_path / ".env").write_text("MAX_RETRIES=7\nMAX_CONCURENT_JOBS=9\n")
    svc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: svc.log().count("Settings reloaded: MAX_RETRIES 3 -> 7") == 2, 10,
             message="both halves log what changed")
    assert svc.proc.poll() is None and _health(http) == 200
    assert {p.pid for p in psutil.Process(svc.proc.pid).children()} == before
    svc.proc.send_signal(signal.SIGTERM)
    assert svc.proc.wait(timeout=20) == 0
    assert not [pid for pid in before if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_errors_speak_to_users_and_details_go_to_the_log(served):
    """Bug 6: no server path, PID or exception name in an error a client sees;
    the decoder's own words are in the log for the operator."""
    svc, http = served()
    header_only = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64          # refused by the API at once
    corrupt = hostile.png_corrupt_deflate()                     # decoded (and refused) by a worker
    r = http.upload(files=[("image", "header.png", header_only)])
    assert r.status == 422 and r.json["code"] == "INVALID_IMAGE"
    job = poll(http, http.upload(files=[("image", "cut.png", corrupt)]).json["jobId"])
    assert job["status"] == "failed" and job["errorCode"] == "INVALID_IMAGE"
    for text in (r.json["error"], job["error"]):
        assert text.startswith("The PNG file is corrupt")
        assert not re.search(r"/|upload-|Error|\(|'", text), text
    wait_for(lambda: "Failure detail:" in svc.log(), 5, message="worker detail logged")
    log = svc.log()
    assert re.search(r"Refused POST /api/process/single: The PNG file is corrupt.*; probe: stopped at byte", log)


def test_batch_download_is_a_zip_of_the_outputs(served):
    """The page's "Download all": one zip of a batch's outputs, named after
    the originals (duplicates numbered), bytes identical to /api/images."""
    import zipfile

    svc, http = served()
    files = [("images", "cat.jpg", image_bytes("JPEG", (1500, 900))), ("images", "cat.png", image_bytes("PNG", (90, 60))),
             ("images", "../../etc/dog.gif", image_bytes("GIF", (40, 40)))]
    r = http.upload("/api/process/batch", files=files)
    batch = r.json["batchId"]
    wait_for(lambda: http.get(f"/api/batch/{batch}").json["done"], 30, interval=0.05, message="batch done")
    z = http.get(f"/api/batch/{batch}/download")
    assert z.status == 200 and z.getheader("Content-Type") == "application/zip"
    assert "attachment" in z.getheader("Content-Disposition")
    archive = zipfile.ZipFile(io.BytesIO(z.body))
    assert archive.namelist() == ["cat.webp", "cat-1.webp", "dog.webp"]
    jobs = http.get(f"/api/batch/{batch}").json["jobs"]
    for name, job in zip(archive.namelist(), jobs):
        assert archive.read(name) == http.get(job["result"]["processedFile"]["url"]).body
    assert http.get("/api/batch/" + "0" * 32 + "/download").status == 404
    assert http.get("/api/batch/..%2f..%2fetc/download").status == 404



def test_reloaded_max_retries_applies_to_jobs_already_queued(served, tmp_path):
    """Bug 2: a job queued before `kill -HUP` (the API wrote 4 attempts on its
    row) is settled with the reloaded MAX_RETRIES, in every process."""
    (tmp_path / ".env").write_text("MEMORY_PAUSE_PERCENT=0\nMEMORY_RESUME_PERCENT=0\n")  # paused: the job waits
    svc, http = served()
    job_id = http.upload(files=[("image", "slow.jpg", noisy_jpeg())]).json["jobId"]
    assert http.get(f"/api/job/{job_id}").json["maxAttempts"] == 4
    (tmp_path / ".env").write_text("MAX_RETRIES=0\nJOB_TIMEOUT_MS=50\n")  # and the pause ends
    svc.proc.send_signal(signal.SIGHUP)
    job = poll(http, job_id)
    assert job["status"] == "failed" and job["errorCode"] == "TIMEOUT"
    assert job["attempts"] == 1 and job["maxAttempts"] == 1
    log = svc.log()
    assert "Job started processing (attempt 1/1" in log and log.count("MAX_RETRIES 3 -> 0") == 2


def test_uploads_go_when_no_longer_needed_and_ids_are_uuids(served):
    """Bug 9: a completed or cancelled job's upload is deleted at once (only a
    failed job can be retried, so only its upload is kept). Bug 12: job ids
    are standard UUIDs, found in either form; a cancelled job has no
    completedAt (cancelledAt instead)."""
    import uuid

    svc, http = served(MAX_CONCURRENT_JOBS=1)
    done = http.upload(files=[("image", "a.png", image_bytes("PNG", (64, 64)))]).json["jobId"]
    assert str(uuid.UUID(done)) == done
    assert poll(http, done)["status"] == "completed"
    png = image_bytes("PNG", (64, 64))
    broken = poll(http, http.upload(files=[("image", "b.png", hostile.png_corrupt_deflate())]).json["jobId"])
    assert broken["status"] == "failed"
    wait_for(lambda: len(list(svc.storage.uploads.iterdir())) == 1, 5, message="the completed job's upload removed")
    assert http.get(f"/api/job/{done.replace('-', '')}").json["jobId"] == done  # the 32-digit form finds it
    # cancelled: a job waiting behind a slow one (one worker)
    slow = http.upload(files=[("image", "slow.jpg", noisy_jpeg())]).json["jobId"]
    waiting = http.upload(files=[("image", "c.png", png)]).json["jobId"]
    r = http.request("DELETE", f"/api/job/{waiting}")
    assert r.status == 200, r.json
    view = http.get(f"/api/job/{waiting}").json
    assert view["status"] == "cancelled" and view["completedAt"] is None and view["cancelledAt"]
    poll(http, slow)
    wait_for(lambda: len(list(svc.storage.uploads.iterdir())) == 1, 5, message="only the failed job's upload left")
    assert svc.store.get(broken["jobId"]).input_path == str(next(svc.storage.uploads.iterdir()))
