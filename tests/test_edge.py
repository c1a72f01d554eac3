"""The HTTP edge against hostile clients (issue 15 items 2-6 and the priority
cap), on a real Waitress server on 127.0.0.1. The slow-connection suite is
in test_suites.py (it needs a server process of its own)."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import socket
import time

from helpers import image_bytes, multipart

from imgworker import log as log_mod

JPEG = image_bytes("JPEG", (64, 48))


def reply_of(s: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """Read one response (until the server closes or the body is complete)."""
    s.settimeout(timeout)
    data = b""
    try:
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if m and len(body) >= int(m.group(1)):
                    break
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1]) if lines[0].startswith("HTTP/") else 0
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(raw)
        return reply_of(s)


def send_until_answered(port: int, head: bytes, piece: bytes, most: int) -> tuple[int, int, dict]:
    """Send ``head`` then ``piece`` repeatedly (up to ``most`` bytes) until the
    server answers; (bytes of body sent, status, json). The sent count
    includes what the kernel buffered: an upper bound of what the server read."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head)
        try:
            while sent < most:
                if select.select([s], [], [], 0)[0]:
                    break
                s.sendall(piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, _, body = reply_of(s)
    return sent, status, json.loads(body) if body else {}


def post_head(path: str, length: int | None, ctype: str = "multipart/form-data; boundary=b", extra: str = "") -> bytes:
    framing = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n{framing}{extra}\r\n".encode()


# -- item 6: errors Waitress writes itself ----------------------------------------------------
def test_waitress_errors_are_json_with_security_headers(api_server):
    http, _ = api_server()
    cases = {
        "bad_request_line": (b"GARBAGE\r\n\r\n", 400),
        "duplicate_length": (b"POST /api/process/single HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                             b"Content-Length: 5\r\n\r\nhello", 400),
        "negative_length": (b"POST /api/process/single HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
        "headers_too_large": (b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", 431),
        "bad_transfer_encoding": (b"POST /api/process/single HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        "bad_chunk": (b"POST /api/process/single HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
    }
    for name, (raw, want) in cases.items():
        status, headers, body = exchange(http.port, raw)
        assert status == want, (name, status, body[:200])
        assert headers["content-type"] == "application/json", name
        doc = json.loads(body)
        assert doc["success"] is False and doc["code"] and doc["error"], name
        assert headers["x-content-type-options"] == "nosniff" and "content-security-policy" in headers, name
        assert headers["x-frame-options"] == "DENY" and headers["connection"] == "close", name


# -- item 2: body limits hold while reading, chunked or not; no-body routes take none -------
def test_routes_without_a_body_refuse_one_from_the_headers(api_server):
    http, api = api_server()
    for raw in (b"GET /api/health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"GET /api/stats HTTP/1.1\r\nHost: x\r\nContent-Length: 400000000\r\n\r\n",
                b"POST /api/job/" + b"a" * 32 + b"/retry HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"):
        status, headers, body = exchange(http.port, raw)  # no body byte sent: decided on the headers
        assert status == 413 and json.loads(body)["code"] == "BODY_NOT_ALLOWED", body
    assert http.get("/api/health").status in (200, 503)  # a plain GET is untouched


def test_chunked_upload_is_cut_at_the_route_limit(api_server):
    http, api = api_server(MAX_FILE_SIZE_MB=1)
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"  # 64 KiB chunks, never ending
    limit = api.cfg.max_file_bytes + 64 * 1024
    sent, status, doc = send_until_answered(http.port, post_head("/api/process/single", None), chunk, 40 * 2**20)
    assert status == 413 and doc["code"] == "FILE_TOO_LARGE"
    # answered within the limit plus what the socket buffers hold, not at the 20-file batch limit
    assert sent < limit + 8 * 2**20, sent
    # no temp file left: the body was not handed to the app
    assert os.listdir(api.storage.tmp) == []
    body, ctype = multipart(files=[("image", "a.jpg", JPEG)])
    framed = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    status, _, reply = exchange(http.port, post_head("/api/process/single", None, ctype) + framed)
    assert status == 202, reply  # an honest chunked upload still works


def test_low_disk_refuses_uploads_from_the_headers(api_server):
    http, api = api_server(MIN_FREE_DISK_MB=10**9)
    status, headers, body = exchange(http.port, post_head("/api/process/single", 5_000_000))  # no body sent
    assert status == 507 and json.loads(body)["code"] == "INSUFFICIENT_STORAGE"
    assert int(headers["retry-after"]) > 0
    assert http.get("/api/health").status in (200, 503)  # reads still work
    assert api.store.stats().total == 0 and os.listdir(api.storage.tmp) == []


# -- item 3: the rate limit counts files and refuses from the headers ----------------------
def test_rate_limit_counts_files_and_refuses_from_headers(api_server):
    http, api = api_server(RATE_LIMIT_MAX_REQUESTS=3)
    files = [("images", f"{i}.jpg", JPEG) for i in range(5)]
    r = http.upload("/api/process/batch", files=files)
    assert r.status == 202 and len(r.json["jobs"]) == 3
    assert [x["code"] for x in r.json["rejected"]] == ["RATE_LIMITED"] * 2
    assert api.store.stats().total == 3 and os.listdir(api.storage.tmp) == []
    # over the limit: 429 on the headers, with 100 MB announced and none sent
    status, headers, body = exchange(http.port, post_head("/api/process/batch", 100 * 2**20))
    assert status == 429 and json.loads(body)["code"] == "RATE_LIMITED"
    assert int(headers["retry-after"]) > 0 and headers["ratelimit-remaining"] == "0"


# -- item 4: bounded metric labels -------------------------------------------------------------
def test_made_up_methods_collapse_into_one_label(api_server):
    http, _ = api_server()
    for i in range(40):
        assert http.request(f"X{i}METHOD", "/api/health").status == 405
    text = http.get("/metrics").body.decode()
    methods = set(re.findall(r'imgworker_http_requests_total\{method="([^"]*)"', text))
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other"}
    assert "other" in methods


# -- item 5: log forging -------------------------------------------------------------------------
FORGED = "2026-01-01T00:00:00.000Z ERROR   api forged"


def test_request_data_cannot_forge_a_log_line(service):
    from helpers import Http, free_port

    port = free_port()
    svc = service("api", PORT=port)
    http = Http(f"http://127.0.0.1:{port}")
    from conftest import wait_for

    wait_for(lambda: _answers(http), 20, 0.05, "API up")
    forged = FORGED.replace(" ", "%20")
    assert http.get(f"/api/job/x%0a{forged}").status == 404
    assert http.get(f"/api/job/x%0d%0a{forged}%e2%80%a8x%1b[2J").status == 404
    svc.stop()
    lines = svc.log().splitlines()
    assert not [line for line in lines if line.startswith(FORGED[:24])]
    assert any("\\n2026-01-01" in line for line in lines)  # logged, escaped


def _answers(http) -> bool:
    try:
        return http.get("/api/health").status in (200, 503)
    except OSError:
        return False


def test_formatters_escape_and_json_lines():
    record = logging.LogRecord("imgworker.api", logging.WARNING, __file__, 1, "Refused %s", ("a\nb\r\x1b\u2028c",), None)
    text = log_mod._TextFormatter().format(record)
    assert "\n" not in text and "a\\nb\\r\\x1b\\u2028c" in text
    try:
        raise ValueError("boom\n" + FORGED)
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    text = log_mod._TextFormatter().format(record)
    assert all(line.startswith("| ") for line in text.splitlines()[1:])
    doc = json.loads(log_mod._JsonFormatter().format(record))
    assert doc["message"] == "Refused a\nb\r\x1b\u2028c" and doc["level"] == "WARNING" and "boom" in doc["exception"]


# -- item 8 (part): the priority an anonymous client may set is capped -----------------------
def test_client_priority_is_capped(api_server):
    http, api = api_server(MAX_CLIENT_PRIORITY=5)
    high = http.upload(files=[("image", "a.jpg", JPEG)], fields={"priority": "1000"})
    low = http.upload(files=[("image", "b.jpg", JPEG)], fields={"priority": "-7"})
    assert high.status == 202 and low.status == 202
    assert http.get(high.json["statusUrl"]).json["priority"] == 5
    assert http.get(low.json["statusUrl"]).json["priority"] == -7
    assert api.store.get(high.json["jobId"]).priority == 5


def test_default_priority_cap_is_documented_default(api_server):
    http, api = api_server()
    r = http.upload(files=[("image", "a.jpg", JPEG)], fields={"priority": "1000"})
    assert http.get(r.json["statusUrl"]).json["priority"] == api.cfg.max_client_priority == 10


# -- item 1: deadlines and connection limits (the latency suite is in test_suites.py) ---------
def trickle(port: int, head: bytes, drip: bytes, every: float, within: float) -> tuple[int, float, dict]:
    """Send ``head`` then one byte of ``drip`` every ``every`` s until the
    server answers or closes; (status, seconds until then, json)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head)
        for i in range(int(within / every)):
            if select.select([s], [], [], every)[0]:
                break
            try:
                s.sendall(drip[i % len(drip):i % len(drip) + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
        status, _, body = reply_of(s)
    return status, time.monotonic() - started, json.loads(body) if body else {}


def test_slow_headers_and_slow_bodies_are_cut_off(api_server):
    http, _ = api_server(HEADER_TIMEOUT_MS=600, BODY_MIN_BYTES_PER_S=1000)
    status, took, doc = trickle(http.port, b"GET /api/health HTTP/1.1\r\n", b"X-Slow: aaaaaaaa\r\n", 0.1, 10)
    assert status == 408 and doc["code"] == "REQUEST_TIMEOUT" and took < 3, (status, took)
    status, took, doc = trickle(http.port, post_head("/api/process/single", 10_000), b"-", 0.1, 10)
    assert status == 408 and doc["code"] == "REQUEST_TIMEOUT" and took < 4, (status, took)
    # an idle connection (nothing sent) is closed after the header deadline
    with socket.create_connection(("127.0.0.1", http.port), timeout=5) as s:
        started = time.monotonic()
        assert s.recv(100) == b"" and time.monotonic() - started < 3
    assert http.get("/api/health").status in (200, 503)


def test_connections_per_client_are_limited(api_server):
    http, _ = api_server(MAX_CONNECTIONS_PER_CLIENT=4)
    held = [socket.create_connection(("127.0.0.1", http.port), timeout=5) for _ in range(4)]
    try:
        with socket.create_connection(("127.0.0.1", http.port), timeout=5) as extra:
            status, headers, body = reply_of(extra)
        assert status == 503 and json.loads(body)["code"] == "TOO_MANY_CONNECTIONS" and headers["retry-after"]
        # another address is a different client
        other = socket.create_connection(("127.0.0.1", http.port), timeout=5, source_address=("127.0.0.2", 0))
        with other:
            other.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            status, _, body = reply_of(other)
        assert status in (200, 503) and json.loads(body).get("code") != "TOO_MANY_CONNECTIONS"
    finally:
        for s in held:
            s.close()


def test_at_the_connection_limit_the_least_active_is_closed(api_server):
    http, _ = api_server(MAX_CONNECTIONS=16, MAX_CONNECTIONS_PER_CLIENT=100)
    held = [socket.create_connection(("127.0.0.1", http.port), timeout=5, source_address=("127.0.0.3", 0))
            for _ in range(20)]
    try:
        for s in held[:3]:
            s.sendall(b"GET /api/health HTTP/1.1\r\n")  # slow headers, oldest
        started = time.monotonic()
        r = http.get("/api/health")
        assert r.status in (200, 503) and time.monotonic() - started < 1
    finally:
        for s in held:
            s.close()


def test_expect_continue_refusals_send_no_continue(api_server):
    # curl sends "Expect: 100-continue" for large bodies: a refusal must come
    # instead of the 100 Continue that invites the body
    http, api = api_server(RATE_LIMIT_MAX_REQUESTS=1, MAX_FILE_SIZE_MB=1)
    body, ctype = multipart(files=[("image", "a.jpg", JPEG)])
    expect = "Expect: 100-continue\r\n"
    with socket.create_connection(("127.0.0.1", http.port), timeout=5) as s:
        s.sendall(post_head("/api/process/single", len(body), ctype, expect))
        assert s.recv(100).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        assert reply_of(s)[0] == 202
    for head, want in ((post_head("/api/process/single", 50 * 2**20, extra=expect), 413),
                       (post_head("/api/process/batch", 1000, extra=expect), 429)):
        status, _, reply = exchange(http.port, head)
        assert status == want, (status, reply)


def test_connection_limit_key_groups_ipv6_by_64():
    from imgworker.http import client_of

    assert client_of("203.0.113.9") == "203.0.113.9"
    assert client_of("2001:db8:1:2:aaaa::1") == client_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_of("2001:db8:1:3::1") != client_of("2001:db8:1:2::1")
    assert client_of("::ffff:198.51.100.7") == "198.51.100.7"


def test_connection_limit_fits_the_descriptor_limit(tmp_path):
    # a hard limit too low for MAX_CONNECTIONS: keep fewer connections and say so (no crash past fd 1024 either)
    import resource
    import subprocess
    import sys

    from conftest import wait_for
    from helpers import Http, free_port

    port = free_port()
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "APP_ENV": "test", "PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "imgworker", "api"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300)))
    try:
        http = Http(f"http://127.0.0.1:{port}")
        wait_for(lambda: _answers(http), 20, 0.05, "API up")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=20)[0].decode()
    assert "MAX_CONNECTIONS=1000 needs 2256 file descriptors; the limit is 300, so 22 connections are kept" in out


def test_eviction_spares_an_upload_arriving_at_a_good_rate(api_server):
    http, api = api_server(MAX_CONNECTIONS=16, MAX_CONNECTIONS_PER_CLIENT=100)
    body, ctype = multipart(files=[("image", "a.png", image_bytes("PNG", (300, 300), color=None) + b"\0" * 400_000)])
    with socket.create_connection(("127.0.0.1", http.port), timeout=5) as upload:
        upload.sendall(post_head("/api/process/single", len(body), ctype) + body[:200_000])
        time.sleep(0.3)  # the upload is now the oldest connection, its body half sent
        held = [socket.create_connection(("127.0.0.1", http.port), timeout=5, source_address=("127.0.0.5", 0))
                for _ in range(24)]  # each past the 16th evicts one
        try:
            upload.sendall(body[200_000:])
            status, _, reply = reply_of(upload)
        finally:
            for s in held:
                s.close()
    assert status == 202, reply  # answered, not cut off


def test_oversized_uploads_count_against_the_rate_limit(api_server):
    # otherwise a client could make the server spool a route's limit per connection, forever
    http, api = api_server(RATE_LIMIT_MAX_REQUESTS=2, MAX_FILE_SIZE_MB=0.1)
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
    assert exchange(http.port, post_head("/api/process/single", 10**6))[0] == 413  # by Content-Length
    sent, status, doc = send_until_answered(http.port, post_head("/api/process/single", None), chunk, 10 * 2**20)
    assert status == 413  # chunked, at the limit
    status, _, body = exchange(http.port, post_head("/api/process/single", None))
    assert status == 429 and json.loads(body)["code"] == "RATE_LIMITED"  # now refused on the headers


def test_eviction_never_picks_the_newest_connection(api_server):
    http, _ = api_server(MAX_CONNECTIONS=16, MAX_CONNECTIONS_PER_CLIENT=100)
    slow = []
    try:
        for _ in range(16):
            s = socket.create_connection(("127.0.0.1", http.port), timeout=5, source_address=("127.0.0.6", 0))
            s.sendall(b"GET /api/health HTTP/1.1\r\n")  # headers started, never finished
            slow.append(s)
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", http.port), timeout=5) as fresh:
            time.sleep(0.1)  # accepted, nothing sent yet: the server sees it idle
            slow.append(socket.create_connection(("127.0.0.1", http.port), timeout=5, source_address=("127.0.0.6", 0)))
            time.sleep(0.2)  # that one's arrival closed an old slow connection, not the fresh one
            fresh.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert reply_of(fresh)[0] in (200, 503)
    finally:
        for s in slow:
            s.close()


def test_eviction_never_picks_a_new_connection_over_older_ones_that_spoke_late(api_server):
    """Connections held open silently, then sending their first header byte
    after a new client connected, are not "more recent" than that client: a
    connection's wait counts from when it was accepted (found by the
    slow-clients suite on a loaded machine, where the server read a fresh
    client's request only after the attacker's next round of first bytes)."""
    http, _ = api_server(MAX_CONNECTIONS=16, MAX_CONNECTIONS_PER_CLIENT=100)
    old = [socket.create_connection(("127.0.0.1", http.port), timeout=5, source_address=("127.0.0.7", 0))
           for _ in range(16)]
    extra = None
    try:
        with socket.create_connection(("127.0.0.1", http.port), timeout=5) as fresh:
            # fresh is the 17th: its arrival closed the oldest silent connection
            deadline = time.monotonic() + 10
            while not (closed := [s for s in old if select.select([s], [], [], 0)[0]]):
                assert time.monotonic() < deadline, "no connection was closed for the 17th"
                time.sleep(0.02)
            assert len(closed) == 1
            for s in old:
                if s not in closed:
                    s.sendall(b"G")  # a first header byte, after fresh was accepted
            time.sleep(0.3)  # the server has read them: their headers "started" after fresh connected
            extra = socket.create_connection(("127.0.0.1", http.port), timeout=5, source_address=("127.0.0.7", 0))
            time.sleep(0.2)  # its arrival closed one connection: an old one, not fresh
            fresh.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            # answered (health is 503 here: no supervisor runs), not closed unanswered (0)
            assert reply_of(fresh)[0] in (200, 503)
    finally:
        for s in old + ([extra] if extra else []):
            s.close()


def test_refusal_statuses_come_from_the_error_codes(api_server, monkeypatch):
    """The server answers each of its refusals with the status model.ErrorCode
    gives the code (one place says which status a code has): moved there,
    the answers follow (before: server.py wrote its own numbers)."""
    from imgworker.model import ErrorCode

    for code, status in ((ErrorCode.BODY_NOT_ALLOWED, 418), (ErrorCode.REQUEST_TIMEOUT, 425),
                         (ErrorCode.TOO_MANY_CONNECTIONS, 451), (ErrorCode.RATE_LIMITED, 402)):
        monkeypatch.setattr(code, "http_status", status)
    http, _ = api_server(HEADER_TIMEOUT_MS=300, MAX_CONNECTIONS_PER_CLIENT=1, RATE_LIMIT_MAX_REQUESTS=1)

    def connect(source):  # a client of its own for each part (one connection each at a time)
        return socket.create_connection(("127.0.0.1", http.port), timeout=5, source_address=(source, 0))

    with connect("127.0.0.11") as s:
        s.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        status, _, body = reply_of(s)
    assert (status, json.loads(body)["code"]) == (418, "BODY_NOT_ALLOWED")  # a Refusal
    with connect("127.0.0.12") as slow:
        slow.sendall(b"GET /api/health HTTP/1.1\r\n")
        with connect("127.0.0.12") as extra:
            status, _, body = reply_of(extra)
        assert (status, json.loads(body)["code"]) == (451, "TOO_MANY_CONNECTIONS")  # refused at accept
        status, _, body = reply_of(slow)
        assert (status, json.loads(body)["code"]) == (425, "REQUEST_TIMEOUT")  # cut off by the deadline
    body, ctype = multipart(files=[("image", "a.jpg", JPEG)])
    with connect("127.0.0.13") as s:
        statuses = []
        for _ in range(2):
            s.sendall(post_head("/api/process/single", len(body), ctype) + body)
            statuses.append(reply_of(s)[0])
    assert statuses == [202, 402]  # the second refused from its headers by the API's gate (a Refusal too)


def test_a_multi_megabyte_upload_is_stored_byte_for_byte(api_server):
    """Uploads arrive in RECV_BYTES (64 KiB) socket reads and Waitress spools
    a body past 512 KiB to a file: a photo sent whole, and one sent in paced
    pieces that straddle the read boundaries, are stored exactly as sent."""
    from pathlib import Path

    from helpers import noisy_jpeg
    from imgworker.server import RECV_BYTES

    http, api = api_server()
    photo = noisy_jpeg((1600, 1200))
    assert len(photo) > 10 * RECV_BYTES
    body, ctype = multipart(files=[("image", "p.jpg", photo)])
    for piece in (len(body), 70_001):
        with socket.create_connection(("127.0.0.1", http.port), timeout=10) as s:
            s.sendall(post_head("/api/process/single", len(body), ctype))
            for i in range(0, len(body), piece):
                s.sendall(body[i:i + piece])
                time.sleep(0.002)  # pacing (not synchronisation): the server reads partial pieces
            status, _, reply = reply_of(s, timeout=10)
        assert status == 202, reply
        job = api.store.get(json.loads(reply)["jobId"])
        assert Path(job.input_path).read_bytes() == photo
    assert os.listdir(api.storage.tmp) == []
