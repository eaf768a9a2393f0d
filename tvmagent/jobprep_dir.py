"""A job preparation task's directory after its run: readable by the pool's tasks, writable by none.

Every task runs as its own user, and a run's directory goes back to root, 0700, when it ends. The
tasks of the job must read what their preparation task left (Azure: read-only on the job-prep
directory), so its tree becomes root's with the pool's group allowed to read and enter it. Walked
without following symlinks: the preparation task may have planted links to files it must not own.
"""

from __future__ import annotations

import contextlib
import os
import stat


def _share(path: str, st: os.stat_result, gid: int) -> None:
    os.lchown(path, 0, gid)
    if stat.S_ISDIR(st.st_mode):
        os.chmod(path, 0o750)
    elif stat.S_ISREG(st.st_mode):
        mode = stat.S_IMODE(st.st_mode) & 0o700 & ~stat.S_ISUID & ~stat.S_ISGID
        # The group reads what the owner could read and runs what the owner could run; nobody
        # but root writes, and no other user sees it.
        os.chmod(path, mode | ((mode & 0o500) >> 3))


def share_with_pool(directory: str, gid: int | None) -> None:
    """(worker thread) Give the tree to root with read access for the pool's group `gid`. Without a
    pool group (a fixed task user, or no task users) the tree stays as the run left it."""
    if gid is None:
        return
    with contextlib.suppress(FileNotFoundError):  # deleted meanwhile (DeleteTaskFiles)
        _share(directory, os.lstat(directory), gid)
        for top, dirs, files in os.walk(directory):
            for name in dirs + files:
                p = os.path.join(top, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(p)
                    if stat.S_ISLNK(st.st_mode):
                        os.lchown(p, 0, gid)
                    else:
                        _share(p, st, gid)
