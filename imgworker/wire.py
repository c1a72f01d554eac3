"""The supervisor <-> worker wire format: length-prefixed JSON over a
socketpair (never pickle: a worker that a hostile image managed to subvert
must not be able to run code in the supervisor), and the messages it carries.

Worker -> supervisor, once started:  ``{"ready": pid}``
Supervisor -> worker, one job:        ``{"id", "input", "outDir", "options", "limits"}``
Worker -> supervisor, its outcome:   ``{"id", "ok": true, "outcome": {Outcome fields}, "rssMb"}``
                                      or ``{"id", "ok": false, "code", "message", "detail", "rssMb"}``
EOF on the socket means "exit" (to the worker) or "dead" (to the supervisor).
Whether a failure is retried is the code's business (model.ErrorCode), not the worker's.
"""

from __future__ import annotations

import json
import socket
import struct
from dataclasses import dataclass
from typing import Any

from .limits import Limits
from .model import ErrorCode, Outcome

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


def job_message(job_id: str, input_path: str, out_dir: str, options: dict[str, Any], limits: Limits) -> dict[str, Any]:
    return {"id": job_id, "input": input_path, "outDir": out_dir, "options": options, "limits": limits.to_wire()}


def done_message(job_id: str, outcome: Outcome) -> dict[str, Any]:
    return {"id": job_id, "ok": True, "outcome": outcome.to_wire()}


def failed_message(job_id: str, code: ErrorCode, message: str, detail: str | None = None) -> dict[str, Any]:
    """``message`` is for the client; ``detail`` (decoder internals, paths) for the log only."""
    return {"id": job_id, "ok": False, "code": str(code), "message": message, "detail": detail}


@dataclass(frozen=True)
class Report:
    """A worker's answer for one job, checked: ``outcome`` on success, else
    ``code`` and ``message``; ``rss_mb`` is the worker's size afterwards."""

    job_id: str
    rss_mb: int
    outcome: Outcome | None = None
    code: ErrorCode | None = None
    message: str = ""
    detail: str | None = None


def parse_report(msg: dict[str, Any]) -> Report:
    """A :class:`Report` from a worker's outcome message. Raises ValueError
    when the message is not one (the supervisor then treats the worker as
    broken)."""
    rss = msg.get("rssMb") or 0
    if not isinstance(rss, int) or not isinstance(msg.get("id"), str):
        raise ValueError("bad outcome message")
    if msg.get("ok") is True:
        return Report(msg["id"], rss, outcome=Outcome.from_wire(msg.get("outcome")))
    detail = msg.get("detail")
    return Report(msg["id"], rss, code=ErrorCode.parse(str(msg.get("code"))), message=str(msg.get("message"))[:1000],
                  detail=str(detail)[:2000] if detail else None)
