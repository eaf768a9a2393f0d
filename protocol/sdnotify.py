"""sd_notify in pure Python, plus a watchdog policy and its Trio pinger.

systemd recommends reimplementing the tiny notify protocol rather than linking libsystemd:
one AF_UNIX datagram of newline-separated ``KEY=VALUE`` lines sent to ``$NOTIFY_SOCKET``
(a path, or ``@name`` for an abstract socket).
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import trio

__all__ = ["SYSTEMD_ENV_VARS", "WatchdogPolicy", "notify", "watchdog_loop"]

# Variables systemd hands the service; strip them from task environments so tasks cannot
# impersonate the agent (NotifyAccess=main already ignores them, this keeps the env tidy).
SYSTEMD_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: str) -> str | None:
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def notify(*states: str) -> bool:
    """Send ``states`` (e.g. ``"READY=1"``, ``"STATUS=connected"``) in one datagram.

    Returns False when ``NOTIFY_SOCKET`` is unset or not a path/@abstract name (not running
    under systemd), and also when the send fails: a notification problem must never take the
    service down. Raises ValueError for malformed states, which are programming errors.
    """
    if not states:
        raise ValueError("notify() needs at least one KEY=VALUE state")
    for state in states:
        if "=" not in state or state.startswith("=") or "\n" in state:
            raise ValueError(f"sd_notify state must be one KEY=VALUE line, got {state!r}")
    addr = _address(os.environ.get("NOTIFY_SOCKET", ""))
    if addr is None:
        return False
    payload = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # never block the event loop: a full receive queue means "drop this one"
            sock.setblocking(False)
            sock.sendto(payload, addr)
    except OSError:
        return False
    return True


@dataclass
class WatchdogPolicy:
    """When to send WATCHDOG=1. Pure: callers pass ``now`` (any monotonic clock).

    ``interval`` is the pet period in seconds (half of WATCHDOG_USEC, as systemd advises),
    or None when the watchdog is off.
    """

    interval: float | None = None
    last_pet: float | None = None

    def __post_init__(self) -> None:
        if self.interval is not None and not (math.isfinite(self.interval) and self.interval > 0):
            raise ValueError(f"watchdog interval must be a positive number, got {self.interval}")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> WatchdogPolicy:
        """Read WATCHDOG_USEC / WATCHDOG_PID (defaults: ``os.environ``, ``os.getpid()``)."""
        env = os.environ if environ is None else environ
        raw_usec = env.get("WATCHDOG_USEC", "")
        if not raw_usec:
            return cls()
        try:
            usec = int(raw_usec)
        except ValueError:
            raise ValueError(
                f"WATCHDOG_USEC must be a whole number of microseconds, got {raw_usec!r}"
            ) from None
        if usec <= 0:
            raise ValueError(f"WATCHDOG_USEC must be positive, got {usec}")
        raw_pid = env.get("WATCHDOG_PID", "")
        if raw_pid:
            try:
                watched = int(raw_pid)
            except ValueError:
                raise ValueError(f"WATCHDOG_PID must be a process id, got {raw_pid!r}") from None
            # the watchdog was meant for another process (we are a child of the service)
            if watched != (os.getpid() if pid is None else pid):
                return cls()
        return cls(interval=usec / 2 / 1_000_000)

    @property
    def enabled(self) -> bool:
        return self.interval is not None

    def next_due(self) -> float:
        """Time of the next pet; -inf when one has never been sent (due at once)."""
        if self.interval is None:
            return math.inf
        if self.last_pet is None:
            return -math.inf
        return self.last_pet + self.interval

    def due(self, now: float) -> bool:
        return self.enabled and now >= self.next_due()

    def petted(self, now: float) -> None:
        self.last_pet = now


async def watchdog_loop(policy: WatchdogPolicy) -> None:
    """Pet the systemd watchdog forever; returns at once when it is disabled.

    Run it in the same nursery as the agent's main loops, so a wedged event loop stops
    petting and systemd restarts the service.
    """
    if not policy.enabled:
        return
    while True:
        now = trio.current_time()
        if policy.due(now):
            notify("WATCHDOG=1")
            policy.petted(now)
        await trio.sleep_until(policy.next_due())
