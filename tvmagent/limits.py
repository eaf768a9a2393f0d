"""The agent's per-task resource limits: the memory share, the process limit
(pids cgroup, see sandbox.py for its RLIMIT_NPROC fallback) and the TVM's disk limit.

The disk limit is a periodic check, not a quota: about every DISK_CHECK_INTERVAL seconds (while
tasks run) the agent adds up the disk blocks of its running tasks' directories and of what their
users own in /tmp and /var/tmp (each inode once, symlinks not followed, at most
DISK_SCAN_MAX_ENTRIES entries per check) and, while the total is over
the pool's limit, kills the task holding the most and fails it with ``DiskLimitExceeded``; a task
that ends while the total is over the limit fails the same way. A task can therefore write past the
limit for about a second (plus the scan) before it is stopped; its files stay (they no longer count
once it has ended).
"""

from __future__ import annotations

import logging
import os
import stat

import trio

from protocol import messages as pm

from .state import DISK_LIMIT_CODE, disk_message
from .taskenv import task_dir

log = logging.getLogger("tvm.agent")

DEFAULT_TASK_PIDS = 4096  # per task slot, when the pool does not say
DISK_CHECK_INTERVAL = 1.0
DISK_SCAN_MAX_ENTRIES = (
    200_000  # a task with more files is measured on the first ones (a lower bound)
)
# A finished task with at most this many files is measured on the event loop (no thread hop).
QUICK_SCAN_ENTRIES = 64
# Where a task's user can write outside its directory on disk (/dev/shm is memory: its pages are
# charged to the task's memory cgroup). What it leaves there is swept when the task ends.
SCRATCH_ROOTS = ("/tmp", "/var/tmp")


def _blocks(
    tops: list[str],
    seen: set[tuple[int, int]],
    budget: list[int],
    uids: frozenset[int] | None = None,
) -> dict[int, int]:
    """Bytes of disk blocks under `tops` per owning uid (symlinks not followed, each inode once
    across calls sharing `seen`; stops when `budget[0]` entries have been looked at). With `uids`:
    only theirs, looked for only where they could have written (directories they own or that are
    world-writable, as the uid sweep does)."""
    out: dict[int, int] = {}
    stack = list(tops)
    while stack and budget[0] > 0:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                for e in it:
                    budget[0] -= 1
                    if budget[0] <= 0:
                        break
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue  # gone meanwhile
                    counted = uids is None or st.st_uid in uids
                    if counted and (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        out[st.st_uid] = out.get(st.st_uid, 0) + st.st_blocks * 512
                    if stat.S_ISDIR(st.st_mode) and (counted or st.st_mode & stat.S_IWOTH):
                        stack.append(e.path)
        except OSError:
            continue
    return out


def dir_usage(path: str, seen: set[tuple[int, int]], budget: list[int]) -> int:
    """Bytes of disk blocks under ``path`` (see `_blocks`)."""
    return sum(_blocks([path], seen, budget).values())


def scratch_usage(
    uids: frozenset[int],
    seen: set[tuple[int, int]],
    budget: list[int],
    roots: tuple[str, ...] = SCRATCH_ROOTS,
) -> dict[int, int]:
    """Bytes of disk blocks `uids` own under `roots`, per uid."""
    found = _blocks(list(roots), seen, budget, uids)
    return {uid: found.get(uid, 0) for uid in uids}


def tasks_usage(
    root: str, keys: list[str], scratch_roots: tuple[str, ...] = SCRATCH_ROOTS
) -> tuple[dict[str, int], bool]:
    """(bytes per running task, whether the scan stopped early at DISK_SCAN_MAX_ENTRIES). A task
    holds its directory and what its user owns in the scratch roots; a user several running tasks
    share (`--task-user`) has that part split evenly between them. Root's files are nobody's."""
    seen: set[tuple[int, int]] = set()
    budget = [DISK_SCAN_MAX_ENTRIES]
    usage = {key: dir_usage(task_dir(root, key), seen, budget) for key in keys}
    owners: dict[int, list[str]] = {}
    for key in keys:
        try:
            uid = os.stat(task_dir(root, key)).st_uid  # the task's user while it runs
        except OSError:
            continue
        if uid != 0:
            owners.setdefault(uid, []).append(key)
    if owners:
        for uid, nbytes in scratch_usage(frozenset(owners), seen, budget, scratch_roots).items():
            for key in owners[uid]:
                usage[key] += nbytes // len(owners[uid])
    return usage, budget[0] <= 0


class TaskLimits:
    """The limits of the current TVM (from its JoinPool) and the checks against them. The decision
    which task the disk limit kills is the state machine's (`DiskMeasured`)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.task_memory_limit = 0  # per-task share of the VM size's memory (0: none)
        self.task_pids_limit = DEFAULT_TASK_PIDS
        self.disk_limit = 0  # bytes the running tasks of this TVM may hold (0: no limit)
        self._disk_scan_truncated_logged = False
        self._last_usage: dict[str, int] = {}  # running task -> bytes, as last measured

    def apply_join(self, msg: pm.JoinPool) -> None:
        # Memory of the VM size, shared equally by the TVM's task slots (a per-task cgroup limit).
        self.task_memory_limit = (
            msg.memory_limit_bytes // max(1, msg.slots) if msg.memory_limit_bytes else 0
        )
        self.task_pids_limit = msg.task_pids_limit or DEFAULT_TASK_PIDS
        self.disk_limit = msg.disk_limit_bytes
        if self.disk_limit:
            log.info(
                "disk limit: the running tasks of TVM %s may hold %d MiB (checked every %g s)",
                msg.tvm_name,
                self.disk_limit >> 20,
                DISK_CHECK_INTERVAL,
            )

    def process_limits(self) -> dict[str, int | None]:
        """ProcessSpec limits for a task or start task of this TVM."""
        return {
            "memory_limit_bytes": self.task_memory_limit or None,
            "pids_limit": self.task_pids_limit,
        }

    async def disk_verdict(self, key: str, others: list[str]) -> pm.Failure | None:
        """At a task's end: did the running tasks, this one included, go over the limit? (A task that
        writes and exits between two checks is caught here.)"""
        if not self.disk_limit:
            return None
        budget = [QUICK_SCAN_ENTRIES]
        mine = dir_usage(task_dir(self.root, key), set(), budget)
        if budget[0] > 0:  # small enough to have been measured whole, here
            rest = sum(self._last_usage.get(k, 0) for k in others if k != key)
            if mine + rest <= self.disk_limit // 2:
                return None  # far below: the exact count (a thread, every task) cannot say over
        usage, _ = await trio.to_thread.run_sync(
            tasks_usage, self.root, [key, *(k for k in others if k != key)]
        )
        total = sum(usage.values())
        if total <= self.disk_limit:
            return None
        return pm.Failure(
            category="UserError",
            code=DISK_LIMIT_CODE,
            message=disk_message(self.disk_limit, total, usage[key]),
        )

    async def measure(self, keys: list[str]) -> dict[str, int]:
        """Disk use of these running tasks (see the module docstring for how it is counted)."""
        usage, truncated = await trio.to_thread.run_sync(tasks_usage, self.root, keys)
        self._last_usage = usage
        if truncated and not self._disk_scan_truncated_logged:
            self._disk_scan_truncated_logged = True
            log.warning(
                "disk limit: more than %d files in the running tasks' directories; only the first "
                "ones are counted",
                DISK_SCAN_MAX_ENTRIES,
            )
        return usage
