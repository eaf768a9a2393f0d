"""What a sandboxed process is, before it runs: its spec and outcome, what the host can do
(`SandboxCapabilities`), and the pure steps from a spec to an exec-time wrapper command line
(tvmagent/sandbox.py carries them out). Also the /proc reading that finds a task's process tree.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from tvmagent import _cgroups
from tvmagent._users import validate_user_name

if TYPE_CHECKING:
    from tvmagent.launch.mntns import TaskMounts

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
    # With run_as: its uid when the caller knows it (a leased task user), saving a passwd lookup.
    uid: int | None = None
    memory_limit_bytes: int | None = None
    pids_limit: int | None = None
    nofile_limit: int | None = None
    use_bwrap: bool = False
    name: str = "task"
    # Extra paths bound writable / read-only into the bwrap sandbox (cwd is always writable).
    bwrap_writable: tuple[str, ...] = ()
    bwrap_readonly: tuple[str, ...] = ()

    def evolve(self, **changes: object) -> ProcessSpec:
        """A copy with `changes`, validating only the fields that changed (a spec is evolved twice
        per task start; checking its whole environment each time was a visible share of it)."""
        if not changes.keys() <= _EVOLVABLE:
            raise ValueError(f"evolve() takes {sorted(_EVOLVABLE)}, not {sorted(changes)}")
        new = copy.copy(self)
        for k, v in changes.items():
            object.__setattr__(new, k, v)
        if "argv" in changes:
            new._check_argv()
        if changes.keys() & {"run_as", "uid", "gid", "groups"}:
            new._check_identity()
        return new

    def __post_init__(self) -> None:
        self._check_argv()
        self._check_rest()
        self._check_identity()

    def _check_argv(self) -> None:
        if not isinstance(self.argv, list | tuple) or not self.argv:
            raise ValueError("argv must be a non-empty list of strings")
        for a in self.argv:
            if not isinstance(a, str) or "\0" in a:
                raise ValueError(f"argv items must be strings without NUL bytes, got {a!r}")
        if not self.argv[0]:
            raise ValueError("argv[0] (the program) must not be empty")

    def _check_rest(self) -> None:
        if not isinstance(self.cwd, str) or not os.path.isabs(self.cwd):
            raise ValueError(f"cwd must be an absolute path, got {self.cwd!r}")
        if not isinstance(self.env, Mapping):
            raise ValueError("env must be a dict of str to str")
        # One pass over the joined text first (a task start has ~40 variables); the per-variable
        # checks only to name the culprit.
        try:
            keys = "\0".join(self.env)
            values = "\0".join(self.env.values())
        except TypeError:
            keys, values = "=", "\0"
        n = len(self.env) - 1  # separators; a NUL of a name or value makes more
        if "=" in keys or keys.count("\0") != n or values.count("\0") != n or "" in self.env:
            for k, v in self.env.items():
                if not isinstance(k, str) or not k or "=" in k or "\0" in k:
                    raise ValueError(f"invalid environment variable name {k!r}")
                if not isinstance(v, str) or "\0" in v:
                    raise ValueError(f"environment variable {k} must be a string without NUL bytes")
        for label, p in (("stdout_path", self.stdout_path), ("stderr_path", self.stderr_path)):
            if not isinstance(p, str) or not p:
                raise ValueError(f"{label} must be a non-empty path")
        _check_limit("memory_limit_bytes", self.memory_limit_bytes)
        _check_limit("pids_limit", self.pids_limit)
        _check_limit("nofile_limit", self.nofile_limit)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("name must be a non-empty string")
        for p in (*self.bwrap_writable, *self.bwrap_readonly):
            if not isinstance(p, str) or not os.path.isabs(p):
                raise ValueError(f"bwrap paths must be absolute, got {p!r}")

    def _check_identity(self) -> None:
        if self.run_as is not None:
            validate_user_name(self.run_as)
        for g in (*(() if self.gid is None else (self.gid,)), *self.groups):
            if isinstance(g, bool) or not isinstance(g, int) or g < 0:
                raise ValueError(f"group ids must be ints >= 0, got {g!r}")
        if self.uid is not None and (
            isinstance(self.uid, bool) or not isinstance(self.uid, int) or self.uid < 0
        ):
            raise ValueError(f"uid must be an int >= 0, got {self.uid!r}")


_EVOLVABLE = frozenset({"argv", "run_as", "uid", "gid", "groups"})


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
    # The one-step clone3 launcher (tvmagent/launch/) works here; else the wrapper chain.
    fast_launch: bool = False
    # The tasks' mount namespace (tvmagent/launch/mntns.py): its /proc shows a task user only its
    # own processes; entered by each task the launcher starts as a task user. None: not here.
    task_mounts: TaskMounts | None = None

    @classmethod
    def detect(cls) -> SandboxCapabilities:
        notes: list[str] = []
        tools: dict[str, str] = {}
        for tool in ("sh", "env", "setpriv", "prlimit", "bwrap"):
            path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
            if path:
                tools[tool] = os.path.realpath(path) if tool != "sh" else path
        if "env" in tools:
            if _env_resets_signals(tools["env"]):
                tools["env-reset"] = tools["env"]
            else:
                notes.append(
                    f"{tools['env']} has no --default-signal: with the wrapper chain, tasks inherit"
                    " the signals the agent ignores (an agent started under nohup: SIGHUP)"
                )
        layout = _cgroups.detect_layout(notes)
        is_root = os.geteuid() == 0
        fast_launch = _probe_fast_launch(notes)
        return cls(
            fast_launch=fast_launch,
            task_mounts=_task_mounts(notes) if fast_launch and is_root else None,
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
        if self.fast_launch:
            lines.append("tasks start in one step (clone3 launcher: cgroups, user, limits, exec)")
        else:
            lines.append(
                "tasks start through an exec-time wrapper chain (sh, prlimit, setpriv, env)"
            )
        if self.task_mounts is not None:
            lines.append(
                "tasks run in a mount namespace whose /proc shows them only their own user's"
                " processes (hidepid=invisible)"
            )
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
            lines.append(
                "DEGRADED: no pids cgroup: a task's process limit falls back to RLIMIT_NPROC on its"
                " own task user (per uid); tasks running as root or a shared user are NOT limited"
            )
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


def _probe_fast_launch(notes: list[str]) -> bool:
    """Start /bin/true once through the clone3 launcher: built, and the kernel has clone3."""
    from tvmagent.launch import spawn as fast

    if not fast.fast_available():
        notes.append(f"clone3 launcher unused: {fast.fast_unavailable_reason()}")
        return False
    true = shutil.which("true", path="/usr/bin:/bin")
    if true is None:
        return False
    fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        return fast.spawn(true, ["true"], {}, "/", (fd, fd, fd)).wait_blocking() == 0
    except (fast.SpawnError, OSError) as e:
        notes.append(f"clone3 launcher unusable here ({e}): tasks start through the wrapper chain")
        return False
    finally:
        os.close(fd)


def _task_mounts(notes: list[str]) -> TaskMounts | None:
    from tvmagent.launch.mntns import TaskMounts

    try:
        return TaskMounts()
    except OSError as e:
        notes.append(f"no private /proc for tasks ({e}): tasks see every user's processes")
        return None


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


def root_entries() -> dict[str, str | None]:
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
    reset_signals: bool = False,
) -> Plan:
    """The full wrapper chain for ``spec`` (pure). ``nproc``: RLIMIT_NPROC, the pids limit's
    fallback where no pids cgroup enforces it; ``groups``: the user's supplementary groups;
    ``reset_signals``: the agent ignores signals an exec would pass on (see `inherited_ignores`),
    which `env --default-signal` puts back to default for the task."""
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
        chain += [tools["setpriv"], f"--reuid={uid}", f"--regid={gid}", extra]
        chain += ["--no-new-privs", "--"]  # as the compiled launcher: no setuid file helps
    spawn_env, held = split_env(spec.env, wrapped=bool(chain) or bwrap_prefix is not None)
    reset = reset_signals and "env-reset" in tools
    if held or reset:
        chain += [tools["env"], *(["--default-signal"] if reset else []), "--"]
        chain += [f"{k}={v}" for k, v in held.items()]
    if bwrap_prefix is not None:
        chain += bwrap_prefix
    if not chain:
        return Plan(argv=list(spec.argv), env=spawn_env, executable=exe)
    full = [*chain, exe, *spec.argv[1:]]
    return Plan(argv=full, env=spawn_env, executable=full[0])


def launch_rlimits(nofile: int | None, nproc: int | None) -> tuple[tuple[int, int, int], ...]:
    """(resource, soft, hard) for the launcher, as the chain's prlimit sets them."""
    import resource

    out = []
    if nofile is not None:
        out.append((resource.RLIMIT_NOFILE, nofile, nofile))
    if nproc is not None:
        out.append((resource.RLIMIT_NPROC, nproc, nproc))
    return tuple(out)


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


def scan_proc(pids: Iterable[int] | None = None) -> list[ProcInfo]:
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


def utcnow() -> datetime:
    return datetime.now(UTC)


# Signals `subprocess` itself puts back to default in the child (restore_signals).
_RESTORED = (13, 25)  # SIGPIPE, SIGXFSZ


def inherited_ignores() -> bool:
    """Does this process ignore a signal that an exec passes on to the task and `subprocess` does
    not restore (an agent started under nohup: SIGHUP; in the background by a script: SIGINT,
    SIGQUIT)? The clone3 launcher resets every signal; the wrapper chain needs `env` for it."""
    try:
        with open("/proc/self/status") as f:
            line = next((ln for ln in f if ln.startswith("SigIgn:")), "")
    except OSError:
        return True  # unknown: reset to be sure
    if not line:
        return True
    mask = int(line.split()[1], 16)
    for sig in _RESTORED:
        mask &= ~(1 << (sig - 1))
    return mask != 0


def _env_resets_signals(env: str) -> bool:
    """coreutils `env` >= 8.31 has --default-signal; busybox's has not."""
    import subprocess

    try:
        done = subprocess.run(
            [env, "--default-signal", "--", "true"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0
