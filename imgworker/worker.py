"""A pool worker: a fresh interpreter that runs one job at a time.

Started by the supervisor as ``python -m imgworker.worker FD PPID MAX_MB
[idle|batch|normal]`` in its own process group, with one end of a socketpair
as FD, an address space capped at MAX_MB and the CPU scheduling policy
WORKER_SCHEDULING names. It opens no database (the
supervisor writes every outcome) and inherits no connection (close_fds).
A fifth argument, a job message, is given only by a worker to itself when
it re-executes to retry a job in a fresh address space (_retry_fresh).

Protocol: see wire.py (length-prefixed JSON; a job in, its outcome out;
EOF means "exit").
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
from typing import Any

from . import heap
from .limits import memory_in_use
from .wire import done_message, failed_message, recv, send

IDLE_RELEASE_S = 2.0  # a worker without a job this long gives its freed image memory back


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies (Linux), so a
    kill -9 of the supervisor never leaves a worker running."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _statm_mb() -> tuple[int, int]:
    """(address space, resident set) in MB, now (RSS is what recycling is
    decided on, not the peak; the address space is what RLIMIT_AS caps)."""
    used = memory_in_use()
    if used is None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        return rss, rss
    return used[0] // 2**20, used[1] // 2**20


def _wait_for_job(sock: socket.socket) -> None:
    """Block until the supervisor sends something; if that takes longer
    than IDLE_RELEASE_S, hand the memory the last image freed back to the
    system meanwhile (heap.py: it is kept for the next image otherwise)."""
    try:
        if not select.select([sock], [], [], IDLE_RELEASE_S)[0]:
            heap.release_freed_memory()
    except (OSError, ValueError):
        pass  # the recv that follows reports a broken socket


def _rss_after_job(max_mb: int) -> int:
    """The RSS reported after a job (the supervisor recycles a worker above
    WORKER_MAX_RSS_MB, half our address-space cap ``max_mb``). The memory
    the job freed and the heap keeps for the next image is released first
    when the RSS passes half the recycling line, so that only memory still
    in use can get a worker replaced, or when the address space passes half
    the cap, so that kept memory never makes the next image fail the cap."""
    size, rss = _statm_mb()
    if max_mb > 0 and (rss > max_mb // 4 or size > max_mb // 2) and heap.release_freed_memory():
        size, rss = _statm_mb()
    return rss


def run_job(job: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Run one job message through the pipeline; returns the outcome message
    and whether the job failed for want of memory under the address-space
    cap (rather than for a limit or a fault of the image)."""
    from .errors import ImageError, OutOfMemory
    from .imaging import process
    from .limits import Limits
    from .model import ErrorCode

    try:
        outcome = process(job["input"], job["outDir"], job["id"], job["options"], Limits.from_wire(job["limits"]))
        return done_message(job["id"], outcome), False
    except ImageError as exc:
        return failed_message(job["id"], exc.code, exc.message, exc.detail), isinstance(exc, OutOfMemory)
    except MemoryError:  # the address-space cap: this image needs more than a worker may have
        return failed_message(job["id"], ErrorCode.IMAGE_TOO_LARGE,
                              "The image needs more memory than the worker has"), True
    except Exception:  # a bug, not the image's fault: report it, keep the worker
        import traceback

        return failed_message(job["id"], ErrorCode.PROCESSING_ERROR,
                              "The image could not be processed (a server error; the operator can see it in the log)",
                              traceback.format_exc(limit=4)[-1500:]), False


def _retry_fresh(fd: int, parent: int, max_mb: int, policy: str, job: dict[str, Any]) -> None:
    """Run ``job``, which ran out of memory here, again in a fresh address
    space: exec this worker anew with the job as its first (same pid, same
    socket: the supervisor sees one job taking longer). Returns only if the
    exec failed.

    Why: a worker that has run jobs holds address space a fresh one does
    not (freed memory the heap keeps, holes a small live allocation pins at
    the top of the heap, which malloc_trim cannot return), so an image near
    the cap can fail in it and pass in a fresh one. Measured (cap 256 MB, an
    8000x4499 RGBA PNG that a fresh worker processes with 3 MB to spare):
    after an animated GIF re-encoded to GIF, a worker's address space stayed
    55 MB above its baseline for its next 20 jobs and the PNG failed in
    every one of them. The retried process runs the job first, so a job is
    tried at most twice; one that fails for memory there is too large for
    any worker."""
    try:
        os.set_inheritable(fd, True)
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.execv(sys.executable, [sys.executable, "-m", "imgworker.worker", str(fd), str(parent), str(max_mb),
                                  policy, json.dumps(job)])
    except (OSError, ValueError):
        pass  # report the failure as it is


def _cap_memory(max_mb: int) -> None:
    """A hard ceiling on our address space: a pathological image gets a
    MemoryError (the job fails with IMAGE_TOO_LARGE and this worker lives on)
    long before the host or the service's cgroup runs out of memory."""
    if max_mb > 0:
        limit = max_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


_POLICIES = {"idle": "SCHED_IDLE", "batch": "SCHED_BATCH"}  # "normal": the default, SCHED_OTHER


def _schedule(policy: str) -> None:
    """Move to the CPU scheduling policy WORKER_SCHEDULING names (Linux).

    ``idle`` (the default), SCHED_IDLE: we run only on CPU time no normal
    process wants, so the API's and the supervisor's threads preempt a busy
    worker the moment they wake (the API's p99 under load went from 9-11 ms
    to 4-6 ms, at the same throughput: the workers still take every idle
    cycle). On a host whose other work fills the cores the workers wait;
    the supervisor does not count that wait against JOB_TIMEOUT_MS (see
    Supervisor.murder_workers). ``batch``, SCHED_BATCH: full nice-0 share,
    but no wake-up preemption of others. Needs no privilege; where the call
    is refused (another OS, a seccomp filter that returns an error) the
    worker runs with the default policy."""
    name = _POLICIES.get(policy)
    if name is None:
        return
    try:
        os.sched_setscheduler(0, getattr(os, name), os.sched_param(0))
    except (AttributeError, OSError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fd, parent = int(argv[0]), int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    _die_with_parent(parent)
    max_mb = int(argv[2]) if len(argv) > 2 else 0
    _cap_memory(max_mb)
    heap.keep_freed_memory()
    policy = argv[3] if len(argv) > 3 else "normal"
    _schedule(policy)  # before any thread starts: threads inherit the policy
    retried = json.loads(argv[4]) if len(argv) > 4 else None  # a job to run first (_retry_fresh)
    sock = socket.socket(fileno=fd)
    import PIL.Image  # noqa: F401  (warm the import before the first job)

    if retried is None:
        try:
            send(sock, {"ready": os.getpid()})
        except OSError:  # the supervisor stopped while we started: nothing to report, no traceback
            return 1
    fresh = True  # no job has run in this address space yet
    while True:
        if retried is not None:
            job, retried = retried, None
        else:
            _wait_for_job(sock)
            try:
                job = recv(sock)
            except (OSError, ValueError):
                return 1
            if job is None:
                return 0
        outcome, out_of_memory = run_job(job)
        if out_of_memory and not fresh:
            _retry_fresh(fd, parent, max_mb, policy, job)
        fresh = False
        outcome["rssMb"] = _rss_after_job(max_mb)
        try:
            send(sock, outcome)
        except OSError:
            return 1


if __name__ == "__main__":
    sys.exit(main())
