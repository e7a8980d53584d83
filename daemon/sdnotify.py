"""systemd's notify protocol: a few lines over a Unix datagram socket, no dependency.

The watchdog is pinged only from a healthy main loop, so a hung agent gets restarted.
"""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send ``message`` (READY=1, WATCHDOG=1, STOPPING=1, STATUS=...) if systemd listens."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False
