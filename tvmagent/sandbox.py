"""Process sandbox: how a task's command line becomes a process tree, and how it is limited and killed.

Layering (python-ecosystem §3): own session + process group, output straight to file descriptors,
stdin /dev/null, and exec-time wrappers instead of ``preexec_fn``::

    sh (join task cgroups) -> prlimit (rlimits) -> setpriv (drop to task user) -> env (restore
    shell/loader variables) -> bwrap (namespaces) -> command

Each stage is present only when needed. A task cgroup (v2 ``cgroup.kill`` where possible, v1
memory/pids on hybrid hosts) catches every descendant, including ones that ``setsid`` away;
without cgroups the sandbox falls back to the process group plus the session, and watches RSS.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import trio

from tvmagent import _cgroups
from tvmagent._users import ensure_user, lookup_user, prepare_private_dir, validate_user_name

__all__ = [
    "ProcessOutcome",
    "ProcessSpec",
    "RunningProcess",
    "Sandbox",
    "SandboxCapabilities",
    "ensure_user",
    "prepare_private_dir",
]

KILL_GRACE_SECONDS = 2.0
WATCHDOG_INTERVAL = 1.0
# dash rewrites or drops these when it starts (PWD is even added), so they cannot pass through
# the sh wrapper unchanged; the dynamic-loader ones must never reach wrappers running as root.
SHELL_MANAGED_VARS = frozenset({"PWD", "IFS", "OPTIND", "PPID"})
LOADER_VARS = frozenset({
    "LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT", "LD_DEBUG", "LD_DEBUG_OUTPUT", "LD_PROFILE",
    "LD_ORIGIN_PATH", "LD_DYNAMIC_WEAK", "LD_HWCAP_MASK", "LD_USE_LOAD_BIAS", "LD_SHOW_AUXV",
    "LD_BIND_NOW", "LD_BIND_NOT", "GCONV_PATH", "GLIBC_TUNABLES", "MALLOC_TRACE", "LOCPATH",
    "NLSPATH", "HOSTALIASES", "RES_OPTIONS", "LOCALDOMAIN", "RESOLV_HOST_CONF", "TZDIR",
})  # fmt: skip
_CGROUP_JOIN_SCRIPT = (
    'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done;'
    ' unset PWD; exec "$@"'
)


# ---------------------------------------------------------------------------- data types


def _check_limit(name: str, value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, not {value!r}")


@dataclass(frozen=True)
class ProcessSpec:
    argv: list[str]  # run WITHOUT a shell; argv[0] resolved via PATH of `env`
    cwd: str
    env: dict[str, str]  # the complete environment (nothing inherited from the agent)
    stdout_path: str
    stderr_path: str
    run_as: str | None = None
    # With run_as: the primary group (default: the user's passwd group) and the only
    # supplementary groups (default: none), so access comes from exactly these groups.
    gid: int | None = None
    groups: tuple[int, ...] = ()
    memory_limit_bytes: int | None = None
    pids_limit: int | None = None
    nofile_limit: int | None = None
    use_bwrap: bool = False
    name: str = "task"
    # Extra paths bound writable / read-only into the bwrap sandbox (cwd is always writable).
    bwrap_writable: tuple[str, ...] = ()
    bwrap_readonly: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.argv, list | tuple) or not self.argv:
            raise ValueError("argv must be a non-empty list of strings")
        for a in self.argv:
            if not isinstance(a, str) or "\0" in a:
                raise ValueError(f"argv items must be strings without NUL bytes, got {a!r}")
        if not self.argv[0]:
            raise ValueError("argv[0] (the program) must not be empty")
        if not isinstance(self.cwd, str) or not os.path.isabs(self.cwd):
            raise ValueError(f"cwd must be an absolute path, got {self.cwd!r}")
        if not isinstance(self.env, Mapping):
            raise ValueError("env must be a dict of str to str")
        for k, v in self.env.items():
            if not isinstance(k, str) or not k or "=" in k or "\0" in k:
                raise ValueError(f"invalid environment variable name {k!r}")
            if not isinstance(v, str) or "\0" in v:
                raise ValueError(f"environment variable {k} must be a string without NUL bytes")
        for label, p in (("stdout_path", self.stdout_path), ("stderr_path", self.stderr_path)):
            if not isinstance(p, str) or not p:
                raise ValueError(f"{label} must be a non-empty path")
        if self.run_as is not None:
            validate_user_name(self.run_as)
        for g in (*(() if self.gid is None else (self.gid,)), *self.groups):
            if isinstance(g, bool) or not isinstance(g, int) or g < 0:
                raise ValueError(f"group ids must be ints >= 0, got {g!r}")
        _check_limit("memory_limit_bytes", self.memory_limit_bytes)
        _check_limit("pids_limit", self.pids_limit)
        _check_limit("nofile_limit", self.nofile_limit)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("name must be a non-empty string")
        for p in (*self.bwrap_writable, *self.bwrap_readonly):
            if not isinstance(p, str) or not os.path.isabs(p):
                raise ValueError(f"bwrap paths must be absolute, got {p!r}")


@dataclass(frozen=True)
class ProcessOutcome:
    exit_code: int  # process exit code; for signals 128+signum; -1 when it never started
    reason: str  # "exited" | "killed" | "oom" | "launch_failed"
    message: str
    start_time: datetime  # UTC
    end_time: datetime
    pid: int | None


# ---------------------------------------------------------------------------- capabilities


@dataclass
class SandboxCapabilities:
    cgroup_mode: str  # "v2" | "v1" | "none" (which hierarchy enforces limits)
    can_switch_user: bool
    has_bwrap: bool
    has_setpriv: bool
    has_prlimit: bool
    layout: _cgroups.CgroupLayout = field(default_factory=_cgroups.CgroupLayout)
    tools: dict[str, str] = field(default_factory=dict)  # name -> absolute path
    is_root: bool = False
    notes: list[str] = field(default_factory=list)  # findings made while detecting

    @classmethod
    def detect(cls) -> SandboxCapabilities:
        notes: list[str] = []
        tools: dict[str, str] = {}
        for tool in ("sh", "env", "setpriv", "prlimit", "bwrap"):
            path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
            if path:
                tools[tool] = os.path.realpath(path) if tool != "sh" else path
        layout = _cgroups.detect_layout(notes)
        is_root = os.geteuid() == 0
        return cls(
            cgroup_mode=layout.mode,
            can_switch_user=is_root and "setpriv" in tools,
            has_bwrap="bwrap" in tools,
            has_setpriv="setpriv" in tools,
            has_prlimit="prlimit" in tools,
            layout=layout,
            tools=tools,
            is_root=is_root,
            notes=notes,
        )

    def describe(self) -> list[str]:
        """What the sandbox can do here, and how it degrades where it cannot."""
        lay = self.layout
        lines: list[str] = []
        if lay.v2_base is not None:
            kill = "cgroup.kill" if lay.v2_has_kill else "signalling every member"
            lines.append(f"cgroup v2 at {lay.v2_base}: task trees are killed via {kill}")
        for c in _cgroups.LIMIT_CONTROLLERS:
            d = lay.controller_dir(c)
            if d is not None:
                where = "v2" if c in lay.v2_controllers else "v1"
                lines.append(f"cgroup {where} {c} controller at {d}: {c} limits enforced")
        if not lay.usable:
            lines.append(
                "no writable cgroup: whole-tree kill falls back to process group + session"
                " (a task that setsid()s and is orphaned can escape)"
            )
        if lay.controller_dir("memory") is None:
            lines.append(
                f"no memory cgroup: memory limits degrade to an RSS watchdog every "
                f"{WATCHDOG_INTERVAL:g} s (spikes between checks are not caught)"
            )
        if lay.controller_dir("pids") is None:
            lines.append("DEGRADED: no pids cgroup: a task's process limit falls back to RLIMIT_NPROC on its"
                         " own task user (per uid); tasks running as root or a shared user are NOT limited")
        if not self.has_prlimit:
            lines.append("prlimit not found: nofile limits are NOT enforced")
        if not self.can_switch_user:
            why = "agent is not root" if not self.is_root else "setpriv not found"
            lines.append(f"cannot switch user ({why}): tasks run as the agent's own user")
        if not self.has_bwrap:
            lines.append("bwrap not found: tasks asking for bubblewrap run without it")
        else:
            lines.append(f"bubblewrap available at {self.tools['bwrap']}")
        lines.extend(self.notes)
        return lines


# ---------------------------------------------------------------------------- pure helpers


class LaunchError(Exception):
    """A task that cannot be started; the message is shown to the user."""


def resolve_executable(argv0: str, path_var: str | None, cwd: str) -> str:
    """Absolute path of the program, looked up like execvp but with the *task's* PATH."""
    if "/" in argv0:
        candidates = [os.path.join(cwd, argv0)]
    else:
        dirs = (path_var if path_var is not None else os.defpath).split(":")
        candidates = [os.path.join(cwd, d or ".", argv0) for d in dirs]
    denied: str | None = None
    for c in candidates:
        if os.path.isfile(c):
            if os.access(c, os.X_OK):
                return os.path.normpath(c)
            denied = denied or c
    if denied is not None:
        raise LaunchError(f"Permission denied: {denied!r} is not executable")
    if "/" in argv0:
        if os.path.isdir(candidates[0]):
            raise LaunchError(f"Is a directory: {argv0!r}")
        raise LaunchError(f"No such file: {argv0!r}")
    raise LaunchError(f"No such file: {argv0!r} not found in PATH={path_var or os.defpath}")


def split_env(env: Mapping[str, str], wrapped: bool) -> tuple[dict[str, str], dict[str, str]]:
    """(environment for the spawn, variables to restore at the ``env`` stage)."""
    if not wrapped:
        return dict(env), {}
    held = SHELL_MANAGED_VARS | LOADER_VARS
    return (
        {k: v for k, v in env.items() if k not in held},
        {k: v for k, v in env.items() if k in held},
    )


def bwrap_args(
    bwrap: str,
    cwd: str,
    writable: Iterable[str],
    readonly: Iterable[str],
    root_entries: Mapping[str, str | None],
) -> list[str]:
    """bwrap command prefix. ``root_entries`` maps /bin, /lib... to a symlink target or None (dir)."""
    args = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try", "--ro-bind", "/usr", "/usr"]  # fmt: skip
    for name, target in sorted(root_entries.items()):
        if target is None:
            args += ["--ro-bind", name, name]
        else:
            args += ["--symlink", target, name]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
    for p in readonly:
        args += ["--ro-bind", p, p]
    for p in (cwd, *writable):
        args += ["--bind", p, p]
    args += ["--chdir", cwd, "--"]
    return args


def _root_entries() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt"):
        if os.path.islink(name):
            out[name] = os.readlink(name)
        elif os.path.isdir(name):
            out[name] = None
    return out


@dataclass(frozen=True)
class Plan:
    argv: list[str]
    env: dict[str, str]
    executable: str


def build_command(
    spec: ProcessSpec,
    exe: str,
    tools: Mapping[str, str],
    procs_files: list[str],
    user_ids: tuple[int, int] | None,
    bwrap_prefix: list[str] | None,
    nproc: int | None = None,
    groups: tuple[int, ...] = (),
) -> Plan:
    """The full wrapper chain for ``spec`` (pure). ``nproc``: RLIMIT_NPROC, the pids limit's
    fallback where no pids cgroup enforces it; ``groups``: the user's supplementary groups."""
    chain: list[str] = []
    if procs_files:
        chain += [tools["sh"], "-c", _CGROUP_JOIN_SCRIPT, "sh", str(len(procs_files)), *procs_files]
    limits = [f"--nofile={n}:{n}" for n in (spec.nofile_limit,) if n is not None]
    limits += [f"--nproc={n}:{n}" for n in (nproc,) if n is not None]
    if limits and "prlimit" in tools:
        chain += [tools["prlimit"], *limits, "--"]
    if user_ids is not None:
        uid, gid = user_ids
        extra = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
        chain += [tools["setpriv"], f"--reuid={uid}", f"--regid={gid}", extra, "--"]
    spawn_env, held = split_env(spec.env, wrapped=bool(chain) or bwrap_prefix is not None)
    if held:
        chain += [tools["env"], "--", *(f"{k}={v}" for k, v in held.items())]
    if bwrap_prefix is not None:
        chain += bwrap_prefix
    if not chain:
        return Plan(argv=list(spec.argv), env=spawn_env, executable=exe)
    full = [*chain, exe, *spec.argv[1:]]
    return Plan(argv=full, env=spawn_env, executable=full[0])


def exit_code_of(returncode: int) -> int:
    return returncode if returncode >= 0 else 128 - returncode


def format_bytes(n: int) -> str:
    if n % (1 << 30) == 0:
        return f"{n >> 30} GiB"
    if n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    return f"{n} bytes"


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    rss_pages: int = 0


def parse_stat(text: str) -> ProcInfo:
    """Parse /proc/<pid>/stat; the command name may hold spaces and parentheses."""
    head, _, rest = text.rpartition(")")
    pid = int(head.split("(", 1)[0])
    f = rest.split()
    # fields after comm: state ppid pgrp session ... rss is field 24 (index 21 here)
    return ProcInfo(pid=pid, state=f[0], ppid=int(f[1]), pgid=int(f[2]), sid=int(f[3]),
                    rss_pages=int(f[21]) if len(f) > 21 else 0)  # fmt: skip


def select_tree(
    procs: Iterable[ProcInfo], root: int, exclude: int, include_root: bool = True
) -> set[int]:
    """Live members of the tree started at ``root``: same session or group, or descendants.

    ``include_root=False`` once the root is reaped: its pid number may then belong to someone else.
    """
    procs = [p for p in procs if p.state not in ("Z", "X") and p.pid != exclude]
    members = {
        p.pid for p in procs if p.sid == root or p.pgid == root or (include_root and p.pid == root)
    }
    children: dict[int, list[int]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p.pid)
    todo = list(members)
    while todo:
        for c in children.get(todo.pop(), ()):
            if c not in members:
                members.add(c)
                todo.append(c)
    return members


def _scan_proc(pids: Iterable[int] | None = None) -> list[ProcInfo]:
    if pids is None:
        pids = (int(d) for d in os.listdir("/proc") if d.isdigit())
    out: list[ProcInfo] = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                out.append(parse_stat(f.read()))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return out


def _utcnow() -> datetime:
    return datetime.now(UTC)


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
        if not isinstance(reuse_cgroups, int) or isinstance(reuse_cgroups, bool) or reuse_cgroups < 0:
            raise ValueError(f"reuse_cgroups must be an int >= 0, not {reuse_cgroups!r}")
        self.caps = caps
        self.cgroup_prefix = cgroup_prefix
        self.kill_grace = float(kill_grace)
        # Emptied task cgroups kept for the next task (up to this many): mkdir/rmdir in cgroupfs
        # cost more than the rest of a short task's setup. 0: one fresh cgroup per task.
        self.reuse_cgroups = reuse_cgroups
        self._idle_cgroups: dict[tuple[str, ...], list[_cgroups.TaskCgroup]] = {}
        self.inline = False

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
        self, spec: ProcessSpec, prepare: Callable[[ProcessSpec], ProcessSpec] | None = None
    ) -> RunningProcess:
        """Start ``spec``. Everything blocking (the caller's ``prepare``, output files, cgroup
        set-up, fork/exec) happens in ONE worker-thread call: thread hops, not the work, dominated
        the cost of short tasks. ``prepare`` may return an updated spec (e.g. its ``run_as``);
        its exceptions other than LaunchError propagate."""
        start_time = _utcnow()
        cgroup = self._take_cgroup(spec)
        try:
            if self.inline:
                popen = self._launch(spec, prepare, cgroup)
            else:
                popen = await trio.to_thread.run_sync(self._launch, spec, prepare, cgroup)
        except LaunchError as e:
            return RunningProcess._failed(str(e), start_time)
        except BaseException:
            if cgroup is not None:
                self._discard_cgroup(cgroup)
            raise
        proc = trio.Process._create(popen, None, None, None)  # what trio.lowlevel.open_process does
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
    ) -> subprocess.Popen[bytes]:
        """(worker thread) prepare + spawn; on LaunchError the cgroup is given back or removed."""
        fds: list[int] = []
        try:
            if prepare is not None:
                spec = prepare(spec)
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

    def _needs(self, spec: ProcessSpec) -> tuple[str, ...]:
        """Hierarchies a task needs: v2 (whole-tree kill) always; a v1 controller only for its limit
        (every v1 one when there is no v2 to track the tree)."""
        lay = self.caps.layout
        keys = ["v2"] if lay.v2_base is not None else []
        for c in lay.v1_bases:
            if lay.v2_base is None or (c == "memory" and spec.memory_limit_bytes is not None) or (
                c == "pids" and spec.pids_limit is not None
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
        if cgroup.created and len(idle) < self.reuse_cgroups:
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
                                   spec.bwrap_readonly, _root_entries())  # fmt: skip
            procs = cgroup.procs_files() if cgroup else []
            # RLIMIT_NPROC counts every process of the uid: only a task user of its own may carry it.
            nproc = spec.pids_limit if user_ids is not None and not (cgroup and cgroup.enforces("pids")) else None
            plan = build_command(spec, exe, self.caps.tools, procs, user_ids, bwrap, nproc,
                                 spec.groups if user_ids is not None else ())
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return plan, fds

    def _user_ids(self, spec: ProcessSpec) -> tuple[int, int] | None:
        if spec.run_as is None or not self.caps.can_switch_user:
            return None  # degrade: describe() has said so at agent start
        ids = lookup_user(spec.run_as)
        if ids is None:
            raise LaunchError(f"No such user: {spec.run_as!r}")
        if spec.gid is not None:
            ids = (ids[0], spec.gid)
        if ids == (os.geteuid(), os.getegid()):
            return None
        return ids


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


class RunningProcess:
    def __init__(
        self,
        *,
        proc: trio.Process | None,
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
        self._wake: trio.CancelScope | None = None
        self._driving = False
        self._done = trio.Event()
        self._outcome: ProcessOutcome | None = None

    @classmethod
    def _failed(cls, message: str, start_time: datetime) -> RunningProcess:
        rp = cls(proc=None, cgroup=None, start_time=start_time, grace=0, launch_error=message)
        rp._outcome = ProcessOutcome(-1, "launch_failed", message, start_time, _utcnow(), None)
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

    def snapshot_rss(self) -> int | None:
        if self._proc is None or self._outcome is not None:
            return None
        total = sum(p.rss_pages for p in _scan_proc(self._tree_pids()))
        return total * os.sysconf("SC_PAGE_SIZE")

    # -- internals

    def _tree_pids(self) -> set[int]:
        """Live pids of the task tree (the cgroup when there is one, else group + session)."""
        assert self.pid is not None
        if self._cgroup is not None:
            live = {p.pid for p in _scan_proc(self._cgroup.pids()) if p.state not in ("Z", "X")}
            if self._proc is not None and self._proc.returncode is None:
                live.add(self.pid)  # may not have joined the cgroup yet
            return live
        alive = self._proc is not None and self._proc.returncode is None
        return select_tree(_scan_proc(), self.pid, exclude=os.getpid(), include_root=alive)

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
            if self._tree_pids():
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
            exit_code, reason, message, self.start_time, _utcnow(), self.pid
        )
        self._done.set()
        return self._outcome
