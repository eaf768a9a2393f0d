"""The floor under end_to_end on this machine: what its tasks cost in the kernel with nothing of TVM
Batch around them, beside raw spawn in the same run.

- raw spawn: as end_to_end measures it (4 threads each running `/bin/true` and waiting).
- sandboxed: 4 threads, one per slot, each doing per task what any agent must do for one task of
  end_to_end and nothing more: its directory made (the task directory, `wd`, `stdout.txt`,
  `stderr.txt`, the outputs owned by the slot's unprivileged uid), the clone3 launcher's start (born
  in the slot's v2 cgroup, joined to v1 memory and pids cgroups with limits, new session, rlimits,
  the uid and no extra groups) and the wait for its end. No agent, coordinator, protocol or journal;
  the agent's own code for the cgroups and the clone (`tvmagent/_cgroups.py`,
  `tvmagent/launch/spawn.py`). The directories sit in a directory marked as the agent marks its
  stock of ready directories.
- sandboxed, directories ahead: the same with the directories made before the clock starts (as the
  agent's stock makes them beside the critical path: the CPU is spent all the same).

What it answers: end_to_end's target of 0.6 of raw spawn leaves `2 CPUs / (0.6 × raw rate)` of CPU
per task; the sandboxed floor's CPU per task (launching threads and tasks) comes out of that first.
What is left is all the agent, the coordinator and the submitter may spend per task. And the
launching side's CPU per task (the directory, the clone, the wait; its threads and their system
calls, no protocol or state) is what any agent spends per task before it does anything of its own.

    python -m benchmarks.floor [--quick] [--tasks 3000]

Needs root, the clone3 launcher and a writable cgroup v2 hierarchy; says so and skips otherwise.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import threading
import time

from tvmagent import _cgroups
from tvmagent.launch import spawn as fast
from tvmagent.procspec import launch_rlimits
from tvmagent.taskdirs import _mark_topdir

from ._common import args, emit, raw_spawn_rate, say

SLOTS = 4
CPUS = os.cpu_count() or 1
UID0 = 3_900_000_000  # slot uids: no account needed to run as one, none of the host's in this range
MEMORY = 512 * 1024 * 1024
PIDS = 128
AGENT_TARGET_US = 150  # the agent CPU per task asked of end_to_end


def _cpu() -> tuple[float, float]:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


def _make_dir(base: str, name: str) -> str:
    """A task directory as the agent's stock makes it (root's until a task user takes it)."""
    tdir = os.path.join(base, name)
    os.mkdir(tdir, 0o700)
    os.mkdir(os.path.join(tdir, "wd"), 0o700)
    for out in ("stdout.txt", "stderr.txt"):
        os.close(os.open(os.path.join(tdir, out), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640))
    return tdir


def _open_for(tdir: str, uid: int) -> list[int]:
    """The task user's: its directories (as the agent's lease does) and outputs; stdin, stdout and
    stderr for the clone."""
    os.chown(tdir, uid, uid)
    os.chown(os.path.join(tdir, "wd"), uid, uid)
    fds = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)]
    for out in ("stdout.txt", "stderr.txt"):
        fd = os.open(os.path.join(tdir, out), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.fchown(fd, uid, uid)
        fds.append(fd)
    return fds


def sandboxed_rate(n: int, base: str, ahead: bool) -> tuple[float, float, float]:
    """(tasks/s, launching CPU per task, task CPU per task) for `n` sandboxed starts over 4 slots."""
    notes: list[str] = []
    layout = _cgroups.detect_layout(notes)
    keys = tuple(k for k in ("v2", "memory", "pids") if k == "v2" or k in layout.v1_bases)
    cgroups = [
        _cgroups.TaskCgroup(layout, f"tvm-floor-{os.getpid()}", f"slot{i}", keys)
        for i in range(SLOTS)
    ]
    os.makedirs(base, 0o711)  # the slots' uids pass through to their own directories
    os.chmod(os.path.dirname(base), 0o711)
    _mark_topdir(base)
    names = [f"t{i}" for i in range(n)]
    ready: list[str] = []
    if ahead:
        ready = [_make_dir(base, name) for name in names]
    left = list(range(n))
    lock = threading.Lock()
    errors: list[BaseException] = []
    env = {"PATH": "/usr/bin:/bin"}
    rlimits = launch_rlimits(1024, None)

    def slot(i: int) -> None:
        uid = UID0 + i
        cg = cgroups[i]
        try:
            cg.create()
            cg.rearm(MEMORY, PIDS)
            v2, joins = cg.launch_handles()
            while True:
                with lock:
                    if not left:
                        return
                    k = left.pop()
                tdir = ready[k] if ahead else _make_dir(base, names[k])
                fds = _open_for(tdir, uid)
                req = fast.Request(
                    "/bin/true",
                    ["/bin/true"],
                    env,
                    os.path.join(tdir, "wd"),
                    (fds[0], fds[1], fds[2]),
                    v2,
                    joins,
                    (uid, uid, ()),
                    rlimits,
                )
                code = fast.start(req).wait_blocking()
                if code != 0:
                    raise RuntimeError(f"/bin/true as uid {uid} ended with {code}")
        except BaseException as e:  # reported by the caller
            errors.append(e)

    threads = [threading.Thread(target=slot, args=(i,)) for i in range(SLOTS)]
    try:
        cpu0 = _cpu()
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
        cpu1 = _cpu()
    finally:
        with lock:
            left.clear()  # interrupted: the slots stop after their task of the moment...
        for t in threads:
            if t.is_alive():
                t.join()  # ...whose cgroups can go only once it has ended
        for cg in cgroups:
            cg.remove()
        shutil.rmtree(base, ignore_errors=True)
    if errors:
        raise errors[0]
    return n / elapsed, (cpu1[0] - cpu0[0]) / n, (cpu1[1] - cpu0[1]) / n


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", type=int, default=3000, help="tasks per measurement")


def main() -> None:
    ns = args(__doc__.split("\n\n")[0], _options)
    n = 300 if ns.quick else ns.tasks
    params = {"tasks": n, "slots": SLOTS, "command": "/bin/true"}
    notes: list[str] = []
    layout = _cgroups.detect_layout(notes)
    why = (
        "needs root"
        if os.geteuid() != 0
        else "the clone3 launcher is not built"
        if not fast.fast_available()
        else "no writable cgroup v2 hierarchy"
        if layout.v2_base is None
        else ""
    )
    if why:
        say(f"floor: skipped ({why})")
        return
    with tempfile.TemporaryDirectory(prefix="tvm-floor-") as tmp:
        raw_before = raw_spawn_rate(n, SLOTS)
        rate, launch_cpu, task_cpu = sandboxed_rate(n, os.path.join(tmp, "inline"), ahead=False)
        rate_ahead, launch_ahead, task_ahead = sandboxed_rate(
            n, os.path.join(tmp, "ahead"), ahead=True
        )
        raw_after = raw_spawn_rate(n, SLOTS)
    raw = (raw_before + raw_after) / 2
    emit("floor_raw_spawn", params, raw, "tasks/s")
    emit("floor_sandboxed", params, rate, "tasks/s")
    emit("floor_sandboxed_ratio", params, rate / raw, "ratio")
    emit("floor_sandboxed_ahead", params, rate_ahead, "tasks/s")
    floor_cpu = launch_cpu + task_cpu
    allowed = CPUS / (0.6 * raw)
    budget = allowed - floor_cpu
    emit("floor_cpu_per_task", params, floor_cpu * 1e3, "ms")
    emit("floor_share_of_target_cpu", params, floor_cpu / allowed, "ratio")
    emit("floor_launching_cpu_per_task", params, launch_cpu * 1e3, "ms")
    emit("floor_launching_cpu_per_task_ahead", params, launch_ahead * 1e3, "ms")
    say(
        f"floor over {n} × /bin/true, {SLOTS} slots: raw spawn {raw:,.0f}/s (before {raw_before:,.0f},"
        f" after {raw_after:,.0f}); sandboxed {rate:,.0f}/s (ratio {rate / raw:.2f}; CPU per task:"
        f" launching {launch_cpu * 1e6:,.0f} µs, task {task_cpu * 1e6:,.0f} µs); directories made"
        f" ahead {rate_ahead:,.0f}/s (launching {launch_ahead * 1e6:,.0f} µs, task"
        f" {task_ahead * 1e6:,.0f} µs, directories not counted).\n"
        f"At 0.6 of raw spawn ({0.6 * raw:,.0f}/s) {CPUS} CPUs give {allowed * 1e6:,.0f} µs per"
        f" task; the sandboxed floor takes {floor_cpu * 1e6:,.0f} µs of it, which leaves"
        f" {budget * 1e6:,.0f} µs for agent, coordinator and submitter together.\n"
        f"An agent's own CPU per task cannot be under this floor's launching side:"
        f" {launch_cpu * 1e6:,.0f} µs with the task's directory made,"
        f" {launch_ahead * 1e6:,.0f} µs without (against the {AGENT_TARGET_US} µs asked of an agent)."
    )


if __name__ == "__main__":
    main()
