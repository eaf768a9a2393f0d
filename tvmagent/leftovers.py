"""What an agent killed outright left on the host after its TVM root was deleted too.

An agent killed outright (SIGKILL, OOM, a crash) keeps its task cgroups, perhaps with tasks still
running in them, and its pool group (`tvmp-*`, in /etc/group): its restart on the same root
removes them (the group is named in the root). When the root is deleted instead, no restart comes,
and they stayed: the group for good, the cgroups and their processes until the next boot. So every
agent records itself here, one file per root: the root, its cgroup directories, its pool group,
and its pid, start time and boot (so a pid reused, or reused after a reboot, is not taken for it).
When an agent starts, it removes what the agents of deleted roots that no longer run left: their
cgroups (killing what runs in them), then their groups, unless a process still has the group (its
number must not go to another pool's group while something holds it). A record whose root still
exists is left for that root's restart.

Blocking (files, cgroupfs, groupdel): call at start or from a worker thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable

from . import _cgroups, isolation
from .nftowners import start_time

log = logging.getLogger("tvm.agent")

# Persistent, unlike /run: /etc/group outlives a reboot.
RECORDS_DIR = "/var/lib/tvm-batch/agents"
_CGROUP_FS = "/sys/fs/cgroup/"


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _path(root: str, directory: str) -> str:
    return os.path.join(directory, hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:24])


def record(
    root: str, layout: _cgroups.CgroupLayout, prefix: str, group: str, directory: str = RECORDS_DIR
) -> None:
    """This process is the agent of `root`, its task cgroups are under `prefix` in `layout`, its
    pool group is `group` ("" for none). Written before what it names is made."""
    pid = os.getpid()
    body = {
        "root": os.path.realpath(root),
        "cgroups": [os.path.join(b, _cgroups.sanitize_name(prefix)) for b in layout.bases()],
        "group": group,
        "pid": pid,
        "start": start_time(pid),
        "boot": boot_id(),
    }
    path = _path(root, directory)
    for attempt in range(3):
        os.makedirs(directory, mode=0o700, exist_ok=True)
        try:
            fd = os.open(
                path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600
            )
            break
        except FileNotFoundError:  # the last agent to stop removed the directory just now
            if attempt == 2:
                raise
    with os.fdopen(fd, "w") as f:
        json.dump(body, f)
    os.replace(path + ".tmp", path)


def forget(root: str, directory: str = RECORDS_DIR) -> None:
    """The agent of `root` left nothing (it stopped and removed its cgroups and group). The last
    record gone, the directory goes too (and its parent, if that is empty): nothing of the agents
    stays on a host where none runs."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_path(root, directory))
    with contextlib.suppress(OSError):  # another agent's record, or being written: it stays
        os.rmdir(directory)
        os.rmdir(os.path.dirname(directory))


def _alive(rec: dict) -> bool:
    return rec.get("boot") == boot_id() and start_time(int(rec.get("pid", 0))) == rec.get("start")


def gid_in_use(gid: int) -> bool:
    """A live process on the host has `gid` as its group or among its supplementary groups."""
    want = str(gid)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "status")) as f:
                for line in f:
                    if line.startswith("State:") and line.split()[1:2] in (["Z"], ["X"]):
                        break  # killed, not yet reaped: it reaches nothing any more
                    if line.startswith(("Gid:", "Groups:")) and want in line.split()[1:]:
                        return True
        except OSError:
            continue  # it ended meanwhile
    return False


def remove_task_cgroups(prefix_dirs: list[str], wait: float = 2.0) -> bool:
    """Kill what runs in the task cgroups under `prefix_dirs` (an agent's cgroup prefix in each
    hierarchy) and remove them, then the prefixes; True when all the task cgroups went. A cgroup
    can go only once the kernel has seen its processes exit: retried for up to `wait` seconds."""
    pending: list[str] = []
    for p in prefix_dirs:
        if not p.startswith(_CGROUP_FS) or ".." in p.split("/"):
            continue  # not a cgroup directory: not ours to touch
        with contextlib.suppress(OSError):
            pending += [e.path for e in os.scandir(p) if e.is_dir(follow_symlinks=False)]
    deadline = time.monotonic() + wait
    while True:  # killed processes take a moment to leave their cgroups
        pending = [d for d in pending if not _cgroups.kill_and_remove(d)]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for p in prefix_dirs:
        if p.startswith(_CGROUP_FS):
            with contextlib.suppress(OSError):
                os.rmdir(p)
    return not pending


def sweep(directory: str = RECORDS_DIR, gone: Callable[[str], bool] | None = None) -> list[str]:
    """Remove what the agents of deleted roots that no longer run left; returns what was removed
    (cgroup directories and groups). Records it could not finish stay for the next sweep.
    `gone(root)`: roots to take as deleted although they exist (a test run's own, at its end)."""
    removed: list[str] = []
    try:
        names = [e.name for e in os.scandir(directory) if e.is_file() and "." not in e.name]
    except FileNotFoundError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path) as f:
                rec = json.load(f)
            root = str(rec["root"])
            if _alive(rec) or (os.path.lexists(root) and not (gone is not None and gone(root))):
                continue
            cgroups = [str(p) for p in rec.get("cgroups", [])]
            group = str(rec.get("group", ""))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot read agent record %s: %s", path, exc)
            continue
        done = remove_task_cgroups(cgroups)
        removed += [c for c in cgroups if not os.path.exists(c)]
        if group:
            gid = isolation.group_gid(group)
            if gid is not None and gid_in_use(gid):
                log.warning("pool group %s kept: a process still has it", group)
                done = False
            elif gid is not None:
                try:
                    isolation.remove_group(group)
                    removed.append(group)
                except (OSError, ValueError) as exc:
                    log.warning("pool group %s not removed: %s", group, exc)
                    done = False
        if done:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return removed
