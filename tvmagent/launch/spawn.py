"""The one-step task launcher: a process born in its cgroups, as its user, in its own session.

`fast_available()` says whether the compiled clone3 launcher (``_clone3.c``) is usable here; the
sandbox otherwise builds its exec-time wrapper chain (tvmagent/procspec.py). Both confine the task
from its first instruction; the chain costs three extra execs per task.
``TVM_AGENT_LAUNCHER=chain`` forces the chain (tests run both).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

try:
    from . import _clone3  # type: ignore[attr-defined]
except ImportError:  # not built: no compiler at install time, or another architecture
    _clone3 = None

_STEP_TEXT = {
    1: "cannot join the task cgroup",
    2: "cannot start a new session",
    3: "cannot redirect the output files",
    4: "cannot set a resource limit",
    5: "cannot set the task user's groups",
    6: "cannot switch to the task user's group",
    7: "cannot switch to the task user",
    8: "cannot enter the working directory",
    9: "cannot execute the program",
    10: "cannot set no_new_privs",
    11: "cannot enter the tasks' mount namespace",
}


class SpawnError(Exception):
    """The process could not be started; the message says which step failed and why."""

    def __init__(self, message: str, err: int, step: int = 0) -> None:
        super().__init__(message)
        self.errno = err
        self.step = step  # 0: clone3 itself failed (no child ran); else the child's failed step


def fast_available() -> bool:
    if os.environ.get("TVM_AGENT_LAUNCHER", "") == "chain":
        return False
    return _clone3 is not None and bool(_clone3.AVAILABLE)


def fast_unavailable_reason() -> str:
    if os.environ.get("TVM_AGENT_LAUNCHER", "") == "chain":
        return "TVM_AGENT_LAUNCHER=chain"
    if _clone3 is None:
        return "the clone3 launcher was not built (no C compiler at install time)"
    if not _clone3.AVAILABLE:
        return "the clone3 launcher is not available on this architecture"
    return ""


class Child:
    """A started task process, waited for through its pidfd (the same interface the sandbox uses
    of ``trio.Process``: pid, returncode, poll(), wait()). The launcher thread may watch the pidfd
    for the loop (tvmagent/launch/batch.py): then the loop neither polls it nor closes it while it
    is in the thread's epoll set."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd = pidfd
        self.returncode: int | None = None
        self._watcher: Any = None  # the BatchThread watching the pidfd
        self._token: trio.lowlevel.TrioToken | None = None
        self._watched = False  # in the watcher's epoll set (set and cleared by its thread)
        self._end: trio.Event | None = None
        self._loop_waited = False

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: cannot happen for our children
                pid, status = self.pid, 255 << 8
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
                self._close()
        return self.returncode

    def wait_blocking(self) -> int:
        """Block this thread until the process ends (the agent's start-up probe only)."""
        _, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        self._close()
        return self.returncode

    async def wait(self) -> int:
        while self.poll() is None:
            await self.wait_once()
        assert self.returncode is not None
        return self.returncode

    async def wait_once(self) -> None:
        """Until the process may have ended, or `nudge()` was called (the caller looks again)."""
        if self.poll() is not None:
            return
        if self._watched:
            if self._end is None:
                self._end = trio.Event()
            await self._end.wait()
            self._end = None  # a nudge or a stopped watch: the next wait needs a new one
        else:
            self._loop_waited = True
            await trio.lowlevel.wait_readable(self._pidfd)

    def nudgeable(self) -> bool:
        """`nudge()` can end a `wait_once()` now (the launcher thread watches the process)."""
        return self._watched

    def nudge(self) -> None:
        if self._end is not None:
            self._end.set()

    # -- the watcher's side (its thread: _watched_by, _watch_over; the loop: _ended)

    def _watched_by(self, watcher: Any, token: trio.lowlevel.TrioToken) -> None:
        self._watcher, self._token, self._watched = watcher, token, True

    def _watch_over(self) -> None:
        self._watched = False

    def _ended(self) -> None:
        """(loop) The watcher saw the process end, forgot it, or stopped watching."""
        if self._end is not None:
            self._end.set()
        if self.returncode is not None:
            self._close()

    def _close(self) -> None:
        if self._pidfd < 0:
            return
        if self._watched:  # the thread drops it first; `_ended` closes it then
            self._watcher.forget(self)
            return
        fd, self._pidfd = self._pidfd, -1
        if self._loop_waited:
            with contextlib.suppress(RuntimeError):  # outside Trio (the probe): nobody waits on it
                trio.lowlevel.notify_closing(fd)
        os.close(fd)


@dataclass(frozen=True)
class Request:
    """Everything one start needs, prepared on the event loop; `stdio` is closed once started."""

    exe: str
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str
    stdio: tuple[int, int, int]
    cgroup_fd: int = -1
    join_fds: tuple[int, ...] = ()
    ids: tuple[int, int, tuple[int, ...]] | None = None
    rlimits: tuple[tuple[int, int, int], ...] = ()
    mntns_fd: int = -1

    def close(self) -> None:
        for fd in set(self.stdio):
            with contextlib.suppress(OSError):
                os.close(fd)


def start(req: Request) -> Child:
    """`spawn` for a prepared request (any thread); its stdio descriptors are closed either way."""
    try:
        return spawn(
            req.exe,
            req.argv,
            req.env,
            req.cwd,
            req.stdio,
            req.cgroup_fd,
            req.join_fds,
            req.ids,
            req.rlimits,
            req.mntns_fd,
        )
    finally:
        req.close()


def spawn(
    exe: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    cwd: str,
    stdio: tuple[int, int, int],
    cgroup_fd: int = -1,
    join_fds: tuple[int, ...] = (),
    ids: tuple[int, int, tuple[int, ...]] | None = None,
    rlimits: tuple[tuple[int, int, int], ...] = (),
    mntns_fd: int = -1,
) -> Child:
    """Start `exe` (an absolute path) with exactly `env`. `cgroup_fd`: a v2 cgroup directory the
    child is born in; `join_fds`: v1 ``tasks`` files it writes itself into before anything else;
    `ids`: (uid, gid, supplementary groups) to switch to; `rlimits`: (resource, soft, hard);
    `mntns_fd`: a mount namespace (`task_mntns`) the child enters first."""
    assert _clone3 is not None, "check fast_available() first"
    try:
        pid, pidfd = _clone3.spawn(
            os.fsencode(exe),
            argv,
            [f"{k}={v}" for k, v in env.items()],  # encoded in C
            os.fsencode(cwd),
            stdio,
            cgroup_fd,
            join_fds,
            ids,
            rlimits,
            mntns_fd,
        )
    except ChildProcessError as e:
        # (errno, step, step name) from the child, before its exec
        err, step = e.args[0], e.args[1] if len(e.args) > 1 else 0
        what = _STEP_TEXT.get(step, "cannot start the process")
        where = {8: f" {cwd!r}", 9: f" {exe!r}"}.get(step, "")
        raise SpawnError(f"{what}{where}: {os.strerror(err)}", err, step) from None
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise SpawnError("clone3 is not supported by this kernel", e.errno) from None
        raise SpawnError(f"cannot start the process: {e.strerror}", e.errno or 0) from None
    return Child(pid, pidfd)


def task_mntns() -> int:
    """A descriptor of a new mount namespace whose /proc shows each user only its own processes
    (``hidepid=invisible``); tasks started with it as `mntns_fd` live there. The caller owns the
    descriptor (the namespace ends with it and its last process). OSError where the host refuses
    (no CAP_SYS_ADMIN, e.g. inside some containers)."""
    assert _clone3 is not None, "check fast_available() first"
    fd: int = _clone3.task_mntns()
    return fd
