"""A task's directory on disk: prepared for a run, its retention deadline recorded where a restarted
agent finds it, and removed (with a "cleaned up" marker) when that deadline passes. Blocking calls:
the shell runs them in a worker thread (or inline where a thread hop costs more than the call)."""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import os
import shutil
import time
from collections.abc import Callable

log = logging.getLogger("tvm.agent")

CLEANED_MARKER = ".tvm-cleaned"
RETENTION_SUFFIX = ".tvm-retention"  # beside a finished task's directory: when it may be deleted
RETENTION_XATTR = "user.tvm.retention"  # the same on the directory itself, where xattrs work


def prepare_task_dir(tdir: str, wd: str) -> None:
    """A task placed again (retry, requeue) after its files were cleaned up has files again."""
    clear_markers(tdir)
    with contextlib.suppress(OSError):  # no such attribute / directory: the usual case
        os.removexattr(tdir, RETENTION_XATTR)
    os.makedirs(wd, exist_ok=True)


def clear_markers(tdir: str) -> None:
    """The "cleaned up" and retention files beside a task directory that runs again."""
    for suffix in (CLEANED_MARKER, RETENTION_SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tdir + suffix)


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


TRASH = ".trash"  # below the agent's root: task directories detached and not yet deleted
_detached = itertools.count()


def detach_task_dir(root: str, tdir: str) -> str | None:
    """(event loop) Move a task's directory out of its place in one rename and return where it went,
    for `remove_detached` to delete off the loop. A run of the same task placed right after the
    delete (a reactivated task) then makes a fresh directory instead of losing its files to a
    deletion still under way. None: nothing was there. The tree stays in place (and is deleted
    there) only if the rename is refused."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tdir + RETENTION_SUFFIX)
    trash = os.path.join(root, TRASH)
    target = os.path.join(trash, f"{os.getpid()}-{next(_detached)}")
    for _ in range(2):
        try:
            os.rename(tdir, target)
            return target
        except FileNotFoundError:
            if not os.path.lexists(tdir):
                return None
            os.makedirs(trash, mode=0o700, exist_ok=True)  # the trash itself was missing
        except OSError as exc:
            log.warning("cannot move %s aside (%s); deleting it in place", tdir, exc)
            break
    return tdir


def remove_detached(path: str | None, tdir: str, cleaned: bool) -> None:
    """(worker thread) Delete what `detach_task_dir` moved aside; `cleaned` (retention expired)
    leaves a marker beside the task's place so the file APIs can answer TaskFilesCleanedUp instead
    of a bare not-found."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
    if cleaned and os.path.isdir(os.path.dirname(tdir)) and not os.path.lexists(tdir):
        with open(tdir + CLEANED_MARKER, "w"):
            pass


def empty_trash(root: str) -> None:
    """(worker thread, at start) What a previous agent detached and did not get to delete."""
    trash = os.path.join(root, TRASH)
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(trash):
            shutil.rmtree(os.path.join(trash, name), ignore_errors=True)


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


SKELETON = ("wd", "stdout.txt", "stderr.txt")  # below a task directory, as the stock makes it
STOCK_MOST = 2048  # ready task directories an agent keeps at most
STOCK_DIR = ".taskstock"  # under the agent's root


def stock_on_disk(root: str) -> int:
    """How many directories the stock of the agent at `root` holds (for tests and benchmarks,
    which look from outside the agent)."""
    try:
        return len(os.listdir(os.path.join(root, STOCK_DIR)))
    except FileNotFoundError:
        return 0


class TaskDirStock:
    """Task directories made ahead of need by a worker thread: a directory with ``wd/`` and empty
    ``stdout.txt`` and ``stderr.txt`` (root's, 0700 / 0640), kept under ``<root>/.taskstock``.

    Creating an inode costs this host's ext4 100-400 µs of kernel time, more than all the rest of
    a short task's launch; taking a ready directory is one rename, so the event loop never waits
    for inode allocation. A task placed again (retry, requeue) already has its directory and
    makes nothing; an empty stock makes the task fall back to creating its own.

    Two depths: between half of `target` and all of it at all times (made again in one go once
    half of it is gone). Beyond it, while the agent is idle, the stock grows to the largest burst
    seen so far (the most directories taken within `window` seconds, at most `most`): made ahead,
    a burst like it pays for no inode at all while it runs, and the CPU they cost is spent when no
    task wants it."""

    def __init__(
        self,
        root: str,
        target: int = 32,
        most: int = STOCK_MOST,
        window: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dir = os.path.join(root, STOCK_DIR)
        self.tasks_dir = os.path.join(root, "tasks")
        self.target = target
        self.most = most
        self.window = window
        self._clock = clock
        self._takes: collections.deque[float] = collections.deque(maxlen=max(1, most))
        self.burst = 0  # the most directories taken within `window` seconds so far
        self._ready: list[str] = []
        self._parents: set[str] = set()  # job directories known to exist
        self._serial = 0
        self.enabled = True

    def start(self) -> None:
        """(worker thread) Take over what a previous agent left ready; off if not on one file system."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.makedirs(self.tasks_dir, exist_ok=True)
        if os.stat(self.dir).st_dev != os.stat(self.tasks_dir).st_dev:
            self.enabled = False  # a rename across file systems would copy
            return
        _mark_topdir(self.dir)
        for name in sorted(os.listdir(self.dir)):
            p = os.path.join(self.dir, name)
            if all(os.path.lexists(os.path.join(p, n)) for n in SKELETON):
                self._ready.append(p)
            else:
                shutil.rmtree(p, ignore_errors=True)

    def wanted(self) -> int:
        """Directories the stock lacks to reach `target`."""
        return self.target - len(self._ready) if self.enabled else 0

    def low(self) -> bool:
        """Less than half of `target` is ready: time to refill."""
        return self.wanted() > self.target // 2

    def refill(self) -> int:
        """Directories to make now: what the stock lacks once it is `low`, else none. So it is
        refilled in chunks of at least half its target, never after each take while a burst draws
        on it: a worker-thread call costs ~100 µs of CPU in hand-overs, as much as a directory."""
        return self.wanted() if self.low() else 0

    def wanted_idle(self) -> int:
        """Directories to make while the agent is idle: up to the largest burst seen."""
        return max(0, self.burst - len(self._ready)) if self.enabled else 0

    def ready(self) -> int:
        return len(self._ready)

    def _taken(self) -> None:
        now = self._clock()
        takes = self._takes
        takes.append(now)
        while now - takes[0] > self.window:
            takes.popleft()
        self.burst = max(self.burst, min(len(takes), self.most))

    def make(self, n: int) -> list[str]:
        """(worker thread) Make `n` directories; the caller hands them to `add`."""
        made = []
        for _ in range(n):
            self._serial += 1
            p = os.path.join(self.dir, f"{os.getpid()}-{self._serial}")
            os.mkdir(p, 0o700)
            os.mkdir(os.path.join(p, "wd"), 0o700)
            for name in SKELETON[1:]:
                os.close(
                    os.open(os.path.join(p, name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
                )
            made.append(p)
        return made

    def add(self, made: list[str]) -> None:
        self._ready.extend(made)

    def take(self, tdir: str) -> bool:
        """Move a ready directory to `tdir` (which must not exist yet). False: none ready, or
        `tdir` exists (a retry); the caller makes what it needs itself."""
        if not self._ready:
            return False
        parent = os.path.dirname(tdir)
        if parent not in self._parents:
            if os.path.lexists(tdir):
                return False
            os.makedirs(parent, exist_ok=True)
            self._parents.add(parent)
        src = self._ready.pop()
        try:
            os.rename(src, tdir)  # refuses a non-empty tdir; replaces an empty one
        except FileNotFoundError:  # the job's directory was removed meanwhile (job deleted)
            self._parents.discard(parent)
            self._ready.append(src)
            return False
        except OSError:
            self._ready.append(src)
            return False
        self._taken()
        return True

    def forget(self, parent: str) -> None:
        """A job directory was removed: make it again before the next rename into it."""
        self._parents.discard(parent)


_FS_IOC_GETFLAGS = 0x80086601
_FS_IOC_SETFLAGS = 0x40086602
_FS_TOPDIR_FL = 0x00020000


def _mark_topdir(path: str) -> None:
    """ext4's "top of a directory hierarchy" hint (chattr +T): the Orlov allocator then spreads the
    stock's directories over block groups with free inodes. In a group full of recently deleted
    inodes (a busy /tmp) ext4 without a journal scans past each of them: 0.8-1.3 ms per task
    directory measured there, 0.2-0.3 ms with the hint. Other file systems refuse it: no harm."""
    import array
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        flags = array.array("i", [0])
        fcntl.ioctl(fd, _FS_IOC_GETFLAGS, flags, True)
        if not flags[0] & _FS_TOPDIR_FL:
            flags[0] |= _FS_TOPDIR_FL
            fcntl.ioctl(fd, _FS_IOC_SETFLAGS, flags, True)
    except OSError:
        pass
    finally:
        os.close(fd)
