"""Wake-ups from the API to the supervisor: a datagram on an abstract Unix socket.

The API sends one byte after it enqueues a job, so an idle supervisor claims
it within milliseconds instead of at its next poll. The address is derived
from the database path, so every API and supervisor sharing a database (in
one process tree or in separate systemd units) find each other. Losing a
wake-up is harmless: the supervisor also polls.
"""

from __future__ import annotations

import hashlib
import os
import socket


def address(database_path: os.PathLike | str) -> bytes:
    digest = hashlib.sha1(os.path.realpath(database_path).encode()).hexdigest()[:20]
    return b"\0imgworker-" + digest.encode()


def notify(database_path: os.PathLike | str) -> None:
    """Best effort: never blocks, never raises."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.sendto(b"!", address(database_path))
    except OSError:
        pass


def listen(database_path: os.PathLike | str) -> socket.socket | None:
    """Bind the wake-up socket; None if another supervisor already holds it
    (that one is woken instead; we poll)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.bind(address(database_path))
    except OSError:
        s.close()
        return None
    s.setblocking(False)
    return s


def drain(s: socket.socket) -> None:
    try:
        while s.recv(64):
            pass
    except OSError:
        pass


class Listener:
    """The supervisor's end: ``fileno()`` for select, ``drain()`` when
    readable (True while the listener is usable), ``close()``."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    def bind(cls, database_path: os.PathLike | str) -> "Listener | None":
        sock = listen(database_path)
        return cls(sock) if sock is not None else None

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> bool:
        drain(self.sock)
        return True

    def close(self) -> None:
        self.sock.close()
