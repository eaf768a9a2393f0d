"""A task's directory on disk: prepared for a run, its retention deadline recorded where a restarted
agent finds it, and removed (with a "cleaned up" marker) when that deadline passes. Blocking calls:
the shell runs them in a worker thread (or inline where a thread hop costs more than the call)."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil

log = logging.getLogger("tvm.agent")

CLEANED_MARKER = ".tvm-cleaned"
RETENTION_SUFFIX = ".tvm-retention"  # beside a finished task's directory: when it may be deleted
RETENTION_XATTR = "user.tvm.retention"  # the same on the directory itself, where xattrs work


def prepare_task_dir(tdir: str, wd: str) -> None:
    """A task placed again (retry, requeue) after its files were cleaned up has files again."""
    for suffix in (CLEANED_MARKER, RETENTION_SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tdir + suffix)
    with contextlib.suppress(OSError):  # no such attribute / directory: the usual case
        os.removexattr(tdir, RETENTION_XATTR)
    os.makedirs(wd, exist_ok=True)


def save_retention(tdir: str, deadline: float) -> None:
    """Record the deadline where a restarted agent finds it: an extended attribute of the task
    directory (no file to create: inode allocation was a visible share of a short task's cost),
    else a file beside it (file systems without user xattrs)."""
    value = f"{deadline!r}"
    try:
        os.setxattr(tdir, RETENTION_XATTR, value.encode())
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            log.warning("cannot record the retention deadline of %s: %s", tdir, exc)
            return  # the in-memory deadline still applies while this agent runs
    try:
        with open(tdir + RETENTION_SUFFIX + ".tmp", "w") as f:
            f.write(value + "\n")
        os.replace(tdir + RETENTION_SUFFIX + ".tmp", tdir + RETENTION_SUFFIX)
    except OSError as exc:
        log.warning("cannot record the retention deadline of %s: %s", tdir, exc)


def load_retention(root: str) -> dict[str, float]:
    """Task key -> deadline from what `save_retention` left under root/tasks/<wi>/<job>/."""
    out: dict[str, float] = {}
    base = os.path.join(root, "tasks")
    for dirpath, _dirs, files in os.walk(base):
        rel = os.path.relpath(dirpath, base).split(os.sep)
        if len(rel) != 2:
            continue
        for name in _dirs:
            try:
                deadline = float(os.getxattr(os.path.join(dirpath, name), RETENTION_XATTR))
            except (OSError, ValueError):
                continue  # still running when the agent stopped, or never finished here
            out["/".join([*rel, name])] = deadline
        _dirs[:] = []  # no need to walk into the task directories themselves
        for name in files:
            if name.endswith(RETENTION_SUFFIX):
                try:
                    with open(os.path.join(dirpath, name)) as f:
                        deadline = float(f.read().strip())
                except (OSError, ValueError):
                    continue
                out["/".join([*rel, name[: -len(RETENTION_SUFFIX)]])] = deadline
    return out


def remove_task_dir(tdir: str, cleaned: bool) -> None:
    """Delete a task's directory; `cleaned` (retention expired) leaves a marker beside it so the file
    APIs can answer TaskFilesCleanedUp instead of a bare not-found."""
    shutil.rmtree(tdir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tdir + RETENTION_SUFFIX)
    if cleaned and os.path.isdir(os.path.dirname(tdir)):
        with open(tdir + CLEANED_MARKER, "w"):
            pass


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
