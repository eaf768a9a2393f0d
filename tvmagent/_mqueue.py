"""Where the agent sees the host's POSIX message queues, to sweep a task user's.

A queue a task makes with ``mq_open`` outlives it (until ``mq_unlink``), messages and all, and the
next task of the same slot user opens it by name. The kernel lists queues only in an ``mqueue``
file system; hosts with systemd mount one at /dev/mqueue, others (this project's Debian machines)
do not. There the agent makes a mount of its own that is attached nowhere (``fsopen``/``fsmount``,
Linux 5.2): no mount table changes, and its directory is reached through the descriptor's
``/proc/self/fd`` path, which the sweep walks like any other root."""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger("tvm.agent")

MQUEUE = "/dev/mqueue"
# fsopen, fsconfig, fsmount: one number on every architecture (the unified table, Linux 5.2).
_FSOPEN, _FSCONFIG, _FSMOUNT = 430, 431, 432
_FSOPEN_CLOEXEC = _FSMOUNT_CLOEXEC = 1
_FSCONFIG_CMD_CREATE = 6
_MOUNT_ATTR_NOSUID_NODEV_NOEXEC = 0x2 | 0x4 | 0x8

_root: str | None = None


def root() -> str:
    """The path of the queues' directory: /dev/mqueue where it is an mqueue mount, else the agent's
    detached one (made once); /dev/mqueue (absent: nothing swept, said once) where neither is."""
    global _root
    if _root is None:
        _root = _find()
    return _root


def _is_mqueue_mount(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == path and fields[fields.index("-") + 1] == "mqueue":
                    return True
    except (OSError, IndexError, ValueError):
        pass
    return False


def _find() -> str:
    if _is_mqueue_mount(MQUEUE):
        return MQUEUE
    try:
        # "/.": the walk opens its roots without following a final symlink, which this one is
        return f"/proc/self/fd/{detached_mount()}/."
    except OSError as e:
        log.warning(
            "DEGRADED: task users' POSIX message queues are not swept between tasks (%s is not "
            "mounted and a private mqueue mount cannot be made: %s)",
            MQUEUE,
            e,
        )
        return MQUEUE


def detached_mount() -> int:
    """A descriptor of a new mqueue mount attached nowhere (root; OSError where refused)."""
    if platform.system() != "Linux":
        raise OSError("not Linux")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long

    def call(*args: object) -> int:
        res = int(libc.syscall(*args))
        if res < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return res

    fs = call(_FSOPEN, b"mqueue", _FSOPEN_CLOEXEC)
    try:
        call(_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0)
        return call(_FSMOUNT, fs, _FSMOUNT_CLOEXEC, _MOUNT_ATTR_NOSUID_NODEV_NOEXEC)
    finally:
        os.close(fs)
