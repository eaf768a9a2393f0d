"""The tasks' mount namespace: the host's mounts, with a /proc of its own mounted
``hidepid=invisible``, so that a task user lists and reads only its own processes (other tenants'
command lines often carry secrets: storage URLs with their signatures, tokens).

One namespace serves every task (entering it costs the launcher a few microseconds; a namespace per
task costs ~150 µs). It receives the host's later mounts where the host shares them; where the
host's mounts are private (hosts without systemd) a copy would go stale, so the host's mount table
is watched (``poll`` on /proc/self/mountinfo says when it changed, one system call per task start)
and a changed one gets a fresh namespace: a filesystem an operator or an elevated start task
mounts reaches every task started after it."""

from __future__ import annotations

import os
import select
import threading
import time

import trio

from . import spawn as fast

RETIRE_S = 10.0  # a replaced namespace's descriptor stays open this long (see TaskMounts)
TICK_S = 1.0  # how often `keep` looks while no task starts


class TaskMounts:
    """Hands out the descriptor tasks enter (`fd`), made anew when the host's mount table changed.
    A replaced descriptor is closed only RETIRE_S later: a start that read it just before (and
    waits in the launcher thread's queue) must not find its number closed, or reused."""

    def __init__(self) -> None:
        self._table = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._watch = select.poll()
            self._watch.register(self._table, select.POLLPRI)
            self._fd = fast.task_mntns()  # OSError: the host refuses (see fast.task_mntns)
        except BaseException:
            os.close(self._table)
            raise
        self._retired: list[tuple[float, int]] = []
        self._lock = threading.Lock()  # starts are prepared on the loop and in worker threads

    def fd(self) -> int:
        with self._lock:
            if self._fd >= 0 and self._watch.poll(0):  # the table changed since the last look
                self._refresh()
            return self._fd

    async def keep(self) -> None:
        """Also while no task starts: remake the namespace when the host's mounts changed, and
        close replaced ones. A namespace pins every file system mounted in it: on a host whose
        mounts are private, an operator's umount would otherwise leave the disk in use here."""
        while True:
            await trio.sleep(TICK_S)
            self.tick()

    def tick(self) -> None:
        self.fd()
        with self._lock:
            self._close_retired()

    def _refresh(self) -> None:
        try:
            fresh = fast.task_mntns()
        except OSError:
            return  # tasks keep the last namespace: hidden processes matter more than new mounts
        self._retired.append((time.monotonic(), self._fd))
        self._fd = fresh
        self._close_retired()

    def _close_retired(self) -> None:
        now = time.monotonic()
        for when, old in [r for r in self._retired if now - r[0] >= RETIRE_S]:
            os.close(old)
            self._retired.remove((when, old))

    def close(self) -> None:
        with self._lock:
            for fd in (self._fd, self._table, *(old for _when, old in self._retired)):
                if fd >= 0:
                    os.close(fd)
            self._retired.clear()
            self._fd = self._table = -1
