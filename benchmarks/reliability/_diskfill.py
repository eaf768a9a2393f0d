"""A small tmpfs to fill up, and the filling (disk-full suite and its tests)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator


class TmpfsUnavailable(RuntimeError):
    """This host (or user) cannot mount a tmpfs."""


def can_mount_tmpfs() -> str:
    """Why a tmpfs cannot be mounted here ("" when it can)."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None or shutil.which("umount") is None:
        return "mount/umount not installed"
    return ""


@contextlib.contextmanager
def tmpfs(path: str, size: str) -> Iterator[str]:
    """A private tmpfs of `size` mounted at `path` (created) for the block; unmounted after."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0711", "tmpfs", path],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise TmpfsUnavailable(f"cannot mount a tmpfs at {path}: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def fill(directory: str, name: str = "filler", keep_free: int = 0) -> str:
    """Write a file in `directory` until its file system is full (or only `keep_free` bytes are
    left); returns the file's path. Remove it to give the space back."""
    path = os.path.join(directory, name)
    chunk = b"\0" * (1 << 20)
    with open(path, "wb", buffering=0) as f:
        while True:
            free = shutil.disk_usage(directory).free
            want = len(chunk) if keep_free == 0 else min(len(chunk), free - keep_free)
            if want <= 0:
                break
            try:
                f.write(chunk[:want])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        if keep_free == 0:
            # Fill what the megabyte writes left, down to the last page.
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 4096)
    return path
