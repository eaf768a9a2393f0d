"""The tasks' mount namespace: the host's mounts, with a /proc of its own mounted
``hidepid=invisible``, so that a task user lists and reads only its own processes (other tenants'
command lines often carry secrets: storage URLs with their signatures, tokens).

One namespace serves every task (entering it costs the launcher a few microseconds; a namespace per
task costs ~150 µs). It receives the host's later mounts where the host shares them; where the
host's mounts are private (hosts without systemd), a copy would go stale, so the table is compared
at most once a second and a changed one gets a fresh namespace: a filesystem an operator mounts
reaches new tasks within a second either way."""

from __future__ import annotations

import os
import threading
import time

from . import spawn as fast

CHECK_S = 1.0
MOUNT_TABLE = "/proc/self/mountinfo"


def _mount_table() -> bytes:
    with open(MOUNT_TABLE, "rb") as f:
        return f.read()


class TaskMounts:
    """Hands out the descriptor tasks enter (`fd`), remade when the host's mount table changed.
    A replaced descriptor is closed only at the next replacement (≥ CHECK_S later), so a start
    that read it just before stays valid."""

    def __init__(self) -> None:
        self._seen = _mount_table()
        self._fd = fast.task_mntns()  # OSError: the host refuses (see fast.task_mntns)
        self._old = -1
        self._next = time.monotonic() + CHECK_S
        self._lock = threading.Lock()  # starts are prepared on the loop and in worker threads

    def fd(self) -> int:
        if time.monotonic() < self._next:
            return self._fd
        with self._lock:
            if time.monotonic() >= self._next:
                self._refresh()
            return self._fd

    def _refresh(self) -> None:
        self._next = time.monotonic() + CHECK_S
        try:
            table = _mount_table()
            if table == self._seen:
                return
            fresh = fast.task_mntns()
        except OSError:
            return  # tasks keep the last namespace: hidden processes matter more than new mounts
        self._seen = table
        if self._old >= 0:
            os.close(self._old)
        self._old, self._fd = self._fd, fresh

    def close(self) -> None:
        with self._lock:
            for fd in (self._old, self._fd):
                if fd >= 0:
                    os.close(fd)
            self._old = self._fd = -1
