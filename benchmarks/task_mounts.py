"""What the tasks' mount namespace (tvmagent/launch/mntns.py: a private `/proc` with hidepid) costs
a launch: the clone3 launcher starting `/bin/true` as an unprivileged uid, one at a time, without
and with entering the namespace, in alternating rounds. Prints wall time per launch, the launching
process's own CPU and the children's, for both.

    python -m benchmarks.task_mounts [--quick] [--launches 2000] [--rounds 3]

Needs root and the clone3 launcher; says so and skips otherwise.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

from tvmagent.launch import spawn as fast
from tvmagent.launch.mntns import TaskMounts

from ._common import args, emit, say

NOBODY = (65534, 65534, ())


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--launches", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)


def _round(n: int, mntns_fd: int) -> tuple[float, float, float]:
    """(wall, own CPU, children's CPU) per launch, in µs."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    me0, kids0 = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    t0 = time.perf_counter()
    try:
        for _ in range(n):
            child = fast.spawn(
                "/bin/true", ["true"], {}, "/", (null, null, null), ids=NOBODY, mntns_fd=mntns_fd
            )
            child.wait_blocking()
    finally:
        os.close(null)
    wall = time.perf_counter() - t0
    me1, kids1 = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    own = me1.ru_utime + me1.ru_stime - me0.ru_utime - me0.ru_stime
    kids = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    return wall / n * 1e6, own / n * 1e6, kids / n * 1e6


def main() -> None:
    ns = args(__doc__.split("\n\n")[0], _options)
    n = 200 if ns.quick else ns.launches
    rounds = 1 if ns.quick else ns.rounds
    if os.geteuid() != 0 or not fast.fast_available():
        say("task_mounts: skipped (needs root and the clone3 launcher)")
        return
    try:
        mounts = TaskMounts()
    except OSError as e:
        say(f"task_mounts: skipped (this host refuses a mount namespace: {e})")
        return
    results: dict[str, list[tuple[float, float, float]]] = {"host": [], "namespace": []}
    try:
        for _ in range(rounds):
            results["host"].append(_round(n, -1))
            results["namespace"].append(_round(n, mounts.fd()))
    finally:
        mounts.close()
    for variant, rows in results.items():
        wall = sorted(r[0] for r in rows)[len(rows) // 2]
        params = {"launches": n, "rounds": rounds, "variant": variant}
        emit("task_mounts_launch_wall", params, wall / 1000, "ms")
        emit(
            "task_mounts_launch_cpu_parent",
            params,
            sorted(r[1] for r in rows)[len(rows) // 2] / 1000,
            "ms",
        )
        emit(
            "task_mounts_launch_cpu_child",
            params,
            sorted(r[2] for r in rows)[len(rows) // 2] / 1000,
            "ms",
        )
        say(
            f"task_mounts: {variant:9s} per launch (rounds: wall / launcher CPU / child CPU µs): "
            + "; ".join(f"{w:.0f} / {o:.0f} / {k:.0f}" for w, o, k in rows)
        )


if __name__ == "__main__":
    main()
