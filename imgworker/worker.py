"""A pool worker: a fresh interpreter that runs one job at a time.

Started by the supervisor as ``python -m imgworker.worker FD PPID MAX_MB``
in its own process group, with one end of a socketpair as FD and an address
space capped at MAX_MB. It opens no database (the
supervisor writes every outcome) and inherits no connection (close_fds).

Protocol: length-prefixed JSON messages (never pickle: a worker that a
hostile image managed to subvert must not be able to run code in the
supervisor). Supervisor -> worker: a job. Worker -> supervisor: its outcome.
EOF on the socket means "exit".
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import socket
import struct
import sys
import time
from typing import Any

_HEADER = struct.Struct(">I")
MAX_MESSAGE = 16 * 2**20


def send(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(_HEADER.pack(len(data)) + data)


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> Any | None:
    """One message, or None at EOF. Raises ValueError on a malformed frame."""
    head = _read_exact(sock, _HEADER.size)
    if head is None:
        return None
    (length,) = _HEADER.unpack(head)
    if length > MAX_MESSAGE:
        raise ValueError(f"message of {length} bytes")
    body = _read_exact(sock, length)
    if body is None:
        return None
    return json.loads(body)


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


def _rss_mb() -> int:
    """Current resident set size (what recycling is decided on, not the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job message through the pipeline; returns the outcome message."""
    from .errors import ImageError
    from .imaging import Limits, process

    options = dict(job["options"])
    if job.get("testHooks") and options.get("_testSleepMs"):
        # Test-only stand-in for a decode stuck in C code. The supervisor sets
        # testHooks only under APP_ENV=test and the API never stores `_` options.
        time.sleep(options["_testSleepMs"] / 1000)
    options = {k: v for k, v in options.items() if not k.startswith("_")}
    try:
        result = process(job["input"], job["outDir"], job["id"], options, Limits(**job["limits"]), job["name"])
        return {"id": job["id"], "ok": True, "result": result}
    except ImageError as exc:
        return {"id": job["id"], "ok": False, "code": exc.code, "message": exc.message, "transient": exc.transient,
                "detail": exc.detail}
    except MemoryError:
        return {"id": job["id"], "ok": False, "code": "OUT_OF_MEMORY",
                "message": "The worker ran out of memory processing this image", "transient": True}
    except Exception as exc:  # a bug, not the image's fault: report it, keep the worker
        import traceback

        return {"id": job["id"], "ok": False, "code": "PROCESSING_ERROR",
                "message": "The image could not be processed (a server error; the operator can see it in the log)",
                "transient": False, "detail": traceback.format_exc(limit=4)[-1500:]}


def _cap_memory(max_mb: int) -> None:
    """A hard ceiling on our address space: a pathological image gets a
    MemoryError (the job fails with IMAGE_TOO_LARGE and this worker lives on)
    long before the host or the service's cgroup runs out of memory."""
    if max_mb > 0:
        limit = max_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fd, parent = int(argv[0]), int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    _die_with_parent(parent)
    _cap_memory(int(argv[2]) if len(argv) > 2 else 0)
    sock = socket.socket(fileno=fd)
    import PIL.Image  # noqa: F401  (warm the import before the first job)

    try:
        send(sock, {"ready": os.getpid()})
    except OSError:  # the supervisor stopped while we started: nothing to report, no traceback
        return 1
    while True:
        try:
            job = recv(sock)
        except (OSError, ValueError):
            return 1
        if job is None:
            return 0
        outcome = run_job(job)
        outcome["rssMb"] = _rss_mb()
        outcome["maxRssMb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        try:
            send(sock, outcome)
        except OSError:
            return 1


if __name__ == "__main__":
    sys.exit(main())
