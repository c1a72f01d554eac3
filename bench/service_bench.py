"""Whole-service benchmark: upload -> completed -> downloaded, end to end.

    .venv/bin/python bench/service_bench.py [--rounds 2]               # vs the Node original
    .venv/bin/python bench/service_bench.py --vs-pipeline [--rounds 2] # vs the bare pipeline

--nodes 2: two nodes (1 worker each) sharing one PostgreSQL database (a
private server started for the run) and one data directory, clients
alternating between them, against one node with 2 workers on SQLite.

Default: `imgworker serve` against the Node original it replaces (Express +
sharp, /work/shared/peers/seednode, copied to a temp folder and installed with
`npm ci`; skipped with a message when npm is unavailable), both with 2
workers and a raised rate limit, driven by the peers' own loadgen.py (4
closed-loop clients: upload, poll every 50 ms, download) on the real photos
(Debian's mate-backgrounds x2), alternating runs (seed, imgworker, seed,
imgworker, ...). Prints each run's img/s and latency p50, the img/s ratio,
`/api/health` latency (p50/p99, probed 10 times a second during the load),
the peak RSS (whole process tree, and its largest process) and the CPU each
process role spent per image (api, supervisor, workers; node), whose total
is steadier than img/s on a shared machine. ``--only imgworker`` (or
``node``) runs one side, for profiling.

--vs-pipeline: `imgworker serve` with 2 workers at client concurrency 1, 4
and 16: images/s, latency p50/p95/p99 per image, peak RSS of every process;
against the same pipeline called in-process by 2 plain processes in the same
run.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from api_bench import multipart  # noqa: E402
from common import PHOTOS, Service, free_port, pct, peak_rss_mb, photos, summary  # noqa: E402
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


def run(svc: "Service | list[Service]", files: list[Path], concurrency: int) -> tuple[float, list[float]]:
    """Clients upload ``files``; with several services, client i uses service i mod n."""
    svcs = svc if isinstance(svc, list) else [svc]
    todo = list(files)
    lock = threading.Lock()
    latencies: list[float] = []

    def client(port: int) -> None:
        while True:
            with lock:
                if not todo:
                    return
                path = todo.pop()
            took = one_image(port, path)
            with lock:
                latencies.append(took * 1000)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(svcs[i % len(svcs)].port,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(files) / (time.perf_counter() - t0), latencies


def vs_pipeline(rounds: int) -> None:
    files = photos() * rounds
    print(f"{len(files)} photos per run (mate-backgrounds x{rounds}), 2 workers, 2 cores")
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


def two_nodes(rounds: int) -> None:
    """Two nodes (1 worker each) on one PostgreSQL database and one shared
    data directory, against one node with 2 workers on SQLite, same run."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import pg

    files = photos() * rounds
    print(f"{len(files)} photos per run (mate-backgrounds x{rounds}), 2 workers in all, 2 cores")
    settings = dict(MAX_QUEUE_SIZE=1000, RATE_LIMIT_MAX_REQUESTS=10**6, JOB_TIMEOUT_MS=120000)
    server = pg.PgServer(pg.find_bindir(), options="-c listen_addresses='' -c shared_buffers=128MB").start()
    shared = tempfile.mkdtemp(prefix="imgworker-bench-shared-")
    try:
        url = server.create_database()
        layouts = [("1 node, SQLite, 2 workers", lambda: [Service(MAX_CONCURRENT_JOBS=2, **settings)]),
                   ("2 nodes, PostgreSQL, 1 worker each", lambda: [
                       Service(MAX_CONCURRENT_JOBS=1, DATABASE_URL=url, DATA_DIR=shared, **settings)
                       for _ in range(2)])]
        for name, start in layouts:
            svcs = start()
            try:
                for concurrency in (4, 16):
                    rate, lat = run(svcs, files, concurrency)
                    print(f"  {name}, concurrency {concurrency:2d}: {rate:5.2f} images/s; latency {summary(lat)}")
            finally:
                for svc in svcs:
                    svc.stop()
    finally:
        server.stop()
        shutil.rmtree(shared, ignore_errors=True)


# --- against the Node original -----------------------------------------------------------------

PEERS = Path(os.environ.get("PEERS_DIR", "/work/shared/peers"))


def install_seed() -> Path | None:
    """A copy of the Node original with its locked dependencies, or None (reason printed)."""
    if not (shutil.which("node") and shutil.which("npm")):
        print("Node original: skipped (node/npm not found)")
        return None
    d = Path(tempfile.mkdtemp(prefix="seednode-"))
    shutil.copytree(PEERS / "seednode", d, dirs_exist_ok=True)
    for p in [d, *d.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o200)
    r = subprocess.run(["npm", "ci", "-s", "--no-audit", "--no-fund"], cwd=d, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"Node original: skipped (npm ci failed: {r.stderr.strip()[-200:]})")
        shutil.rmtree(d, ignore_errors=True)
        return None
    return d


class Seed:
    """The Node original (server.js) on a free port, 2 concurrent jobs, limits raised."""

    def __init__(self, root: Path):
        self.dir = Path(tempfile.mkdtemp(prefix="seed-run-"))
        self.port = free_port()
        env = {**os.environ, "PORT": str(self.port), "MAX_CONCURRENT_JOBS": "2", "MAX_QUEUE_SIZE": "1000",
               "RATE_LIMIT_MAX_REQUESTS": "1000000000", "UPLOAD_DIR": str(self.dir / "uploads"),
               "PROCESSED_DIR": str(self.dir / "processed")}
        self.proc = subprocess.Popen(["node", str(root / "server.js")], cwd=root, env=env,
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "log", "wb"))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                conn.request("GET", "/api/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the Node original did not start: " + (self.dir / "log").read_text())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)
        shutil.rmtree(self.dir, ignore_errors=True)


class Watch(threading.Thread):
    """While the load runs: GET /api/health 10 times a second (its latency) and
    the RSS of the service's process tree every 0.2 s (its peak)."""

    def __init__(self, port: int, root_pid: int):
        super().__init__(daemon=True)
        self.port, self.root, self.stop_at = port, root_pid, threading.Event()
        self.health_ms: list[float] = []
        self.peak_tree = self.peak_one = 0.0
        self.cpu: dict[int, tuple[str, float, float]] = {}  # pid -> (role, CPU s at the first and last reading)

    def run(self) -> None:
        import psutil

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        root = psutil.Process(self.root)
        while not self.stop_at.wait(0.1):
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/api/health")
                conn.getresponse().read()
                self.health_ms.append((time.perf_counter() - t0) * 1000)
            except OSError:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            rss = []
            for p in [root, *root.children(recursive=True)]:
                try:
                    rss.append(p.memory_info().rss / 2**20)
                    t = p.cpu_times()
                    role, first, _ = self.cpu.get(p.pid) or (_role(p), t.user + t.system, 0.0)
                    self.cpu[p.pid] = (role, first, t.user + t.system)
                except psutil.Error:
                    pass
            self.peak_tree = max(self.peak_tree, sum(rss))
            self.peak_one = max(self.peak_one, max(rss, default=0))


def _role(p) -> str:
    """What a process of the service's tree is: api, supervisor, worker, serve or node."""
    cmd = " ".join(p.cmdline())
    for mark, role in (("imgworker.worker", "worker"), ("imgworker api", "api"), ("imgworker worker", "supervisor"),
                       ("imgworker serve", "serve")):
        if mark in cmd:
            return role
    return p.name()


def cpu_by_role(cpu: dict[int, tuple[str, float, float]]) -> dict[str, float]:
    """CPU seconds each role spent during the load (process start-up excluded)."""
    out: dict[str, float] = {}
    for role, first, last in cpu.values():
        out[role] = out.get(role, 0.0) + last - first
    return out


def loadgen(url: str, root_pid: int, repeat: int, out: Path) -> dict:
    watch = Watch(int(url.rsplit(":", 1)[1]), root_pid)
    watch.start()
    try:
        subprocess.run([sys.executable, str(PEERS / "seednode" / "loadgen.py"), "--base-url", url, "--concurrency", "4",
                        "--files", str(PHOTOS / "*"), "--repeat", str(repeat), "--timeout", "400", "--quiet",
                        "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
    finally:
        watch.stop_at.set()
        watch.join()
    s = json.loads(out.read_text())["summary"]
    return {"img_s": s["images_per_s"], "p50": s["latency_e2e_incl_download_ms"]["p50"], "failed": s["failed"],
            "health": watch.health_ms, "tree": watch.peak_tree, "one": watch.peak_one,
            "images": s.get("completed", 0), "cpu": cpu_by_role(watch.cpu)}


def vs_node(rounds: int, repeat: int, only: str | None = None) -> None:
    photos()
    root = install_seed() if only != "imgworker" else Path()
    if root is None:
        return
    try:
        _compare(root, rounds, repeat, only)
    finally:
        if only != "imgworker":
            shutil.rmtree(root, ignore_errors=True)  # the installed copy (27 MB of node_modules)


def _compare(root: Path, rounds: int, repeat: int, only: str | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="service-bench-"))
    runs: dict[str, list[dict]] = {"Node original": [], "imgworker": []}
    print(f"loadgen.py: 4 clients, mate-backgrounds x{repeat}, 2 workers each, alternating, {rounds} rounds")
    for rnd in range(rounds):
        for name in ("Node original", "imgworker") if rnd % 2 == 0 else ("imgworker", "Node original"):
            if only and name != {"node": "Node original", "imgworker": "imgworker"}[only]:
                continue
            if name == "imgworker":
                svc = Service(MAX_CONCURRENT_JOBS=2, MAX_QUEUE_SIZE=1000, RATE_LIMIT_MAX_REQUESTS=10**6,
                              JOB_TIMEOUT_MS=120000)
                url, pid = svc.url, svc.proc.pid
            else:
                svc = Seed(root)
                url, pid = svc.url, svc.proc.pid
            try:
                r = loadgen(url, pid, repeat, tmp / f"{rnd}-{name[0]}.json")
            finally:
                svc.stop()
            runs[name].append(r)
            print(f"  {name:13s} {r['img_s']:5.2f} img/s, p50 {r['p50']:6.0f} ms, failed {r['failed']}, health "
                  f"p50 {pct(r['health'], 50):.1f} p99 {pct(r['health'], 99):.1f} ms, peak RSS tree "
                  f"{r['tree']:.0f} MiB (largest process {r['one']:.0f})")
            n = max(1, r["images"])
            print("      CPU ms per image: " + ", ".join(f"{k} {v * 1000 / n:.0f}" for k, v in sorted(r["cpu"].items())))
    seed, ours = runs["Node original"], runs["imgworker"]
    shutil.rmtree(tmp, ignore_errors=True)
    if only:
        return
    ratio = statistics.fmean(r["img_s"] for r in ours) / statistics.fmean(r["img_s"] for r in seed)
    both = lambda rs, k: " / ".join(f"{r[k]:.0f}" for r in rs)  # noqa: E731
    print(f"img/s ratio imgworker / Node original: {ratio:.2f} (per round: "
          + ", ".join(f"{o['img_s'] / s['img_s']:.2f}" for o, s in zip(ours, seed)) + ")")
    print(f"p50 latency ms: imgworker {both(ours, 'p50')}, Node {both(seed, 'p50')}; peak RSS MiB (tree): "
          f"imgworker {both(ours, 'tree')}, Node {both(seed, 'tree')}")
    per_image = lambda rs: statistics.fmean(sum(r["cpu"].values()) * 1000 / max(1, r["images"]) for r in rs)  # noqa: E731
    print(f"CPU ms per image, all processes: imgworker {per_image(ours):.0f}, Node {per_image(seed):.0f} "
          f"(Node / imgworker {per_image(seed) / per_image(ours):.2f}: the img/s ratio if both kept the cores busy)")
    h = [x for r in ours for x in r["health"]]
    hs = [x for r in seed for x in r["health"]]
    print(f"/api/health under load: imgworker p50 {pct(h, 50):.1f} p99 {pct(h, 99):.1f} ms (n={len(h)}); "
          f"Node p50 {pct(hs, 50):.1f} p99 {pct(hs, 99):.1f} ms (n={len(hs)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2, help="loadgen --repeat (photos per run = 31 x this)")
    ap.add_argument("--vs-pipeline", action="store_true", help="the older comparison with the bare pipeline")
    ap.add_argument("--nodes", type=int, choices=(2,), help="2 nodes on PostgreSQL vs 1 node on SQLite")
    ap.add_argument("--only", choices=("imgworker", "node"), help="run one service only (profiling)")
    args = ap.parse_args()
    if args.nodes:
        two_nodes(args.rounds)
    elif args.vs_pipeline:
        vs_pipeline(args.rounds)
    else:
        vs_node(args.rounds, args.repeat, args.only)


if __name__ == "__main__":
    main()
