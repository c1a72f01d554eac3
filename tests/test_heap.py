"""The C heap keeps freed image buffers for the next image (heap.py), and a
worker gives that memory back when idle or before it reports a big RSS.

Real processes throughout: mallopt is process-wide, so nothing here changes
the test runner's own allocator."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from conftest import wait_for
from imgworker import worker
from imgworker.limits import Limits
from imgworker.wire import job_message, recv, send

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc, /proc")

_FAULTS = textwrap.dedent("""
    import resource, sys
    from imgworker import heap
    kept = heap.keep_freed_memory() if sys.argv[1] == "keep" else False
    size = 64 * 2**20  # past glibc's largest dynamic mmap threshold (32 MiB)
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buf = bytearray(size)
        buf[::4096] = b"x" * len(range(0, size, 4096))  # touch every page
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del buf

    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() // 2**20

    held = rss()
    released = heap.release_freed_memory()
    print(kept, faults[1], faults[2], held, rss(), released)
""")


def _faults(mode: str) -> tuple[bool, int, int, int, int, bool]:
    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True).stdout
    kept, f1, f2, held, after, released = out.split()
    return kept == "True", int(f1), int(f2), int(held), int(after), released == "True"


def test_a_freed_image_buffer_is_reused_without_faulting_its_pages_in_again():
    pages = 64 * 2**20 // 4096
    _, f1, f2, held, after, _ = _faults("default")
    assert f1 > pages * 0.9 and f2 > pages * 0.9  # glibc's default: a fresh mapping every time
    assert held - after < 16  # and nothing kept
    kept, f1, f2, held, after, released = _faults("keep")
    assert kept
    assert f1 < pages * 0.1 and f2 < pages * 0.1, (f1, f2)
    assert released and held - after > 48, (held, after)  # malloc_trim gives the kept pages back


def _photo(tmp_path, size=(4000, 3000)) -> str:
    path = tmp_path / f"{size[0]}x{size[1]}.png"
    Image.linear_gradient("L").resize(size).convert("RGB").save(path, compress_level=1)
    return str(path)


def _statm_rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


@pytest.fixture
def real_worker():
    """Factory: real_worker(max_mb, hooks=False) -> (process, socket) of a
    started pool worker (``hooks``: with tests/hooks, for ``_testHoldMb``)."""
    made = []

    def start(max_mb: int, hooks: bool = False):
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        if hooks:
            env.update(PYTHONPATH=os.pathsep.join([str(Path(__file__).parent / "hooks"), env.get("PYTHONPATH", "")]),
                       IMGWORKER_TEST_HOOKS="1")
        proc = subprocess.Popen([sys.executable, "-m", "imgworker.worker", str(theirs.fileno()), str(os.getpid()),
                                 str(max_mb), "normal"], pass_fds=[theirs.fileno()], env=env)
        theirs.close()
        made.append((proc, ours))
        assert recv(ours) == {"ready": proc.pid}
        return proc, ours

    yield start
    for proc, sock in made:
        sock.close()  # EOF: the worker exits
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run(sock, src: str, out_dir, job_id: str, ok: bool = True, **options) -> dict:
    send(sock, job_message(job_id, src, str(out_dir), {"format": "jpeg", **options}, Limits()))
    reply = recv(sock)
    assert reply["ok"] is ok, reply
    return reply


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().decode().split("\0")[:-1]


def test_an_idle_worker_gives_back_what_its_last_image_freed(tmp_path, real_worker):
    src = _photo(tmp_path)
    proc, sock = real_worker(0)
    baseline = _statm_rss_mb(proc.pid)
    reply = _run(sock, src, tmp_path, "a" * 32)
    # Kept right after the job (the 4000x3000 picture alone is 46 MB)...
    assert reply["rssMb"] > baseline + 40, (baseline, reply["rssMb"])
    # ...and given back once the worker has waited IDLE_RELEASE_S for another.
    wait_for(lambda: _statm_rss_mb(proc.pid) < baseline + 20, 10 + worker.IDLE_RELEASE_S,
             message="the idle worker's RSS to drop")
    # The next job still works (the heap grows again as needed).
    assert _run(sock, src, tmp_path, "b" * 32)["rssMb"] > baseline + 40


def test_memory_a_job_freed_does_not_get_a_worker_recycled(tmp_path, real_worker):
    """A worker capped at 2 x WORKER_MAX_RSS_MB reports, after a job, only
    what it still uses once its RSS passes half the recycling line."""
    src = _photo(tmp_path)
    proc, sock = real_worker(256)  # recycled above 128 MB; releases above 64
    baseline = _statm_rss_mb(proc.pid)
    assert baseline < 64
    assert _run(sock, src, tmp_path, "c" * 32)["rssMb"] < baseline + 20


def test_kept_memory_is_released_before_it_crowds_the_address_space_cap(monkeypatch):
    """Either half-line triggers the release: RSS past a quarter of the cap
    (half WORKER_MAX_RSS_MB) or the address space past half of it."""
    released = []
    readings = {}
    monkeypatch.setattr(worker.heap, "release_freed_memory", lambda: released.append(1) or True)
    monkeypatch.setattr(worker, "_statm_mb", lambda: readings["after"] if released else readings["before"])
    for before, expect_release in (((300, 60), False), ((600, 60), True), ((300, 300), True)):
        released.clear()
        readings.update(before=before, after=(100, 40))
        rss = worker._rss_after_job(1024)
        assert bool(released) == expect_release, before
        assert rss == (40 if expect_release else before[1])
    released.clear()
    readings.update(before=(5000, 5000), after=(1, 1))
    assert worker._rss_after_job(0) == 5000 and not released  # no cap: the idle release only


def test_an_image_that_fits_a_fresh_worker_does_not_fail_in_one_that_holds_memory(tmp_path, real_worker):
    """A job that runs out of memory in a worker that has run jobs before
    (whose heap may hold address space a fresh process does not: kept,
    fragmented, pinned) is retried once in a fresh address space: the
    worker re-executes itself (same pid, same socket) with the job as its
    first. An image too large for any worker still fails IMAGE_TOO_LARGE,
    after one retry, and the worker serves on."""
    src, small, huge = _photo(tmp_path), _photo(tmp_path, (64, 48)), _photo(tmp_path, (8000, 6000))
    proc, sock = real_worker(200, hooks=True)  # the 4000x3000 picture needs about 120 MB with the worker's baseline
    _run(sock, small, tmp_path, "a" * 32, _testHoldMb=120)  # held for good: 120 + 120 > 200
    assert _run(sock, src, tmp_path, "b" * 32)["outcome"]["output_width"] == 1024
    assert proc.poll() is None and _cmdline(proc.pid)[-1].startswith("{")  # re-executed with the job
    assert _run(sock, src, tmp_path, "c" * 32)["outcome"]["output_width"] == 1024  # and fresh since
    # fails where it is the process's first job: reported, not retried again
    assert _run(sock, huge, tmp_path, "d" * 32, ok=False)["code"] == "IMAGE_TOO_LARGE"
    assert _run(sock, small, tmp_path, "e" * 32)["ok"] and proc.poll() is None


def test_a_fresh_worker_reports_running_out_of_memory_at_once(tmp_path, real_worker):
    """Its first job: nothing to gain from a fresh address space, no retry."""
    proc, sock = real_worker(200)
    assert _run(sock, _photo(tmp_path, (8000, 6000)), tmp_path, "f" * 32, ok=False)["code"] == "IMAGE_TOO_LARGE"
    assert len(_cmdline(proc.pid)) == 7  # python -m imgworker.worker FD PPID MAX_MB POLICY: never re-executed
    assert _run(sock, _photo(tmp_path, (64, 48)), tmp_path, "g" * 32)["ok"]
