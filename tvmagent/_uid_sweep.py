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
import fcntl
import os
import shutil
import stat
import subprocess
import time

from . import _ipc_sweep, _keyrings, _mqueue

SWEEP_ROOTS = ("/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", "/run/lock")
# Work a user scheduled for later (crontab, at): it would run as the uid outside the task's
# cgroup, after the task, perhaps while the uid runs another tenant's task. Task users are denied
# both (`deny_schedulers`); what one scheduled anyway (before the deny) is swept with its files,
# as is its mailbox (a task can mail itself where the host has a mail transfer agent).
SPOOLS = (
    "/var/spool/cron/crontabs",
    "/var/spool/cron/atjobs",
    "/var/spool/cron",
    "/var/spool/at",
    "/var/mail",
    "/var/spool/mail",
)
DENY_FILES = ("/etc/cron.deny", "/etc/at.deny")
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
    return sweep_uids(frozenset({uid}), roots)


def sweep_uids(
    uids: frozenset[int], roots: tuple[str, ...] = SWEEP_ROOTS, spools: tuple[str, ...] = SPOOLS
) -> int:
    """`sweep_uid` for several uids in one walk (the walk, not the uids, is the cost); and their
    files directly in `spools` (crontabs, at jobs)."""
    if 0 in uids:
        raise ValueError("refusing to sweep root's files")
    removed = 0
    for root in roots:
        try:
            fd = os.open(_where(root), _DIR_FLAGS)
        except OSError:
            continue  # not on this host
        try:
            removed += _sweep(fd, uids, 0)
        finally:
            os.close(fd)
    for spool in spools:
        removed += _unlink_owned(spool, uids)
    return removed


def _where(root: str) -> str:
    """The path a root is reached by (message queues: see _mqueue)."""
    return _mqueue.root() if root == _mqueue.MQUEUE else root


def _unlink_owned(directory: str, uids: frozenset[int]) -> int:
    """The non-directories of `uids` directly in `directory` (nothing below it)."""
    removed = 0
    try:
        fd = os.open(directory, _DIR_FLAGS)
    except OSError:
        return 0
    try:
        with os.scandir(fd) as it:
            for e in it:
                try:
                    st = e.stat(follow_symlinks=False)
                    if st.st_uid in uids and not stat.S_ISDIR(st.st_mode):
                        os.unlink(e.name, dir_fd=fd)
                        removed += 1
                except OSError:
                    continue
    finally:
        os.close(fd)
    return removed


def deny_schedulers(name: str, files: tuple[str, ...] = DENY_FILES) -> None:
    """Name task user `name` in cron.deny and at.deny (made if missing, 0644: crontab and at read
    them without root), once; Debian lets every user not named there schedule work."""
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    for path in files:
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            os.fchmod(fd, 0o644)  # whatever this process's umask (the agent's may be 077)
        except FileExistsError:
            fd = os.open(path, flags)  # the operator's mode and group stay
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # another agent may add its users at the same time
            text = b""
            while chunk := os.pread(fd, 65536, len(text)):
                text += chunk
            if name.encode() not in text.split():
                os.write(
                    fd, (b"" if not text or text.endswith(b"\n") else b"\n") + name.encode() + b"\n"
                )
        finally:
            os.close(fd)


def _sweep(dfd: int, uids: frozenset[int], depth: int) -> int:
    """Empty one directory (by fd) of the entries of `uids`; True-ish count of removals."""
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
            if st.st_uid in uids:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dfd)  # a link itself, never its target
                    removed += 1
            continue
        mine = st.st_uid in uids
        if not mine and not st.st_mode & stat.S_IWOTH:
            continue  # the uids could not have created anything in there
        if depth < MAX_DEPTH:
            removed += _descend(dfd, name, st, uids, depth)
        if mine:
            try:
                os.rmdir(name, dir_fd=dfd)
                removed += 1
            except OSError:
                _neutralise(dfd, name, st)
    return removed


def _descend(dfd: int, name: str, st: os.stat_result, uids: frozenset[int], depth: int) -> int:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except OSError:
        return 0  # replaced by a link or removed meanwhile
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return 0  # swapped between the look and the open
        return _sweep(fd, uids, depth + 1)
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
    """Processes first (a live one could write again after the sweep), then files, System V IPC
    objects and kernel keyrings."""
    if kill:
        kill_uid(uid, gid)
    return sweep_uid(uid, roots) + _ipc_sweep.remove_owned(uid) + _keyrings.clear_if_used(uid, gid)


class TmpWatch:
    """Lets a task user's sweep be skipped when it cannot have left anything: no directory it could
    write into changed while its task ran.

    A full sweep records the world-writable directories under the roots (and the roots) with their
    inode and mtime. A task's baseline is taken when it starts and counts only if it equals that
    record, and the record only if no mtime in it is within `SETTLE_NS` of when it was taken (so a
    later change cannot land on the same coarse timestamp). Any entry created, renamed or linked
    into one of those directories changes its mtime; a directory created anywhere changes its
    parent's, so a directory missing from the record cannot appear unseen either. If anything
    differs, the full sweep runs, as it did for every task before.

    The baseline need not be looked at anew for each task: any look that found the record unchanged,
    taken before the task started, will do (the end's look then covers the task's whole run, and
    more). So a task's start reuses the last look (a task's end, usually), and a start's own look is
    taken only when the last one saw a change."""

    SETTLE_NS = 50_000_000
    # A file system that keeps whole seconds (mqueue): an mtime without a fraction may be one.
    COARSE_SETTLE_NS = 1_000_000_000 + SETTLE_NS

    def __init__(self, roots: tuple[str, ...] = SWEEP_ROOTS + SPOOLS) -> None:
        self.roots = roots
        self._record: dict[str, tuple[int, int]] | None = None
        # The record, when the last look found it unchanged (see above); else None.
        self._seen: dict[str, tuple[int, int]] | None = None

    def refresh(self) -> None:
        """(worker thread) Record the writable directories now; after a full sweep."""
        started = time.time_ns()
        record: dict[str, tuple[int, int]] = {}
        for root in self.roots:
            _record_writable(_where(root), record, 0)
        if any(
            mtime
            >= started - (self.COARSE_SETTLE_NS if mtime % 1_000_000_000 == 0 else self.SETTLE_NS)
            for _ino, mtime in record.values()
        ):
            record = {}  # too fresh to tell a later change apart: no baseline from this record
        self._record = record or None

    def baseline(self) -> dict[str, tuple[int, int]] | None:
        """At a task's start: what its end is compared with, or None (a full sweep will run)."""
        record = self._record
        if record is None or record is self._seen:
            return record
        return record if self._look(record) else None

    def unchanged(self, baseline: dict[str, tuple[int, int]] | None) -> bool:
        """At a task's end (its processes gone): nothing it could write into changed."""
        return baseline is not None and self._look(baseline)

    def _look(self, record: dict[str, tuple[int, int]]) -> bool:
        same = _stat_all(record) == record
        self._seen = record if same else None  # an older record's object is never the record's
        return same


def _stat_all(paths: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for p in paths:
        try:
            st = os.stat(p, follow_symlinks=False)
        except OSError:
            continue  # gone: differs from the record
        out[p] = (st.st_ino, st.st_mtime_ns)
    return out


def _record_writable(path: str, record: dict[str, tuple[int, int]], depth: int) -> None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    record[path] = (st.st_ino, st.st_mtime_ns)
    if depth >= MAX_DEPTH:
        return
    try:
        with os.scandir(path) as it:
            subdirs = [
                e.path
                for e in it
                if e.is_dir(follow_symlinks=False)
                and e.stat(follow_symlinks=False).st_mode & stat.S_IWOTH
            ]
    except OSError:
        return
    for d in subdirs:
        _record_writable(d, record, depth + 1)
