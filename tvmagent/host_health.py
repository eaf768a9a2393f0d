"""Host state the agent adopts is checked, repaired where it can be, and reported where it cannot.

An agent inherits what earlier runs left on the host: the TVM root's directories, task users and
their groups, cgroups. Trusting them blindly wedged TVMs without a word outside the agent's log.
Here each problem is either repaired (and logged) or kept in `HostHealth`, which every heartbeat
carries to the coordinator (`Heartbeat.unusable`: the TVM is `unusable` with that reason until it
is fixed; `Heartbeat.degraded`: degraded modes found while running). `tvm status`, the TVM's REST
record and the CLI show both.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from typing import Any

import trio

from . import _cgroups

log = logging.getLogger("tvm.agent")

# The TVM root's directories and their modes: `shared/` is every task's (sticky: only owners
# delete), `tasks/` is entered by task users to reach their own directories below. `start/` and
# `certs/` are given to the start task's user and the pool's group later (None: only checked to
# be real directories).
TVM_DIRS: dict[str, int | None] = {"tasks": 0o755, "shared": 0o1777, "start": None, "certs": None}
# Where tasks run as users of their own, shared/ and tasks/ are the pool group's (given at each
# join): no other user of the host lists or reads them (a task of another TVM on the same host is
# one), as on separate machines. shared/ is setgid, so what tasks leave there is the group's, and
# sticky, so only a file's owner deletes it; tasks/ is entered and listed, never written, by tasks.
SHARED_GROUP_MODE = 0o3770
TASKS_GROUP_MODE = 0o750

BROKEN_TASK_USER = "broken-task-user"
PORTS_UNFENCED = "ports-unfenced"


class AdoptError(Exception):
    """Host state the agent needs is broken and cannot be repaired from here."""


class HostHealth:
    """What is broken (the TVM cannot run tasks) and what is degraded, by area."""

    def __init__(self) -> None:
        self.problems: dict[str, str] = {}  # area -> why the TVM cannot work
        self.degraded: dict[str, str] = {}  # code -> "<code>: <why>"

    def broken(self, area: str, why: str) -> bool:
        """Record a problem; True when it is new or changed (worth a heartbeat now)."""
        if self.problems.get(area) == why:
            return False
        log.error("TVM unusable: %s: %s", area, why)
        self.problems[area] = why
        return True

    def fixed(self, area: str) -> bool:
        if self.problems.pop(area, None) is None:
            return False
        log.warning("TVM usable again: %s repaired", area)
        return True

    def set_degraded(self, code: str, why: str | None) -> None:
        """`why` None: the mode no longer holds."""
        if why is None:
            self.degraded.pop(code, None)
        elif self.degraded.get(code) != f"{code}: {why}":
            log.warning("degraded: %s: %s", code, why)
            self.degraded[code] = f"{code}: {why}"

    def unusable_reason(self) -> str:
        return "; ".join(f"{area}: {why}" for area, why in sorted(self.problems.items()))

    def degraded_modes(self) -> list[str] | None:
        """For the heartbeat: None while nothing was found at run time (Hello.degraded says the rest)."""
        return sorted(self.degraded.values()) if self.degraded else None


def adopt_tvm_dirs(root: str, group_shared: bool = False) -> list[str]:
    """Make the TVM root's directories real directories of this agent with their modes (the group
    modes of shared/ and tasks/ when `group_shared`). What is in their place otherwise (a symlink, a file,
    another user's directory: left by an earlier run or an older agent; nobody else can write in
    the 0711 root) is replaced or taken back. Returns what was repaired; AdoptError when something
    cannot be."""
    repaired: list[str] = []
    me = os.geteuid()
    dirs = (
        dict(TVM_DIRS, shared=SHARED_GROUP_MODE, tasks=TASKS_GROUP_MODE)
        if group_shared
        else TVM_DIRS
    )
    for name, mode in dirs.items():
        path = os.path.join(root, name)
        try:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                _make(path, mode)
                continue
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                # Never followed: a symlink here would hand tasks' files to wherever it points.
                os.unlink(path)
                _make(path, mode)
                repaired.append(f"{path} was not a directory: replaced")
                continue
            if mode is None:
                continue
            if st.st_uid != me:
                os.lchown(path, me, -1)
                repaired.append(f"{path} belonged to uid {st.st_uid}: taken back")
            if stat.S_IMODE(st.st_mode) != mode:
                os.chmod(path, mode)
                repaired.append(f"{path} had mode {stat.S_IMODE(st.st_mode):o}: now {mode:o}")
        except OSError as exc:
            raise AdoptError(
                f"TVM directory {path} cannot be repaired: {exc.strerror or exc}"
            ) from None
    for line in repaired:
        log.warning("adopted host state repaired: %s", line)
    return repaired


def _make(path: str, mode: int | None) -> None:
    os.mkdir(path, 0o755 if mode is None else mode)
    if mode is not None:
        os.chmod(path, mode)  # mkdir's mode passes through the umask


RECHECK_INTERVAL = 10.0


def runtime_degraded(health: HostHealth, isolation: Any, slot_users: Any) -> None:
    """Degraded modes that appear while the agent runs (for the next heartbeat)."""
    low, high = getattr(isolation, "_fence_range", (0, 0))
    health.set_degraded(
        PORTS_UNFENCED,
        f"ports {low}-{high} admit anyone (no nftables fence and no user-space gate)"
        if getattr(isolation, "ports_unfenced", False)
        else None,
    )
    broken = dict(getattr(slot_users, "broken", {}) or {})
    health.set_degraded(
        BROKEN_TASK_USER,
        "; ".join(f"{name} skipped: {why}" for name, why in sorted(broken.items()))
        if broken
        else None,
    )


def probe_cgroups(layout: _cgroups.CgroupLayout, prefix: str) -> str | None:
    """Create and remove one task cgroup the way tasks get theirs; why that fails, or None. A host
    whose cgroups were found usable at start but refuse a task's (a leftover in the way, a
    delegation taken back) would fail every task: better said once as the TVM's state."""
    if not layout.usable:
        return None  # said at start as a degraded mode (no-cgroups)
    probe = _cgroups.TaskCgroup(layout, prefix, f"probe-{os.getpid()}")
    try:
        probe.create()
    except OSError as exc:
        return f"cannot create a task cgroup under {prefix}: {exc.strerror or exc}"
    if not probe.exists():  # create() takes a file in the prefix's place for a made directory
        probe.remove()
        parents = sorted({os.path.dirname(d) for d in probe.dirs.values() if not os.path.isdir(d)})
        return f"cannot create a task cgroup: {', '.join(parents)} is not a directory"
    left = probe.remove()
    return f"cannot remove a task cgroup: {'; '.join(left)}" if left else None


def check_user_database(health: HostHealth, etc: str = "/etc") -> bool:
    """Task users, pool groups and node users are made with useradd and groupadd, which write
    `etc`: read-only (a mount namespace, e.g. a systemd unit's ProtectSystem=full), no TVM of this
    agent could join a pool. True when the finding changed."""
    if os.access(os.path.join(etc, "group"), os.W_OK) and os.access(etc, os.W_OK):
        return health.fixed("user-database")
    return health.broken(
        "user-database",
        f"{etc} is read-only to the agent (a systemd unit's ProtectSystem=full or strict?): task "
        "users and pool groups cannot be made; run the agent with /etc writable",
    )


def check_cgroups(health: HostHealth, layout: _cgroups.CgroupLayout, prefix: str) -> bool:
    """Probe and record; True when the finding changed."""
    why = probe_cgroups(layout, prefix)
    return health.broken("cgroups", why) if why else health.fixed("cgroups")


async def recheck_loop(
    health: HostHealth,
    layout: _cgroups.CgroupLayout,
    prefix: str,
    retry_join: Callable[[], None],
    interval: float = RECHECK_INTERVAL,
) -> None:
    """Look again at what was found broken (a repaired host needs no agent restart) and set up
    the TVM again if that stopped its join."""
    while True:
        await trio.sleep(interval)
        if "cgroups" in health.problems:
            await trio.to_thread.run_sync(check_cgroups, health, layout, prefix)
        retry_join()
