"""Per-task cgroups: layout detection (pure parsing + probing) and one task's cgroup set.

A task gets one directory in every usable hierarchy: the v2 one (for ``cgroup.kill`` and, when
delegated, memory/pids limits) and the v1 ``memory``/``pids`` ones (hybrid hosts). All of them are
nested under the agent's *own* cgroup, so limits and accounting of whoever runs the agent still
apply, and the agent never writes outside its own subtree.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
from dataclasses import dataclass, field

# Controllers the sandbox uses for limits.
LIMIT_CONTROLLERS = ("memory", "pids")


@dataclass(frozen=True)
class Mount:
    fstype: str  # "cgroup" or "cgroup2"
    mountpoint: str
    root: str  # the path inside the hierarchy that is mounted (usually "/")
    options: frozenset[str]  # super options: v1 controller names live here


@dataclass(frozen=True)
class CgroupLayout:
    """Where task cgroups go. Empty fields mean "not usable here"."""

    v2_base: str | None = None  # agent's own v2 cgroup dir, writable
    v2_has_kill: bool = False  # cgroup.kill exists (kernel >= 5.14)
    v2_controllers: frozenset[str] = frozenset()  # limit controllers usable in v2 children
    v1_bases: dict[str, str] = field(default_factory=dict)  # controller -> agent's own v1 dir

    @property
    def mode(self) -> str:
        if self.v2_controllers:
            return "v2"
        if self.v1_bases:
            return "v1"
        return "none"

    @property
    def usable(self) -> bool:
        return self.v2_base is not None or bool(self.v1_bases)

    def bases(self) -> list[str]:
        """Every hierarchy's directory the agent's task cgroups go under."""
        return ([self.v2_base] if self.v2_base else []) + list(self.v1_bases.values())

    def controller_dir(self, controller: str) -> str | None:
        """Base dir that enforces ``controller``, v2 preferred."""
        if controller in self.v2_controllers:
            return self.v2_base
        return self.v1_bases.get(controller)


# ---------------------------------------------------------------- pure parsing


def parse_mountinfo(text: str) -> list[Mount]:
    """cgroup mounts from /proc/self/mountinfo (other mounts are skipped)."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf = left.split()
        rf = right.split()
        if len(lf) < 5 or len(rf) < 3 or rf[0] not in ("cgroup", "cgroup2"):
            continue
        mounts.append(
            Mount(
                fstype=rf[0],
                mountpoint=_unescape_mount(lf[4]),
                root=_unescape_mount(lf[3]),
                options=frozenset(rf[2].split(",")),
            )
        )
    return mounts


def _unescape_mount(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def parse_proc_cgroup(text: str) -> tuple[str | None, dict[str, str]]:
    """(/proc/self/cgroup) -> (v2 path or None, {v1 controller: path})."""
    v2: str | None = None
    v1: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hid, ctrls, path = parts
        if hid == "0" and ctrls == "":
            v2 = path
        else:
            for c in ctrls.split(","):
                if c:
                    v1[c] = path
    return v2, v1


def own_dirs(
    mounts: list[Mount], v2_path: str | None, v1_paths: dict[str, str]
) -> tuple[str | None, dict[str, str]]:
    """Directories of the agent's own cgroups: (v2 dir, {controller: v1 dir})."""
    v2_dir: str | None = None
    v1_dirs: dict[str, str] = {}
    for m in mounts:
        if m.fstype == "cgroup2" and v2_path is not None and v2_dir is None:
            v2_dir = _join_under(m, v2_path)
        elif m.fstype == "cgroup":
            for c in LIMIT_CONTROLLERS:
                if c in m.options and c in v1_paths and c not in v1_dirs:
                    v1_dirs[c] = _join_under(m, v1_paths[c])
    return v2_dir, v1_dirs


def _join_under(m: Mount, path: str) -> str:
    # A mount of a sub-tree (root != "/") shows paths relative to that root.
    rel = path
    if m.root != "/" and path.startswith(m.root):
        rel = path[len(m.root) :]
    return os.path.normpath(m.mountpoint + "/" + rel.lstrip("/"))


def sanitize_name(name: str, max_len: int = 40) -> str:
    """A cgroup directory name from a task name: safe characters only, never empty."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:max_len].lstrip(".")
    return cleaned or "task"


def parse_flat_keyed(text: str) -> dict[str, int]:
    """``key value`` lines (memory.events, memory.oom_control) -> dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


# ---------------------------------------------------------------- detection (I/O)


# Plain descriptors, not open(): a buffered file object costs five more system calls (fstat,
# ioctl, lseek...) per read, and the agent reads a cgroup file or two for every task it runs.
def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def _write(path: str, value: str) -> None:
    # the flags open(path, "w") uses, so a missing file fails as it did
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _probe_mkdir(base: str) -> bool:
    probe = os.path.join(base, f"tvm-probe-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    with contextlib.suppress(OSError):
        os.rmdir(probe)
    return True


def _enable_v2_controllers(base: str, is_root: bool, notes: list[str]) -> frozenset[str]:
    """Make memory/pids usable for children of ``base``; returns what worked."""
    try:
        available = set(_read(os.path.join(base, "cgroup.controllers")).split())
        enabled = set(_read(os.path.join(base, "cgroup.subtree_control")).split())
    except OSError:
        return frozenset()
    wanted = [c for c in LIMIT_CONTROLLERS if c in available]
    if not wanted:
        return frozenset()
    missing = [c for c in wanted if c not in enabled]
    if missing and not is_root:
        # "No internal processes": our own cgroup must hold no process before it can enable
        # controllers for children, so the agent moves its processes into a leaf first.
        leaf = os.path.join(base, "agent")
        try:
            os.makedirs(leaf, exist_ok=True)
            for pid in _read(os.path.join(base, "cgroup.procs")).split():
                with contextlib.suppress(ProcessLookupError):
                    _write(os.path.join(leaf, "cgroup.procs"), pid)
        except OSError as e:
            notes.append(f"cgroup v2: could not move the agent into {leaf}: {e}")
            return frozenset()
    for c in missing:
        try:
            _write(os.path.join(base, "cgroup.subtree_control"), f"+{c}")
        except OSError as e:
            notes.append(f"cgroup v2: cannot enable {c} in {base}: {e}")
    try:
        enabled = set(_read(os.path.join(base, "cgroup.subtree_control")).split())
    except OSError:
        return frozenset()
    return frozenset(c for c in wanted if c in enabled)


def detect_layout(notes: list[str]) -> CgroupLayout:
    """Probe this host's cgroups; appends human-readable findings to ``notes``."""
    try:
        mounts = parse_mountinfo(_read("/proc/self/mountinfo"))
        v2_path, v1_paths = parse_proc_cgroup(_read("/proc/self/cgroup"))
    except OSError as e:
        notes.append(f"cgroups: cannot read /proc ({e})")
        return CgroupLayout()
    v2_dir, v1_dirs = own_dirs(mounts, v2_path, v1_paths)

    v2_base: str | None = None
    v2_controllers: frozenset[str] = frozenset()
    v2_has_kill = False
    if v2_dir is not None:
        if _probe_mkdir(v2_dir):
            v2_base = v2_dir
            is_root = v2_path == "/"
            v2_controllers = _enable_v2_controllers(v2_dir, is_root, notes)
            v2_has_kill = _probe_kill_file(v2_dir)
        else:
            notes.append(f"cgroup v2 at {v2_dir} is not writable (not delegated)")

    v1_bases: dict[str, str] = {}
    for c, d in v1_dirs.items():
        if c in v2_controllers:
            continue
        if _probe_mkdir(d):
            v1_bases[c] = d
        else:
            notes.append(f"cgroup v1 {c} at {d} is not writable")
    return CgroupLayout(
        v2_base=v2_base, v2_has_kill=v2_has_kill, v2_controllers=v2_controllers, v1_bases=v1_bases
    )


def _probe_kill_file(base: str) -> bool:
    # cgroup.kill only exists in non-root cgroups, so look inside a probe child.
    probe = os.path.join(base, f"tvm-probe-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    try:
        return os.path.exists(os.path.join(probe, "cgroup.kill"))
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(probe)


# ---------------------------------------------------------------- one task's cgroups


class TaskCgroup:
    """The cgroup directories of one task across hierarchies."""

    def __init__(
        self, layout: CgroupLayout, prefix: str, name: str, keys: tuple[str, ...] | None = None
    ) -> None:
        """``keys``: the hierarchies to use ("v2" and/or v1 controller names); default all."""
        self.layout = layout
        leaf = f"{sanitize_name(name)}-{secrets.token_hex(4)}"
        self.prefix = sanitize_name(prefix)
        self.dirs: dict[str, str] = {}  # "v2" or v1 controller -> dir
        if layout.v2_base is not None and (keys is None or "v2" in keys):
            self.dirs["v2"] = os.path.join(layout.v2_base, self.prefix, leaf)
        for c, base in layout.v1_bases.items():
            if keys is None or c in keys:
                self.dirs[c] = os.path.join(base, self.prefix, leaf)
        self.keys = tuple(self.dirs)
        self.created = False
        # cgroup.kill was written: on 6.18 a child later cloned INTO such a cgroup is killed at
        # birth, so a killed cgroup is removed, never reused.
        self.killed = False
        self._handles: tuple[int, tuple[int, ...]] | None = None  # see launch_handles()
        self._limits: tuple[int | None, int | None] = (None, None)  # as last written
        self._oom_base = 0  # oom kills counted before this task (a reused cgroup keeps counting)
        self._oom_next: int | None = None  # the count at the end of the task before
        self._procs_files: list[str] | None = None  # what pids() reads
        self._oom_counter = False  # v1 memory.oom_control has an oom_kill count (kernel >= 4.13)

    def rearm(self, memory_bytes: int | None, pids: int | None) -> None:
        """Ready the (new or reused, empty) cgroup for one task: its limits, a zero oom count."""
        if (memory_bytes, pids) != self._limits:
            self.set_limits(memory_bytes, pids)
        if self._oom_next is not None:  # read at the end of the task before (see oom_kills)
            self._oom_base, self._oom_next = self._oom_next, None
        elif self.enforces("memory"):
            self._oom_base = self._oom_count()
        else:
            self._oom_base = 0
        if self.enforces("memory"):
            if "memory" in self.dirs and not self._oom_counter:
                # v1 without an oom_kill counter: the fallback evidence (failcnt) starts at zero
                with contextlib.suppress(OSError):
                    _write(os.path.join(self.dirs["memory"], "memory.failcnt"), "0")
                self._oom_base = 0

    def exists(self) -> bool:
        return all(os.path.isdir(d) for d in self.dirs.values())

    def create(self) -> None:
        self._close_handles()  # of directories removed meanwhile, if it is made again
        self.killed = False
        self.created = True
        self._limits = (None, None)  # a fresh directory has none
        self._oom_next = None
        try:
            for key, d in self.dirs.items():
                _mkdir_retry(d)
                if key == "v2" and self.layout.v2_controllers:
                    # The prefix dir must pass the controllers on to task dirs.
                    parent = os.path.dirname(d)
                    enabled = set(_read(os.path.join(parent, "cgroup.subtree_control")).split())
                    for c in self.layout.v2_controllers - enabled:
                        _write(os.path.join(parent, "cgroup.subtree_control"), f"+{c}")
        except OSError:
            self.remove()
            raise

    def launch_handles(self) -> tuple[int, tuple[int, ...]]:
        """(v2 directory fd or -1, v1 ``tasks`` fds) for the one-step launcher: the child is born
        in the v2 cgroup and writes itself into each v1 one. Opened once, kept while the cgroup is."""
        if self._handles is None:
            fds: list[int] = []
            try:
                v2 = -1
                if "v2" in self.dirs:
                    v2 = os.open(self.dirs["v2"], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                    fds.append(v2)
                joins = []
                for key, d in self.dirs.items():
                    if key != "v2":
                        joins.append(os.open(os.path.join(d, "tasks"), os.O_WRONLY | os.O_CLOEXEC))
                        fds.append(joins[-1])
            except OSError:
                for fd in fds:
                    os.close(fd)
                raise
            self._handles = (v2, tuple(joins))
        return self._handles

    def _close_handles(self) -> None:
        handles, self._handles = self._handles, None
        if handles is not None:
            for fd in (handles[0], *handles[1]):
                if fd >= 0:
                    with contextlib.suppress(OSError):
                        os.close(fd)

    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def set_limits(self, memory_bytes: int | None, pids: int | None) -> None:
        """Write both limits; None means "no limit" (a reused cgroup may still hold an old one)."""
        old_mem, old_pids = self._limits
        if memory_bytes is not None or old_mem is not None:
            if "memory" in self.layout.v2_controllers:
                value = "max" if memory_bytes is None else str(memory_bytes)
                _write(os.path.join(self.dirs["v2"], "memory.max"), value)
                with contextlib.suppress(OSError):
                    _write(
                        os.path.join(self.dirs["v2"], "memory.swap.max"),
                        "0" if memory_bytes else "max",
                    )
            elif "memory" in self.dirs:
                md = self.dirs["memory"]
                value = "-1" if memory_bytes is None else str(memory_bytes)
                # memsw must stay >= the RAM limit: raise it first when the limit grows, lower it
                # after when it shrinks (one of the two memsw writes fails harmlessly).
                with contextlib.suppress(OSError):
                    _write(os.path.join(md, "memory.memsw.limit_in_bytes"), value)
                _write(os.path.join(md, "memory.limit_in_bytes"), value)
                # Without this the limit only covers RAM and the task can swap past it.
                with contextlib.suppress(OSError):
                    _write(os.path.join(md, "memory.memsw.limit_in_bytes"), value)
        if pids is not None or old_pids is not None:
            value = "max" if pids is None else str(pids)
            if "pids" in self.layout.v2_controllers:
                _write(os.path.join(self.dirs["v2"], "pids.max"), value)
            elif "pids" in self.dirs:
                _write(os.path.join(self.dirs["pids"], "pids.max"), value)
        self._limits = (memory_bytes, pids)

    def enforces(self, controller: str) -> bool:
        if controller in self.layout.v2_controllers:
            return "v2" in self.dirs
        return controller in self.dirs

    def pids(self) -> set[int]:
        out: set[int] = set()
        # Every process of the task is in the v2 cgroup from birth (and joins the v1 ones after):
        # where there is one, it alone holds the whole tree.
        if self._procs_files is None:
            files = self.procs_files()
            self._procs_files = files[:1] if "v2" in self.dirs else files
        files = self._procs_files
        for f in files:
            with contextlib.suppress(OSError):
                out.update(int(p) for p in _read(f).split())
        return out

    def signal_all(self, sig: int) -> None:
        """Signal every member; for SIGKILL use ``cgroup.kill`` when the kernel has it."""
        if sig == signal.SIGKILL and self.layout.v2_has_kill and "v2" in self.dirs:
            self.killed = True
            try:
                _write(os.path.join(self.dirs["v2"], "cgroup.kill"), "1")
            except OSError:
                pass
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def oom_kills(self) -> int:
        """How many processes the kernel OOM-killed in this task's memory cgroup (this task's run).
        The count read here is the next task's starting point: the tree is gone, so nothing of
        this cgroup can be OOM-killed before the next task starts in it (one read per task)."""
        count = self._oom_count()
        self._oom_next = count if self._oom_counter or "memory" not in self.dirs else None
        return max(0, count - self._oom_base)

    def _oom_count(self) -> int:
        """The cgroup's cumulative oom-kill count."""
        try:
            if "memory" in self.layout.v2_controllers and "v2" in self.dirs:
                return parse_flat_keyed(_read(os.path.join(self.dirs["v2"], "memory.events"))).get(
                    "oom_kill", 0
                )
            if "memory" in self.dirs:
                md = self.dirs["memory"]
                ctl = parse_flat_keyed(_read(os.path.join(md, "memory.oom_control")))
                if "oom_kill" in ctl:
                    self._oom_counter = True
                    return ctl["oom_kill"]
                # Old kernels have no counter: hitting the limit is the best evidence left.
                return 1 if int(_read(os.path.join(md, "memory.failcnt")).strip() or 0) else 0
        except (OSError, ValueError):
            pass
        return 0

    def rss_bytes(self) -> int | None:
        d = self.dirs.get("v2") if "memory" in self.layout.v2_controllers else None
        try:
            if d is not None:
                return int(_read(os.path.join(d, "memory.current")))
            if "memory" in self.dirs:
                return int(_read(os.path.join(self.dirs["memory"], "memory.usage_in_bytes")))
        except (OSError, ValueError):
            pass
        return None

    def remove(self) -> list[str]:
        """rmdir every task dir (and the prefix dir when it became empty); returns failures."""
        self._close_handles()
        failures: list[str] = []
        for d in self.dirs.values():
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as e:
                failures.append(f"{d}: {e.strerror}")
                continue
            # An empty prefix dir left behind would keep our parent cgroup from being removed.
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(d))
        return failures


def stale_task_dirs(layout: CgroupLayout, prefix: str) -> list[str]:
    """Task cgroup dirs under ``prefix`` in every hierarchy (e.g. left by a crashed agent)."""
    out: list[str] = []
    for b in layout.bases():
        root = os.path.join(b, sanitize_name(prefix))
        with contextlib.suppress(OSError):
            out += [e.path for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    return out


def kill_and_remove(d: str) -> bool:
    """SIGKILL every member of cgroup dir ``d`` and try to rmdir it (and its empty parent)."""
    with contextlib.suppress(OSError):  # v2 with kernel >= 5.14 only; v1 has no such file
        _write(os.path.join(d, "cgroup.kill"), "1")
    with contextlib.suppress(OSError):
        for pid in _read(os.path.join(d, "cgroup.procs")).split():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(pid), signal.SIGKILL)
    try:
        os.rmdir(d)
    except FileNotFoundError:
        pass
    except OSError:
        return False
    with contextlib.suppress(OSError):
        os.rmdir(os.path.dirname(d))
    return True


def _mkdir_retry(d: str) -> None:
    # Another task's cleanup may rmdir the shared prefix dir between our two mkdirs.
    for _ in range(5):
        try:
            os.makedirs(os.path.dirname(d), exist_ok=True)
            os.mkdir(d)
            return
        except FileExistsError:
            return  # a reused cgroup of which another hierarchy's directory had gone
        except FileNotFoundError:
            continue
    os.mkdir(d)
