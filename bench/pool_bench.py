"""Worker-pool benchmark on real photos (Debian's mate-backgrounds).

    .venv/bin/python bench/pool_bench.py [--rounds 2]

(1) End-to-end throughput of `imgworker worker` with 2 workers (jobs
enqueued, then claimed, processed and settled by the supervisor) against the
same pipeline called in-process by 2 plain processes, in the same run.
Target: ratio >= 0.95 (the pool costs <= 5 %).
(2) Idle submit->start latency (job row written + wake-up -> claimed and sent
to a worker). Target: p50 <= 10 ms.
(3) Peak RSS of the supervisor and of each worker.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import peak_rss_mb, photos, summary  # noqa: E402
from imgworker import wakeup  # noqa: E402
from imgworker.store import NewJob  # noqa: E402
from imgworker.store.sqlite import SqliteStore  # noqa: E402


def plain_process(todo, out_dir: str, result) -> None:
    from imgworker.imaging import Limits, process

    n = 0
    while (f := todo.get()) is not None:  # a shared work queue, like the pool's
        process(f, out_dir, f"{os.getpid()}x{n}", {}, Limits())
        n += 1
    result.put(n)


def baseline(files: list[Path]) -> float:
    ctx = mp.get_context("spawn")
    out = tempfile.mkdtemp()
    todo, result = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=plain_process, args=(todo, out, result)) for _ in range(2)]
    for p in procs:
        p.start()
    time.sleep(1.0)  # both interpreters up, as the pool's workers are
    t0 = time.perf_counter()
    for f in files:
        todo.put(str(f))
    for _ in procs:
        todo.put(None)
    done = sum(result.get() for _ in procs)
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    assert done == len(files)
    return len(files) / elapsed


def start_worker(data: Path) -> subprocess.Popen:
    env = {**os.environ, "DATA_DIR": str(data), "MAX_CONCURRENT_JOBS": "2", "LOG_LEVEL": "warning",
           "JOB_TIMEOUT_MS": "120000", "MAX_QUEUE_SIZE": "100000"}
    proc = subprocess.Popen([sys.executable, "-m", "imgworker", "worker"], env=env)
    q = SqliteStore(data / "imgworker.db")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            sups = q.supervisors()
            if sups and sups[0]["state"].get("workers", {}).get("alive") == 2:
                return proc
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError("pool did not start")


def pool(files: list[Path], data: Path) -> tuple[float, Path]:
    q = SqliteStore(data / "imgworker.db")
    ids = []
    t0 = time.perf_counter()
    for f in files:
        job_id = uuid.uuid4().hex
        ids.append(job_id)
        q.enqueue([NewJob(job_id, str(f), f.name, f.stat().st_size)], 10**6, 1)
    wakeup.notify(q.path)
    while True:
        row = q.conn.execute("SELECT count(*) FROM jobs WHERE status IN ('completed', 'failed')").fetchone()[0]
        if row >= len(ids):
            break
        time.sleep(0.01)
    elapsed = time.perf_counter() - t0
    failed = [j for j in ids if q.get(j).status != "completed"]
    assert not failed, [q.get(j).error for j in failed]
    return len(files) / elapsed, data


def idle_latency(data: Path, tiny: Path, n: int = 40) -> list[float]:
    q = SqliteStore(data / "imgworker.db")
    lags = []
    for _ in range(n):
        time.sleep(0.05)  # let the supervisor go idle in select()
        job_id = uuid.uuid4().hex
        q.enqueue([NewJob(job_id, str(tiny), "tiny.png", tiny.stat().st_size)], 10**6, 1)
        wakeup.notify(q.path)
        while (job := q.get(job_id))["status"] != "completed":
            time.sleep(0.002)
        lags.append(job.started_at - job.created_at)
    return lags


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2, help="times the photo set is processed")
    args = ap.parse_args()
    files = photos() * args.rounds
    size_mb = sum(f.stat().st_size for f in files) / 2**20
    print(f"{len(files)} photos ({size_mb:.0f} MB, mate-backgrounds x{args.rounds}), 2 workers, 2 cores")
    base = baseline(files)
    data = Path(tempfile.mkdtemp()) / "data"
    proc = start_worker(data)
    try:
        ours, _ = pool(files, data)
        from PIL import Image

        tiny = data / "tiny.png"
        Image.new("RGB", (16, 16), "red").save(tiny)
        lags = idle_latency(data, tiny)
        import psutil

        sup_rss = peak_rss_mb(proc.pid)
        workers = [(c.pid, peak_rss_mb(c.pid)) for c in psutil.Process(proc.pid).children()]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"  in-process pipeline, 2 plain processes : {base:6.2f} images/s")
    print(f"  imgworker worker pool, 2 workers       : {ours:6.2f} images/s   (same run)")
    print(f"  ratio                                  : {ours / base:.3f}   (target >= 0.95)")
    print(f"idle submit->start latency: {summary(lags)}   (target p50 <= 10 ms)")
    print(f"peak RSS: supervisor {sup_rss:.0f} MB; workers " + ", ".join(f"{pid}: {mb:.0f} MB" for pid, mb in workers))


if __name__ == "__main__":
    main()
