"""The HTTP API on a real Waitress server on 127.0.0.1 (no supervisor here;
the end-to-end round trips with one are in test_service.py)."""

from __future__ import annotations

import os
import re
import socket
import struct
import zlib

import pytest

from helpers import image_bytes
from imgworker.storage import NODE_TAG

JPEG = image_bytes("JPEG", (300, 200))


def leftovers(api):
    """Files in uploads/ and tmp/, and job rows: all must be empty after a refusal."""
    files = [p.name for d in (api.storage.uploads, api.storage.tmp) for p in d.iterdir()]
    return files, api.store.stats().total


def bomb_png(width=30000, height=30000):
    good = image_bytes("PNG", (16, 16))
    chunk = b"IHDR" + struct.pack(">II", width, height) + good[24:29]
    return good[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + good[33:]


def test_single_upload_shape_and_job_view(api_server):
    http, api = api_server()
    r = http.upload(files=[("image", "cat.jpg", JPEG)], fields={"priority": "5", "format": "jpeg", "quality": "70"})
    assert r.status == 202, r.body
    body = r.json
    assert set(body) == {"success", "jobId", "estimatedTime", "queuePosition", "message", "statusUrl"}
    assert body["success"] is True and re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", body["jobId"])
    assert body["statusUrl"] == f"/api/job/{body['jobId']}" and body["estimatedTime"] > 0
    job = http.get(body["statusUrl"]).json
    assert job["status"] == "queued" and job["priority"] == 5 and job["queuePosition"] == 1
    assert job["attempts"] == 0 and job["createdAt"].endswith("Z") and job["startedAt"] is None
    stored = api.store.get(body["jobId"])
    assert stored.options == {"format": "jpeg", "quality": 70}
    assert os.path.basename(stored.input_path) == f"{body['jobId']}-{os.getpid()}.{NODE_TAG}.jpg"  # never the client's name
    assert os.listdir(api.storage.tmp) == []


def test_client_file_name_is_never_a_path(api_server):
    http, api = api_server()
    r = http.upload(files=[("image", "../../../etc/passwd\x00.jpg", JPEG)])
    assert r.status == 202
    job = api.store.get(r.json["jobId"])
    assert job.original_name == "passwd.jpg"
    assert os.path.dirname(job.input_path) == str(api.storage.uploads)


def test_batch_queues_good_files_and_lists_rejected(api_server):
    http, api = api_server()
    files = [("images", "a.jpg", JPEG), ("images", "b.bmp.jpg", image_bytes("BMP")),
             ("images", "c.png", image_bytes("PNG", (50, 50))), ("images", "d.png", b"hello"),
             ("images", "bomb.png", bomb_png())]
    r = http.upload("/api/process/batch", files=files)
    assert r.status == 202, r.body
    body = r.json
    assert set(body) >= {"success", "batchId", "jobs", "rejected", "message"}
    assert [j["filename"] for j in body["jobs"]] == ["a.jpg", "c.png"]
    assert all(set(j) >= {"jobId", "filename", "estimatedTime"} for j in body["jobs"])
    assert [(x["filename"], x["code"]) for x in body["rejected"]] == [
        ("b.bmp.jpg", "UNSUPPORTED_FORMAT"), ("d.png", "UNSUPPORTED_FORMAT"), ("bomb.png", "IMAGE_TOO_LARGE")]
    batch = http.get(f"/api/batch/{body['batchId']}").json
    assert batch["total"] == 2 and batch["queued"] == 2 and batch["completed"] == 0 and len(batch["jobs"]) == 2
    assert len(os.listdir(api.storage.uploads)) == 2 and os.listdir(api.storage.tmp) == []


@pytest.mark.parametrize("fields, files, status, code", [
    ({}, [], 400, "NO_FILE"),
    ({}, [("other", "x.jpg", JPEG)], 400, "INVALID_PARAMETER"),
    ({"priority": "high"}, [("image", "x.jpg", JPEG)], 400, "INVALID_PARAMETER"),
    ({"format": "tiff"}, [("image", "x.jpg", JPEG)], 400, "INVALID_PARAMETER"),
    ({"quality": "0"}, [("image", "x.jpg", JPEG)], 400, "INVALID_PARAMETER"),
    ({"maxWidth": "-5"}, [("image", "x.jpg", JPEG)], 400, "INVALID_PARAMETER"),
    ({}, [("image", "bmp.jpg", image_bytes("BMP"))], 415, "UNSUPPORTED_FORMAT"),
    ({}, [("image", "text.png", b"just some text, not an image")], 415, "UNSUPPORTED_FORMAT"),
    ({}, [("image", "cut.jpg", image_bytes("JPEG", (400, 400))[:300])], 422, "INVALID_IMAGE"),
    ({}, [("image", "empty.jpg", b"")], 422, "INVALID_IMAGE"),
    ({}, [("image", "bomb.png", bomb_png())], 422, "IMAGE_TOO_LARGE"),
])
def test_refusals_leave_nothing_behind(api_server, fields, files, status, code):
    http, api = api_server()
    r = http.upload(files=files, fields=fields)
    assert r.status == status, r.body
    assert r.json["success"] is False and r.json["code"] == code and r.json["error"]
    assert "Traceback" not in r.body.decode()
    if code == "INVALID_PARAMETER":
        named = next(iter(fields)) if fields else files[0][0]
        assert f"'{named}'" in r.json["error"]  # names the field
    assert leftovers(api) == ([], 0)


def test_not_multipart_is_no_file(api_server):
    http, api = api_server()
    r = http.request("POST", "/api/process/single", JPEG, {"Content-Type": "image/jpeg"})
    assert r.status == 400 and r.json["code"] == "NO_FILE"
    r = http.request("POST", "/api/process/single", b"--x\r\ngarbage", {"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status == 400 and r.json["code"] == "INVALID_PARAMETER"
    assert leftovers(api) == ([], 0)


def test_413_from_content_length_before_the_body_is_read(api_server):
    http, api = api_server(MAX_FILE_SIZE_MB=1)
    with socket.create_connection((http.host, http.port), timeout=5) as s:
        s.sendall(b"POST /api/process/single HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Content-Length: 104857600\r\n\r\n")  # 100 MB announced, none sent
        reply = b""
        while chunk := s.recv(65536):  # the server closes the connection after its answer
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 413")
    assert '"code": "FILE_TOO_LARGE"' in reply and "X-Content-Type-Options: nosniff" in reply
    assert leftovers(api) == ([], 0)


def test_oversized_file_inside_batch_is_refused_alone(api_server):
    http, api = api_server(MAX_FILE_SIZE_MB=0.05)  # 51 KB
    big = image_bytes("PNG", (400, 400), mode="RGB", color=None) + os.urandom(60_000)
    r = http.upload("/api/process/batch", files=[("images", "big.png", big), ("images", "ok.jpg", JPEG)])
    assert r.status == 202, r.body
    assert [x["code"] for x in r.json["rejected"]] == ["FILE_TOO_LARGE"]
    assert len(r.json["jobs"]) == 1
    r = http.upload(files=[("image", "big.png", big)])
    assert r.status == 413 and r.json["code"] == "FILE_TOO_LARGE"
    assert len(os.listdir(api.storage.uploads)) == 1 and os.listdir(api.storage.tmp) == []


def test_404_405_409(api_server):
    http, api = api_server()
    assert http.get("/api/job/" + "0" * 32).status == 404
    assert http.get("/api/job/not-an-id").json["code"] == "NOT_FOUND"
    assert http.get("/api/batch/" + "1" * 32).status == 404
    r = http.get("/nope")
    assert r.status == 404 and r.json["code"] == "NOT_FOUND"
    r = http.request("PUT", "/api/stats", b"")
    assert r.status == 405 and r.json["code"] == "METHOD_NOT_ALLOWED"
    job_id = http.upload(files=[("image", "x.jpg", JPEG)]).json["jobId"]
    r = http.request("POST", f"/api/job/{job_id}/retry")
    assert r.status == 409 and r.json["code"] == "CONFLICT"  # queued, not failed
    r = http.request("DELETE", f"/api/job/{job_id}")
    assert r.status == 200 and r.json == {"success": True, "jobId": job_id, "status": "cancelled"}
    r = http.request("DELETE", f"/api/job/{job_id}")
    assert r.status == 409 and r.json["code"] == "CONFLICT"


def test_queue_full_503_with_retry_after(api_server):
    http, api = api_server(MAX_QUEUE_SIZE=1)
    assert http.upload(files=[("image", "a.jpg", JPEG)]).status == 202
    r = http.upload(files=[("image", "b.jpg", JPEG)])
    assert r.status == 503 and r.json["code"] == "QUEUE_FULL" and int(r.getheader("Retry-After")) >= 1
    assert leftovers(api) == ([os.listdir(api.storage.uploads)[0]], 1)  # only the first job's upload


def test_rate_limit_counts_posts_only(api_server):
    http, api = api_server(RATE_LIMIT_MAX_REQUESTS=2)
    first = http.upload(files=[("image", "a.jpg", JPEG)])
    assert first.status == 202 and first.getheader("RateLimit-Limit") == "2"
    assert first.getheader("RateLimit-Remaining") == "1"
    for _ in range(20):  # polling never counts
        assert http.get(first.json["statusUrl"]).status == 200
        assert http.get("/api/health").status in (200, 503)
    assert http.upload(files=[("image", "b.jpg", JPEG)]).status == 202
    r = http.upload(files=[("image", "c.jpg", JPEG)])
    assert r.status == 429 and r.json["code"] == "RATE_LIMITED"
    assert int(r.getheader("Retry-After")) > 0 and r.getheader("RateLimit-Remaining") == "0"
    assert api.store.stats().total == 2 and os.listdir(api.storage.tmp) == []


def test_forwarded_for_only_with_trust_proxy(api_server):
    http, _ = api_server(RATE_LIMIT_MAX_REQUESTS=1)
    assert http.upload(files=[("image", "a.jpg", JPEG)], headers={"X-Forwarded-For": "1.1.1.1"}).status == 202
    assert http.upload(files=[("image", "a.jpg", JPEG)], headers={"X-Forwarded-For": "2.2.2.2"}).status == 429
    http, _ = api_server(RATE_LIMIT_MAX_REQUESTS=1, TRUST_PROXY="true")
    assert http.upload(files=[("image", "a.jpg", JPEG)], headers={"X-Forwarded-For": "1.1.1.1"}).status == 202
    assert http.upload(files=[("image", "a.jpg", JPEG)], headers={"X-Forwarded-For": "2.2.2.2"}).status == 202


TRAVERSALS = [
    "../imgworker.db", "..%2Fimgworker.db", "..%2fimgworker.db", "%2e%2e%2fimgworker.db", "%2e%2e/%2e%2e/etc/passwd",
    "..%5Cimgworker.db", "%2Fetc%2Fpasswd", "/etc/passwd", "..", "%2e%2e", "processed_x.webp%00.png",
    "%00", "processed_%2e%2e.webp", "....//....//etc/passwd", "..%252f..%252fetc%252fpasswd",
    "%c0%ae%c0%ae%c0%afetc%c0%afpasswd", "uploads%2F", "processed_" + "a" * 32 + ".webp/../../imgworker.db",
    "processed_" + "a" * 32 + ".exe", ".tmp-abc", "processed_" + "A" * 32 + ".webp",
]


def test_traversal_attempts_all_404(api_server):
    http, api = api_server()
    target = api.storage.processed / ("processed_" + "b" * 32 + ".webp")
    target.symlink_to("/etc/passwd")
    (api.storage.processed / ".tmp-abc").write_bytes(b"partial")
    paths = [f"/api/images/{t}" for t in TRAVERSALS] + [f"/api/images/{target.name}"]
    for path in paths:
        r = http.get(path)
        assert r.status == 404, (path, r.status)
        assert b"root:" not in r.body


def test_image_serving_etag_304_head(api_server):
    http, api = api_server()
    name = "processed_" + "c" * 32 + ".webp"
    (api.storage.processed / name).write_bytes(image_bytes("WEBP"))
    r = http.get(f"/api/images/{name}")
    assert r.status == 200 and r.getheader("Content-Type") == "image/webp" and r.body[:4] == b"RIFF"
    assert r.getheader("Cache-Control") == "public, max-age=31536000, immutable"
    assert r.getheader("Cross-Origin-Resource-Policy") == "cross-origin"
    etag = r.getheader("ETag")
    assert etag
    r2 = http.get(f"/api/images/{name}", **{"If-None-Match": etag})
    assert r2.status == 304 and r2.body == b""
    head = http.request("HEAD", f"/api/images/{name}")
    assert head.status == 200 and head.body == b"" and int(head.getheader("Content-Length")) == len(r.body)


def test_security_headers_everywhere(api_server):
    http, _ = api_server(APP_ENV="production")
    for r in (http.get("/api/stats"), http.get("/nope"), http.upload(files=[])):
        assert r.getheader("X-Content-Type-Options") == "nosniff"
        assert r.getheader("X-Frame-Options") == "DENY"
        assert "default-src 'self'" in r.getheader("Content-Security-Policy")
        assert r.getheader("Referrer-Policy") == "no-referrer"
        assert r.getheader("Cross-Origin-Resource-Policy") == "same-origin"
        assert "max-age" in r.getheader("Strict-Transport-Security")
    http, _ = api_server()
    assert http.get("/api/stats").getheader("Strict-Transport-Security") is None


def test_cors_preflight_for_configured_origin_only(api_server):
    http, _ = api_server(CORS_ORIGINS="https://app.example.com,https://www.example.com")
    pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = http.request("OPTIONS", "/api/process/single", headers={"Origin": "https://app.example.com", **pre})
    assert ok.status == 204 and ok.getheader("Access-Control-Allow-Origin") == "https://app.example.com"
    assert "POST" in ok.getheader("Access-Control-Allow-Methods")
    bad = http.request("OPTIONS", "/api/process/single", headers={"Origin": "https://evil.example", **pre})
    assert bad.status == 403 and bad.getheader("Access-Control-Allow-Origin") is None
    r = http.get("/api/stats", Origin="https://www.example.com")
    assert r.getheader("Access-Control-Allow-Origin") == "https://www.example.com"
    assert http.get("/api/stats", Origin="https://evil.example").getheader("Access-Control-Allow-Origin") is None


def test_health_503_without_supervisor_and_stats_shape(api_server):
    http, api = api_server()
    r = http.get("/api/health")
    assert r.status == 503 and r.json["status"] != "ok" and "supervisor" in r.json["reason"]
    api.store.heartbeat("sup-1", socket.gethostname(), os.getpid(), 0,
                        {"paused": True, "pauseReason": "memory", "workers": {"configured": 2, "alive": 2, "busy": 1}})
    r = http.get("/api/health")
    assert r.status == 200 and r.json["status"] == "ok" and r.json["paused"] is True
    stats = http.get("/api/stats").json
    for key in ("totalJobs", "completedJobs", "failedJobs", "currentQueueSize", "currentProcessingCount",
                "averageProcessingTime", "completedInLast24h", "failedInLast24h", "workers", "paused",
                "pauseReason", "memory", "uptime"):
        assert key in stats
    assert stats["workers"] == {"configured": 2, "alive": 2, "busy": 1} and stats["paused"] is True


def test_health_degraded_when_no_worker_is_alive(api_server):
    http, api = api_server()
    state = {"workers": {"configured": 2, "alive": 0, "busy": 0}, "bootFailures": 2,
             "lastBootError": "worker 123 exited with code 1 before it was ready"}
    api.store.heartbeat("sup-1", socket.gethostname(), os.getpid(), 0, state)
    r = http.get("/api/health")
    assert r.status == 503 and r.json["status"] == "degraded" and r.json["workers"]["alive"] == 0
    assert "no worker process is alive" in r.json["reason"] and "exited with code 1" in r.json["reason"]
    api.store.heartbeat("sup-1", socket.gethostname(), os.getpid(), 0, {**state, "workers": {"configured": 2, "alive": 1, "busy": 0}})
    assert http.get("/api/health").status == 200


def test_openapi_matches_routes(api_server):
    http, api = api_server()
    doc = http.get("/api/openapi.json").json
    assert doc["openapi"].startswith("3.")
    routes = {}
    for route in api.app.routes:
        path = re.sub(r"<(\w+)>", r"{\1}", route.rule).replace("{job_id}", "{jobId}").replace("{batch_id}", "{batchId}")
        if path.startswith("/static/"):
            continue
        routes.setdefault(path, set()).add(route.method.lower())
    assert set(routes) == set(doc["paths"])
    for path, methods in routes.items():
        documented = {m for m in doc["paths"][path] if m != "parameters"}
        assert methods - {"head"} == documented, path


def test_health_503_when_the_database_fails(api_server):
    http, api = api_server()
    api.store.heartbeat("sup-1", socket.gethostname(), os.getpid(), 0, {"workers": {"alive": 1}})
    assert http.get("/api/health").status == 200
    api.store.conn.execute("DROP TABLE supervisors")  # the database no longer answers the query
    r = http.get("/api/health")
    assert r.status == 503 and r.json["status"] == "unavailable" and "database" in r.json["reason"]
    assert "Traceback" not in r.body.decode()


def test_batch_larger_than_the_room_left_keeps_what_fits(api_server):
    """Bug 8: a batch larger than the free queue is not a 503 that no retry
    can cure: what fits is queued, the rest listed under rejected (QUEUE_FULL)."""
    http, api = api_server(MAX_QUEUE_SIZE=3)
    files = [("images", f"f{i}.png", image_bytes("PNG", (20 + i, 20))) for i in range(5)]
    r = http.upload("/api/process/batch", files=files)
    assert r.status == 202, r.json
    assert [j["filename"] for j in r.json["jobs"]] == ["f0.png", "f1.png", "f2.png"]
    assert [(x["filename"], x["code"], x["index"]) for x in r.json["rejected"]] == [
        ("f3.png", "QUEUE_FULL", 3), ("f4.png", "QUEUE_FULL", 4)]
    assert "room for 3 of the 5" in r.json["rejected"][0]["error"]
    assert not list(api.storage.tmp.iterdir()) and len(list(api.storage.uploads.iterdir())) == 3
    r = http.upload("/api/process/batch", files=files[:2])  # no room at all: 503 with Retry-After
    assert r.status == 503 and r.json["code"] == "QUEUE_FULL" and r.getheader("Retry-After")
    assert not list(api.storage.tmp.iterdir()) and len(list(api.storage.uploads.iterdir())) == 3


def test_option_ranges_are_the_ones_documented(api_server):
    """The validator and the OpenAPI document read the same ranges."""
    http, api = api_server()
    doc = http.get("/api/openapi.json").json
    props = doc["paths"]["/api/process/single"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    for name in ("priority", "quality", "maxWidth", "maxHeight"):
        lo, hi = props["properties"][name]["minimum"], props["properties"][name]["maximum"]
        for bad in (lo - 1, hi + 1):
            r = http.upload(files=[("image", "a.jpg", JPEG)], fields={name: str(bad)})
            assert r.status == 400 and r.json["code"] == "INVALID_PARAMETER" and f"from {lo} to {hi}" in r.json["error"]
    r = http.upload(files=[("image", "a.jpg", JPEG)], fields={"quality": str(props["properties"]["quality"]["maximum"])})
    assert r.status == 202


def test_version_comes_from_the_package(api_server):
    import tomllib
    from pathlib import Path

    import imgworker

    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    http, api = api_server()
    assert http.get("/api/openapi.json").json["info"]["version"] == imgworker.__version__ == pyproject["project"]["version"]
