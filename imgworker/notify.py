"""systemd's notify protocol (sd_notify), written out: a datagram to
$NOTIFY_SOCKET. With ``Type=notify`` the unit counts as started only once
the supervisor is ready, and ``WatchdogSec=`` restarts a supervisor whose
main loop stops turning. Without $NOTIFY_SOCKET every call does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(*fields: str) -> bool:
    """Send ``KEY=VALUE`` fields (READY=1, WATCHDOG=1, STATUS=..., STOPPING=1)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(address)
            s.sendall("\n".join(fields).encode())
        return True
    except OSError:
        return False

