"""API benchmark.

    .venv/bin/python bench/api_bench.py [--seconds 8]

(a) Upload throughput of tiny images (no processing cost: the pool is
paused) with 8 concurrent keep-alive clients against `imgworker serve`,
and against a bare Waitress app that reads the same multipart body and
answers 202 (same client, same run): requests/s and the ratio.
(b) `/api/health` latency while both workers are busy with the photo corpus.
Target: p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Service, free_port, photos, summary  # noqa: E402


def multipart(field: str, name: str, data: bytes) -> tuple[bytes, str]:
    b = "benchboundary7d3f"
    body = (f'--{b}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{b}--\r\n".encode()
    return body, f"multipart/form-data; boundary={b}"


def hammer(port: int, body: bytes, ctype: str, seconds: float, clients: int = 8) -> tuple[float, dict]:
    stop = time.monotonic() + seconds
    counts: dict = {}
    lock = threading.Lock()

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while time.monotonic() < stop:
            conn.request("POST", "/api/process/single", body, {"Content-Type": ctype})
            r = conn.getresponse()
            r.read()
            with lock:
                counts[r.status] = counts.get(r.status, 0) + 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts.values()) / (time.perf_counter() - t0), counts


def bare_server(port: int):
    from waitress.server import create_server

    def app(environ, start_response):
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        body = json.dumps({"success": True, "jobId": "x" * 32}).encode()
        start_response("202 Accepted", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    server = create_server(app, host="127.0.0.1", port=port, threads=8)
    threading.Thread(target=server.run, daemon=True).start()
    return server


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8)
    args = ap.parse_args()
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buf, "PNG")
    body, ctype = multipart("image", "tiny.png", buf.getvalue())

    # (a) uploads: the pool is paused (MEMORY_PAUSE_PERCENT=0) so only the API works
    svc = Service(MEMORY_PAUSE_PERCENT=0, MEMORY_RESUME_PERCENT=0, MAX_QUEUE_SIZE=10**7,
                  RATE_LIMIT_MAX_REQUESTS=10**9)
    try:
        ours, counts = hammer(svc.port, body, ctype, args.seconds)
    finally:
        svc.stop()
    port = free_port()
    server = bare_server(port)
    base, _ = hammer(port, body, ctype, args.seconds)
    server.close()
    print(f"(a) tiny uploads, 8 keep-alive clients, {args.seconds:.0f} s each:")
    print(f"    imgworker serve (check header, fsync, row, wake-up): {ours:7.0f} req/s  statuses {counts}")
    print(f"    bare Waitress app reading the same body             : {base:7.0f} req/s  (same run)")
    print(f"    ratio: {ours / base:.2f}")

    # (b) health while the pool is busy with real photos
    svc = Service(MAX_CONCURRENT_JOBS=2, MAX_QUEUE_SIZE=10**6, RATE_LIMIT_MAX_REQUESTS=10**9, JOB_TIMEOUT_MS=120000)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=30)
        for f in photos() * 2:
            b, c = multipart("image", f.name, f.read_bytes())
            conn.request("POST", "/api/process/single", b, {"Content-Type": c})
            r = conn.getresponse()
            r.read()
            assert r.status == 202, r.status
        lat = []
        busy_seen = 0
        stop = time.monotonic() + args.seconds
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            conn.request("GET", "/api/health")
            r = conn.getresponse()
            data = json.loads(r.read())
            lat.append((time.perf_counter() - t0) * 1000)
            busy_seen += data.get("workers", {}).get("busy", 0) == 2
            time.sleep(0.02)
        conn.close()
    finally:
        svc.stop()
    print(f"(b) /api/health while 2 workers process photos ({busy_seen}/{len(lat)} answers saw both busy):")
    print(f"    {summary(lat)}   (target p99 <= 20 ms)")


if __name__ == "__main__":
    main()
