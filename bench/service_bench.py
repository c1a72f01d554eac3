"""Whole-service benchmark: upload -> completed -> downloaded, end to end.

    .venv/bin/python bench/service_bench.py [--rounds 2]

`imgworker serve` with 2 workers on the real photo corpus (Debian's
mate-backgrounds), at client concurrency 1, 4 and 16: images/s, latency
p50/p95/p99 per image, peak RSS of every process; against the same pipeline
called in-process by 2 plain processes in the same run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_bench import multipart  # noqa: E402
from common import Service, peak_rss_mb, photos, summary  # noqa: E402
from pool_bench import baseline  # noqa: E402


def one_image(port: int, path: Path) -> float:
    """Upload, poll every 50 ms, download; seconds taken."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body, ctype = multipart("image", path.name, path.read_bytes())
    while True:
        conn.request("POST", "/api/process/single", body, {"Content-Type": ctype})
        r = conn.getresponse()
        data = json.loads(r.read())
        if r.status == 202:
            break
        if r.status not in (429, 503):
            raise RuntimeError(f"{path.name}: {r.status} {data}")
        time.sleep(float(r.getheader("Retry-After") or 1))
    url = data["statusUrl"]
    while True:
        conn.request("GET", url)
        job = json.loads(conn.getresponse().read())
        if job["status"] in ("completed", "failed"):
            break
        time.sleep(0.05)
    if job["status"] != "completed":
        raise RuntimeError(f"{path.name}: {job.get('error')}")
    conn.request("GET", job["result"]["processedFile"]["url"])
    r = conn.getresponse()
    r.read()
    conn.close()
    return time.perf_counter() - t0


def run(svc: Service, files: list[Path], concurrency: int) -> tuple[float, list[float]]:
    todo = list(files)
    lock = threading.Lock()
    latencies: list[float] = []

    def client() -> None:
        while True:
            with lock:
                if not todo:
                    return
                path = todo.pop()
            took = one_image(svc.port, path)
            with lock:
                latencies.append(took * 1000)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(files) / (time.perf_counter() - t0), latencies


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    files = photos() * args.rounds
    print(f"{len(files)} photos per run (mate-backgrounds x{args.rounds}), 2 workers, 2 cores")
    base = baseline(files)
    print(f"  in-process pipeline, 2 plain processes: {base:.2f} images/s (same run)")
    svc = Service(MAX_CONCURRENT_JOBS=2, MAX_QUEUE_SIZE=1000, RATE_LIMIT_MAX_REQUESTS=10**6, JOB_TIMEOUT_MS=120000)
    try:
        for concurrency in (1, 4, 16):
            rate, lat = run(svc, files, concurrency)
            print(f"  concurrency {concurrency:2d}: {rate:5.2f} images/s (ratio {rate / base:.2f}); latency {summary(lat)}")
        rss = {name: peak_rss_mb(pid) for name, pid in svc.pids().items()}
        print("  peak RSS: " + ", ".join(f"{k} {v:.0f} MB" for k, v in rss.items()))
    finally:
        svc.stop()


if __name__ == "__main__":
    main()
