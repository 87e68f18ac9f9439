"""systemd's notify protocol, without a dependency: READY=1 once, WATCHDOG=1 from the agent's loops.

A unit with `Type=notify` and `WatchdogSec=` passes NOTIFY_SOCKET (a datagram socket path, or an
abstract one starting with "@") and WATCHDOG_USEC; outside systemd every call is a no-op.
"""
import os
import socket
import time
from typing import Optional


def notify(message: str) -> bool:
    """Send one notification ("READY=1", "WATCHDOG=1", "STATUS=..."); False when not under systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError:
            return False
    return True


class Watchdog:
    """Feeds systemd's watchdog at most every half of WATCHDOG_USEC (call `ping` as often as you like)."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        mine = pid is None or pid == str(os.getpid())
        self.interval_s: Optional[float] = int(usec) / 2e6 if usec and mine else None
        self._last = 0.0

    def ping(self) -> None:
        if self.interval_s is None:
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            notify("WATCHDOG=1")
