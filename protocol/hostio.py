"""The small host helpers both daemons need besides sd_notify (protocol/sdnotify.py): making a
rename durable, the address peers would reach this host at, and the lock that keeps a second
process off a directory one already uses. The only file and socket calls in protocol/ besides
sd_notify."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket


def fsync_dir(path: str) -> None:
    """fsync a directory: makes a rename (or a new entry) in it durable; without it a power loss
    can forget the new name."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def primary_ip() -> str:
    """The address peers would use to reach this host (no packet is sent by a UDP connect)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


class InUse(Exception):
    """Another live process holds the lock (its pid in the message, when it wrote one)."""


_held: list[int] = []  # the lock files' descriptors: kept open for the life of the process


def hold_lock(path: str, what: str, hint: str) -> None:
    """Take the exclusive lock on `path` (made 0600) for the rest of this process, or raise InUse
    naming `what`, the holder's pid and what to do (`hint`). An flock: it goes with the process,
    however it ends, and the descriptor is not inherited by children (which may outlive it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = f" (pid {int(os.pread(fd, 32, 0).decode().strip())})"
        os.close(fd)
        raise InUse(f"{what} is in use by another process{holder}: {hint}") from None
    except OSError:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held.append(fd)
