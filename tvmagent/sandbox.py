"""Process sandbox: how a task's command line becomes a process tree, and how it is limited and killed.

Layering (python-ecosystem §3): own session + process group, output straight to file descriptors,
stdin /dev/null, and exec-time wrappers instead of ``preexec_fn``::

    clone3 launcher (tvmagent/launch/): born in the task's v2 cgroup, joins its v1 cgroups,
    rlimits, task user, exec -> [bwrap (namespaces)] -> command

in one step where the launcher was built; elsewhere an exec-time wrapper chain does the same::

    sh (join task cgroups) -> prlimit (rlimits) -> setpriv (drop to task user) -> env (restore
    shell/loader variables) -> bwrap (namespaces) -> command

Each stage is present only when needed. A task cgroup (v2 ``cgroup.kill`` where possible, v1
memory/pids on hybrid hosts) catches every descendant, including ones that ``setsid`` away;
without cgroups the sandbox falls back to the process group plus the session, and watches RSS.
The spec, the host's capabilities and the pure command building are in tvmagent/procspec.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import signal
import subprocess
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import trio

from tvmagent import _cgroups
from tvmagent._users import ensure_user, lookup_user, prepare_private_dir
from tvmagent.launch import spawn as fast
from tvmagent.launch.batch import BatchThread
from tvmagent.launch.place import ClonePlace
from tvmagent.procspec import (
    KILL_GRACE_SECONDS,
    WATCHDOG_INTERVAL,
    LaunchError,
    Plan,
    ProcessOutcome,
    ProcessSpec,
    SandboxCapabilities,
    build_command,
    bwrap_args,
    exit_code_of,
    format_bytes,
    inherited_ignores,
    launch_rlimits,
    resolve_executable,
    root_entries,
    scan_proc,
    select_tree,
    utcnow,
)

__all__ = [
    "ProcessOutcome",
    "ProcessSpec",
    "RunningProcess",
    "Sandbox",
    "SandboxCapabilities",
    "ensure_user",
    "prepare_private_dir",
]

log = logging.getLogger("tvm.agent")


class _LauncherFailed(Exception):
    """The clone3 launcher cannot work here at all (not: this one task cannot start)."""


# ---------------------------------------------------------------------------- the shell


class Sandbox:
    def __init__(
        self,
        caps: SandboxCapabilities,
        cgroup_prefix: str = "tvm",
        kill_grace: float = KILL_GRACE_SECONDS,
        reuse_cgroups: int = 0,
    ) -> None:
        if not isinstance(cgroup_prefix, str) or not cgroup_prefix:
            raise ValueError("cgroup_prefix must be a non-empty string")
        if _cgroups.sanitize_name(cgroup_prefix) != cgroup_prefix:
            raise ValueError(f"cgroup_prefix {cgroup_prefix!r} may only hold [A-Za-z0-9_.-]")
        if not (isinstance(kill_grace, int | float) and 0 <= kill_grace < math.inf):
            raise ValueError(f"kill_grace must be a finite number >= 0, not {kill_grace!r}")
        if (
            not isinstance(reuse_cgroups, int)
            or isinstance(reuse_cgroups, bool)
            or reuse_cgroups < 0
        ):
            raise ValueError(f"reuse_cgroups must be an int >= 0, not {reuse_cgroups!r}")
        self.caps = caps
        self.cgroup_prefix = cgroup_prefix
        self.kill_grace = float(kill_grace)
        # Emptied task cgroups kept for the next task (up to this many): mkdir/rmdir in cgroupfs
        # cost more than the rest of a short task's setup. 0: one fresh cgroup per task.
        self.reuse_cgroups = reuse_cgroups
        self._idle_cgroups: dict[tuple[str, ...], list[_cgroups.TaskCgroup]] = {}
        self.inline = False
        self._clones = BatchThread()
        self.clone_place = ClonePlace()

    async def reap_stale(self) -> list[str]:
        """Kill and remove task cgroups left under our prefix by a previous (crashed) agent.

        Call once at agent start, before any task runs. Returns the dirs that could not be removed.
        """
        pending = _cgroups.stale_task_dirs(self.caps.layout, self.cgroup_prefix)
        for _ in range(50):  # killed processes take a moment to leave their cgroups
            pending = [d for d in pending if not _cgroups.kill_and_remove(d)]
            if not pending:
                break
            await trio.sleep(0.05)
        return pending

    async def start(
        self,
        spec: ProcessSpec,
        prepare: Callable[[ProcessSpec], ProcessSpec] | None = None,
        inline: bool = False,
    ) -> RunningProcess:
        """Start ``spec``. Everything blocking (the caller's ``prepare``, output files, cgroup
        set-up, fork/exec) happens in ONE worker-thread call: thread hops, not the work, dominated
        the cost of short tasks. ``inline``: on the event loop instead, where the caller knows
        all of it is short (a ready task directory, the clone3 launcher). ``prepare`` may return an
        updated spec (e.g. its ``run_as``); its exceptions other than LaunchError propagate."""
        start_time = utcnow()
        cgroup = self._take_cgroup(spec)
        try:
            if (self.inline or inline) and self.caps.fast_launch:
                started = await self._start_queued(spec, prepare, cgroup)
            elif self.inline or inline:
                started = self._launch(spec, prepare, cgroup)
            else:
                started = await trio.to_thread.run_sync(self._launch, spec, prepare, cgroup)
        except LaunchError as e:
            return RunningProcess._failed(str(e), start_time)
        except BaseException:
            if cgroup is not None:
                self._discard_cgroup(cgroup)
            raise
        proc: ProcLike
        if isinstance(started, subprocess.Popen):
            proc = trio.Process._create(started, None, None, None)  # as trio's open_process does
        else:
            proc = started
        enforced = cgroup is not None and cgroup.enforces("memory")
        return RunningProcess(
            proc=proc,
            cgroup=cgroup,
            start_time=start_time,
            grace=self.kill_grace,
            memory_limit=spec.memory_limit_bytes,
            watchdog_limit=None if enforced else spec.memory_limit_bytes,
            release=self._release_cgroup,
        )

    def _launch(
        self,
        spec: ProcessSpec,
        prepare: Callable[[ProcessSpec], ProcessSpec] | None,
        cgroup: _cgroups.TaskCgroup | None,
    ) -> subprocess.Popen[bytes] | fast.Child:
        """(worker thread, or inline) prepare + spawn; on LaunchError the cgroup is given back or
        removed."""
        fds: list[int] = []
        try:
            if prepare is not None:
                spec = prepare(spec)
            if self.caps.fast_launch:
                try:
                    return _clone(self._fast_request(spec, cgroup))
                except _LauncherFailed as e:
                    self._launcher_failed(e)
            plan, fds = self._prepare(spec, cgroup)
            try:
                return subprocess.Popen(
                    plan.argv,
                    executable=plan.executable,
                    stdin=subprocess.DEVNULL,
                    stdout=fds[0],
                    stderr=fds[1],
                    cwd=spec.cwd,
                    env=plan.env,
                    start_new_session=True,
                    close_fds=True,
                )
            except (OSError, subprocess.SubprocessError) as e:
                raise LaunchError(_os_error_text(e)) from e
        except LaunchError:
            if cgroup is not None:
                self._discard_cgroup(cgroup)
            raise
        finally:
            for fd in fds:
                os.close(fd)  # the child holds its own copies

    async def _start_queued(
        self,
        spec: ProcessSpec,
        prepare: Callable[[ProcessSpec], ProcessSpec] | None,
        cgroup: _cgroups.TaskCgroup | None,
    ) -> fast.Child | subprocess.Popen[bytes]:
        """`prepare` and the set-up on the event loop (the caller knows they are short), the clone
        on the loop too or in the launcher thread with the other starts of the moment
        (tvmagent/launch/place.py decides)."""
        try:
            if prepare is not None:
                spec = prepare(spec)
            req = self._fast_request(spec, cgroup)
        except LaunchError:
            if cgroup is not None:
                self._discard_cgroup(cgroup)
            raise
        try:
            if self.clone_place.on_loop(self._clones):
                child: fast.Child = _clone(req)  # its end is waited for on the loop's pidfd wait
            else:
                child = await self._clones.run(_clone, req)
            return child
        except _LauncherFailed as e:
            self._launcher_failed(e)
            return await trio.to_thread.run_sync(self._launch, spec, None, cgroup)
        except LaunchError:
            if cgroup is not None:
                self._discard_cgroup(cgroup)
            raise

    def _launcher_failed(self, e: Exception) -> None:
        """clone3 itself was refused (a seccomp filter, a kernel without it): this task and the next
        ones go through the wrapper chain, and the log says so once."""
        self.caps.fast_launch = False
        log.warning(
            "clone3 launcher failed (%s): tasks start through the chain%s",
            e,
            ", and see every user's processes" if self.caps.task_mounts else "",
        )

    def _fast_request(self, spec: ProcessSpec, cgroup: _cgroups.TaskCgroup | None) -> fast.Request:
        """What one clone3 needs: the child is in its cgroups, session, user and limits before it
        execs. Raises LaunchError and then leaves no descriptor open."""
        user_ids = self._user_ids(spec)
        exe = resolve_executable(spec.argv[0], spec.env.get("PATH"), spec.cwd)
        fds: list[int] = []
        try:
            fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            fds.append(_open_output(spec.stdout_path, user_ids))
            fds.append(_open_output(spec.stderr_path, user_ids))
            cgroup_fd = -1
            joins: tuple[int, ...] = ()
            if cgroup is not None:
                try:
                    if not cgroup.created or not cgroup.exists():  # a reused one removed meanwhile
                        cgroup.create()
                    cgroup.rearm(spec.memory_limit_bytes, spec.pids_limit)
                    cgroup_fd, joins = cgroup.launch_handles()
                except OSError as e:
                    raise LaunchError(f"cannot set up the task cgroup: {e}") from e
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        argv = list(spec.argv)
        if spec.use_bwrap and self.caps.has_bwrap:
            argv = bwrap_args(self.caps.tools["bwrap"], spec.cwd, spec.bwrap_writable,
                              spec.bwrap_readonly, root_entries()) + [exe, *argv[1:]]  # fmt: skip
            exe = argv[0]
        ids = None if user_ids is None else (user_ids[0], user_ids[1], tuple(spec.groups))
        nproc = (
            spec.pids_limit
            if user_ids is not None and not (cgroup and cgroup.enforces("pids"))
            else None
        )
        return fast.Request(
            exe,
            argv,
            spec.env,
            spec.cwd,
            (fds[0], fds[1], fds[2]),
            cgroup_fd,
            joins,
            ids,
            launch_rlimits(spec.nofile_limit, nproc),
            # root's tasks (runElevated) stay in the host's: a start task may mount for the TVM
            self.caps.task_mounts.fd() if ids is not None and self.caps.task_mounts else -1,
        )

    def _needs(self, spec: ProcessSpec) -> tuple[str, ...]:
        """Hierarchies a task needs: v2 (whole-tree kill) always; a v1 controller only for its limit
        (every v1 one when there is no v2 to track the tree)."""
        lay = self.caps.layout
        keys = ["v2"] if lay.v2_base is not None else []
        for c in lay.v1_bases:
            if (
                lay.v2_base is None
                or (c == "memory" and spec.memory_limit_bytes is not None)
                or (c == "pids" and spec.pids_limit is not None)
            ):
                keys.append(c)
        return tuple(keys)

    def _take_cgroup(self, spec: ProcessSpec) -> _cgroups.TaskCgroup | None:
        """An idle cgroup with the same hierarchies, else a new (not yet created) one."""
        if not self.caps.layout.usable:
            return None
        keys = self._needs(spec)
        idle = self._idle_cgroups.get(keys)
        if idle:
            return idle.pop()
        return _cgroups.TaskCgroup(self.caps.layout, self.cgroup_prefix, spec.name, keys=keys)

    def _release_cgroup(self, cgroup: _cgroups.TaskCgroup) -> list[str]:
        """The task's tree is gone: keep its cgroup for the next task, or remove it."""
        idle = self._idle_cgroups.setdefault(cgroup.keys, [])
        if cgroup.created and not cgroup.killed and len(idle) < self.reuse_cgroups:
            idle.append(cgroup)
            return []
        return cgroup.remove()

    def _discard_cgroup(self, cgroup: _cgroups.TaskCgroup) -> None:
        if cgroup.created:
            cgroup.remove()

    def remove_empty_leftovers(self) -> None:
        """rmdir the task cgroups under our prefix that hold no process (the idle ones a killed
        agent kept for reuse); a cgroup with members refuses (EBUSY) and stays."""
        for d in _cgroups.stale_task_dirs(self.caps.layout, self.cgroup_prefix):
            with contextlib.suppress(OSError):
                os.rmdir(d)
                os.rmdir(os.path.dirname(d))  # the prefix dir, once it is empty

    def close(self) -> list[str]:
        """Remove the idle cgroups kept for reuse; returns the ones that could not be removed."""
        failures: list[str] = []
        for idle in self._idle_cgroups.values():
            while idle:
                failures += idle.pop().remove()
        return failures

    def _prepare(
        self, spec: ProcessSpec, cgroup: _cgroups.TaskCgroup | None
    ) -> tuple[Plan, list[int]]:
        """Everything before the spawn; raises LaunchError and leaves no fd behind."""
        user_ids = self._user_ids(spec)
        exe = resolve_executable(spec.argv[0], spec.env.get("PATH"), spec.cwd)
        if not os.path.isdir(spec.cwd):
            raise LaunchError(f"No such directory: working directory {spec.cwd!r}")
        fds: list[int] = []
        try:
            fds.append(_open_output(spec.stdout_path, user_ids))
            fds.append(_open_output(spec.stderr_path, user_ids))
            if cgroup is not None:
                try:
                    if not cgroup.created or not cgroup.exists():  # a reused one removed meanwhile
                        cgroup.create()
                    cgroup.rearm(spec.memory_limit_bytes, spec.pids_limit)
                except OSError as e:
                    raise LaunchError(f"cannot set up the task cgroup: {e}") from e
            bwrap = None
            if spec.use_bwrap and self.caps.has_bwrap:
                bwrap = bwrap_args(self.caps.tools["bwrap"], spec.cwd, spec.bwrap_writable,
                                   spec.bwrap_readonly, root_entries())  # fmt: skip
            procs = cgroup.procs_files() if cgroup else []
            # RLIMIT_NPROC counts every process of the uid: only a task user of its own may carry it.
            nproc = (
                spec.pids_limit
                if user_ids is not None and not (cgroup and cgroup.enforces("pids"))
                else None
            )
            plan = build_command(
                spec,
                exe,
                self.caps.tools,
                procs,
                user_ids,
                bwrap,
                nproc,
                spec.groups if user_ids is not None else (),
                inherited_ignores(),
            )
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return plan, fds

    def _user_ids(self, spec: ProcessSpec) -> tuple[int, int] | None:
        if spec.run_as is None or not self.caps.can_switch_user:
            return None  # degrade: describe() has said so at agent start
        if spec.uid is not None and spec.gid is not None:
            ids: tuple[int, int] | None = (spec.uid, spec.gid)
        else:
            ids = lookup_user(spec.run_as)
        if ids is None:
            raise LaunchError(f"No such user: {spec.run_as!r}")
        if spec.gid is not None:
            ids = (ids[0], spec.gid)
        if ids == (os.geteuid(), os.getegid()):
            return None
        return ids


def _clone(req: fast.Request) -> fast.Child:
    """(any thread) Start a prepared request; LaunchError for this task, _LauncherFailed when
    clone3 cannot work here at all."""
    try:
        return fast.start(req)
    except fast.SpawnError as e:
        if e.step == 0 and e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG):
            raise _LauncherFailed(str(e)) from e
        raise LaunchError(str(e)) from e


def _open_output(path: str, user_ids: tuple[int, int] | None) -> int:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    except OSError as e:
        raise LaunchError(f"cannot open output file: {_os_error_text(e)}") from e
    if user_ids is not None:
        # So that the task user owns its own stdout/stderr, like everything else in its dir.
        with contextlib.suppress(OSError):
            os.fchown(fd, *user_ids)
    return fd


def _os_error_text(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename!r}" if e.filename else e.strerror
    return str(e) or type(e).__name__


class ProcLike(Protocol):
    """What the sandbox needs of a started process (``trio.Process`` or the launcher's Child)."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    def poll(self) -> int | None: ...
    async def wait(self) -> int: ...


class RunningProcess:
    def __init__(
        self,
        *,
        proc: ProcLike | None,
        cgroup: _cgroups.TaskCgroup | None,
        start_time: datetime,
        grace: float,
        memory_limit: int | None = None,
        watchdog_limit: int | None = None,
        launch_error: str | None = None,
        release: Callable[[_cgroups.TaskCgroup], list[str]] | None = None,
    ) -> None:
        self.pid: int | None = proc.pid if proc is not None else None
        self.start_time = start_time
        self._proc = proc
        self._cgroup = cgroup
        self._grace = grace
        self._memory_limit = memory_limit
        self._watchdog_limit = watchdog_limit
        self._launch_error = launch_error
        # Called with the cgroup once the tree is gone (the sandbox keeps or removes it).
        self._release = release or _cgroups.TaskCgroup.remove
        self._killed = False  # kill() while the main process was alive
        self._kill_deadline: float | None = None  # trio time at which SIGKILL is due
        self._sigkill_sent = False
        self._watchdog_oom = False
        self._leftovers = 0
        self._reaped = False  # the tree was seen empty after the main process ended
        self._wake: trio.CancelScope | None = None
        self._nudge: Callable[[], None] | None = None  # wakes a wait without a cancel scope
        self._driving = False
        self._done = trio.Event()
        self._outcome: ProcessOutcome | None = None

    @classmethod
    def _failed(cls, message: str, start_time: datetime) -> RunningProcess:
        rp = cls(proc=None, cgroup=None, start_time=start_time, grace=0, launch_error=message)
        rp._outcome = ProcessOutcome(-1, "launch_failed", message, start_time, utcnow(), None)
        rp._done.set()
        return rp

    # -- public

    async def wait(self) -> ProcessOutcome:
        if self._outcome is not None:
            return self._outcome
        if self._driving:
            await self._done.wait()
            assert self._outcome is not None
            return self._outcome
        self._driving = True
        try:
            await self._wait_main()
            await self._reap_tree()
        except BaseException:
            # Cancelled (e.g. the caller's wall-clock scope): the tree must not outlive us.
            # Same path as kill(): SIGTERM, SIGKILL after the grace period; bounded either way.
            with trio.CancelScope(shield=True):
                self.kill()
                with trio.move_on_after(self._grace + 10):
                    await self._wait_main()
                    await self._reap_tree()
                self._finish()
            raise
        return self._finish()

    def kill(self) -> None:
        """Idempotent: SIGTERM the tree now; ``wait()`` sends SIGKILL after the grace period."""
        if self._proc is None or self._outcome is not None:
            return
        if self._kill_deadline is None:
            if self._proc.poll() is None:
                self._killed = True
            self._kill_deadline = trio.current_time() + self._grace
            self._signal_tree(signal.SIGTERM)
        if self._wake is not None:
            self._wake.deadline = min(self._wake.deadline, self._kill_deadline)
        if self._nudge is not None:
            self._nudge()

    def snapshot_rss(self) -> int | None:
        if self._proc is None or self._outcome is not None:
            return None
        total = sum(p.rss_pages for p in scan_proc(self._tree_pids()))
        return total * os.sysconf("SC_PAGE_SIZE")

    # -- internals

    def _tree_pids(self) -> set[int]:
        """Live pids of the task tree (the cgroup when there is one, else group + session)."""
        assert self.pid is not None
        if self._cgroup is not None:
            live = {p.pid for p in scan_proc(self._cgroup.pids()) if p.state not in ("Z", "X")}
            if self._proc is not None and self._proc.returncode is None:
                live.add(self.pid)  # may not have joined the cgroup yet
            return live
        alive = self._proc is not None and self._proc.returncode is None
        return select_tree(scan_proc(), self.pid, exclude=os.getpid(), include_root=alive)

    def _signal_tree(self, sig: int) -> None:
        assert self._proc is not None
        if self._proc.returncode is None:
            # The process group covers the moment before the wrapper joined the cgroup.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, sig)
        if self._cgroup is not None:
            self._cgroup.signal_all(sig)
        else:
            for pid in self._tree_pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
        if sig == signal.SIGKILL:
            self._sigkill_sent = True

    async def _wait_main(self) -> None:
        assert self._proc is not None
        while self._proc.returncode is None:
            deadline = self._kill_deadline if self._kill_deadline is not None else math.inf
            if self._watchdog_limit is not None:
                deadline = min(deadline, trio.current_time() + WATCHDOG_INTERVAL)
            proc = self._proc
            if deadline == math.inf and isinstance(proc, fast.Child) and proc.nudgeable():
                # No deadline yet: no cancel scope (a visible share of a short task's cost);
                # kill() nudges this wait instead, and the loop goes on with its deadline.
                self._nudge = proc.nudge
                try:
                    await proc.wait_once()
                finally:
                    self._nudge = None
                continue
            with trio.CancelScope(deadline=deadline) as scope:
                self._wake = scope
                try:
                    await self._proc.wait()
                finally:
                    self._wake = None
            if self._proc.returncode is not None:
                break
            now = trio.current_time()
            if self._kill_deadline is not None and now >= self._kill_deadline:
                self._signal_tree(signal.SIGKILL)
                self._kill_deadline = now + 0.5  # repeat until the main process is gone
            elif self._watchdog_limit is not None:
                rss = self.snapshot_rss() or 0
                if rss > self._watchdog_limit:
                    self._watchdog_oom = True
                    self._kill_deadline = now
                    self._signal_tree(signal.SIGKILL)

    async def _reap_tree(self) -> None:
        """After the main process: end whatever it left behind, wait until nothing is left."""
        if not self._tree_pids():
            self._reaped = True
            return
        if self._kill_deadline is None:
            self._leftovers = len(self._tree_pids())
            self._kill_deadline = trio.current_time() + self._grace
            self._signal_tree(signal.SIGTERM)
        delay = 0.01
        while self._tree_pids():
            if trio.current_time() >= self._kill_deadline:
                self._signal_tree(signal.SIGKILL)
            await trio.sleep(delay)
            delay = min(delay * 2, 0.2)
        self._reaped = True

    def _finish(self) -> ProcessOutcome:
        if self._outcome is not None:
            return self._outcome
        assert self._proc is not None
        rc = self._proc.returncode
        exit_code = exit_code_of(rc) if rc is not None else -1
        oom_kills = 0
        problems: list[str] = []
        if self._cgroup is not None:
            if self._cgroup.enforces("memory"):
                oom_kills = self._cgroup.oom_kills()
            if not self._reaped and self._tree_pids():
                problems.append("some processes of the task could not be killed")
            else:
                problems += [f"cgroup not removed: {f}" for f in self._release(self._cgroup)]
        limit = format_bytes(self._memory_limit) if self._memory_limit else "?"
        if self._watchdog_oom or (oom_kills and exit_code != 0):
            reason = "oom"
            how = "RSS watchdog" if self._watchdog_oom else "cgroup"
            message = f"killed: out of memory (limit {limit}, {how})"
        elif self._killed:
            reason = "killed"
            message = "killed" + (" (SIGKILL after grace period)" if self._sigkill_sent else "")
        else:
            reason = "exited"
            if rc is not None and rc < 0:
                try:
                    name = signal.Signals(-rc).name
                except ValueError:
                    name = str(-rc)
                message = f"terminated by signal {name} (exit code {exit_code})"
            else:
                message = f"exited with code {exit_code}"
            if oom_kills:
                message += f"; {oom_kills} process(es) of the task were killed for memory"
            if self._leftovers:
                message += f"; {self._leftovers} leftover process(es) killed"
        if problems:
            message += "; " + "; ".join(problems)
        self._outcome = ProcessOutcome(
            exit_code, reason, message, self.start_time, utcnow(), self.pid
        )
        self._done.set()
        return self._outcome
