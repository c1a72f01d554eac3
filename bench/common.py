"""Shared bits of the benchmarks: the photo corpus, percentiles, RSS, a service."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHOTOS = HERE / ".photos"


def photos() -> list[Path]:
    """The real photos of Debian's mate-backgrounds (fetched once into bench/.photos)."""
    if not PHOTOS.is_dir() or not any(PHOTOS.iterdir()):
        tmp = Path(tempfile.mkdtemp())
        subprocess.run(["apt-get", "download", "mate-backgrounds"], cwd=tmp, check=True, capture_output=True)
        deb = next(tmp.glob("mate-backgrounds_*.deb"))
        subprocess.run(["dpkg", "-x", str(deb), str(tmp / "x")], check=True)
        PHOTOS.mkdir(exist_ok=True)
        for p in (tmp / "x").rglob("*"):
            if p.suffix.lower() in (".jpg", ".jpeg", ".png") and p.is_file():
                shutil.copy(p, PHOTOS / p.name)
        shutil.rmtree(tmp)
    return sorted(PHOTOS.iterdir())


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(values_ms: list[float]) -> str:
    return (f"p50 {pct(values_ms, 50):.1f} ms, p95 {pct(values_ms, 95):.1f} ms, p99 {pct(values_ms, 99):.1f} ms "
            f"(n={len(values_ms)}, mean {statistics.fmean(values_ms):.1f})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak RSS) of a live process, in MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class Service:
    """`imgworker serve` on a throwaway data dir."""

    def __init__(self, **env: object):
        self.dir = Path(tempfile.mkdtemp(prefix="imgworker-bench-"))
        self.port = free_port()
        self.env = {**os.environ, "DATA_DIR": str(self.dir / "data"), "PORT": str(self.port), "LOG_LEVEL": "warning",
                    **{k: str(v) for k, v in env.items()}}
        self.proc = subprocess.Popen([sys.executable, "-m", "imgworker", "serve"], env=self.env, cwd=self.dir,
                                     stderr=open(self.dir / "serve.log", "wb"))
        self.url = f"http://127.0.0.1:{self.port}"
        import urllib.request

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/api/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("service did not become healthy: " + (self.dir / "serve.log").read_text())

    def pids(self) -> dict[str, int]:
        import psutil

        out = {}
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            cmd = " ".join(child.cmdline())
            if "imgworker.worker" in cmd:
                out[f"pool worker {child.pid}"] = child.pid
            else:
                out["supervisor" if cmd.endswith(" worker") else cmd.rsplit(" ", 1)[-1]] = child.pid
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)
