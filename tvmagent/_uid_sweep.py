"""What a task user leaves behind, removed before its uid runs another task.

A task can write outside its own directory only where every user may: /tmp, /var/tmp, /dev/shm,
/dev/mqueue (and the TVM's shared/, which is meant to outlive tasks and is not touched here). A
0600 file left there would be readable by the next task that gets the same slot uid, so:

* ``kill_uid``: every process still running as the uid is SIGKILLed with ``kill(-1)`` sent *as
  that uid* (the kernel then picks exactly the processes it may signal: real or saved uid equal),
  which needs no /proc scan and catches a process that forks meanwhile.
* ``sweep_uid``: the files the uid owns under those roots are unlinked. The walk works from
  directory descriptors (``unlinkat``, ``O_NOFOLLOW``), never follows a link, and descends only
  into directories the uid owns or that are world-writable: elsewhere it could not have created
  anything (a world-writable directory nested under a directory of someone else that is not
  world-writable is the one place it does not look). A directory of the uid that cannot be
  emptied (too deep, or someone else's file inside) is given to root with mode 0700, so the next
  task cannot enter it either.

Blocking: call from a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess

SWEEP_ROOTS = ("/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue")
MAX_DEPTH = 64
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def kill_uid(uid: int, gid: int) -> None:
    """SIGKILL every process whose real or saved uid is `uid` (twice: a fork may be in flight)."""
    if uid == 0:
        raise ValueError("refusing to kill every process of root")
    kill = shutil.which("kill", path="/usr/bin:/bin") or "/bin/kill"
    for _ in range(2):
        # user=/group= make CPython fork (not vfork) and drop to the uid before exec.
        subprocess.run(
            [kill, "-KILL", "--", "-1"],
            user=uid,
            group=gid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            close_fds=True,
        )


def sweep_uid(uid: int, roots: tuple[str, ...] = SWEEP_ROOTS) -> int:
    """Remove what `uid` owns under `roots`; returns how many entries were removed."""
    if uid == 0:
        raise ValueError("refusing to sweep root's files")
    removed = 0
    for root in roots:
        try:
            fd = os.open(root, _DIR_FLAGS)
        except OSError:
            continue  # not on this host
        try:
            removed += _sweep(fd, uid, 0)
        finally:
            os.close(fd)
    return removed


def _sweep(dfd: int, uid: int, depth: int) -> int:
    """Empty one directory (by fd) of `uid`'s entries; True-ish count of removals."""
    removed = 0
    try:
        with os.scandir(dfd) as it:
            names = [e.name for e in it]
    except OSError:
        return 0
    for name in names:
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            continue  # gone meanwhile
        if not stat.S_ISDIR(st.st_mode):
            if st.st_uid == uid:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dfd)  # a link itself, never its target
                    removed += 1
            continue
        mine = st.st_uid == uid
        if not mine and not st.st_mode & stat.S_IWOTH:
            continue  # the uid could not have created anything in there
        if depth < MAX_DEPTH:
            removed += _descend(dfd, name, st, uid, depth)
        if mine:
            try:
                os.rmdir(name, dir_fd=dfd)
                removed += 1
            except OSError:
                _neutralise(dfd, name, st)
    return removed


def _descend(dfd: int, name: str, st: os.stat_result, uid: int, depth: int) -> int:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except OSError:
        return 0  # replaced by a link or removed meanwhile
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return 0  # swapped between the look and the open
        return _sweep(fd, uid, depth + 1)
    finally:
        os.close(fd)


def _neutralise(dfd: int, name: str, st: os.stat_result) -> None:
    """A directory of the uid that could not be removed: root's, 0700, so no later task gets in."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except OSError:
        return
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            os.fchmod(fd, 0o700)
            os.fchown(fd, 0, 0)
    except OSError:
        pass
    finally:
        os.close(fd)


def cleanup_uid(uid: int, gid: int, kill: bool = True, roots: tuple[str, ...] = SWEEP_ROOTS) -> int:
    """Processes first (a live one could write again after the sweep), then files."""
    if kill:
        kill_uid(uid, gid)
    return sweep_uid(uid, roots)
