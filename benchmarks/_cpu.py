"""CPU time of processes and their trees, from /proc: who pays how much per task.

`/proc/<pid>/stat` gives a process's own user+system time and that of its children it has reaped
(waited for). A process tree is measured as its root's own time ("self") and everything below it
("children": reaped children plus the live descendants' own time, so a long-lived launcher that is
still running is counted too).
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return text[text.rindex(")") + 2 :].split()


def proc_times(pid: int) -> tuple[float, float]:
    """(own user+system seconds, reaped children's user+system seconds); zeros if gone."""
    f = _stat(pid)
    if f is None:
        return 0.0, 0.0
    # After the name: state ppid ... utime(14) stime(15) cutime(16) cstime(17), counted from 1.
    return (int(f[11]) + int(f[12])) / _TICK, (int(f[13]) + int(f[14])) / _TICK


def children_map() -> dict[int, list[int]]:
    """ppid -> pids of every process on the host (one scan of /proc)."""
    out: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        f = _stat(int(name))
        if f is not None:
            out.setdefault(int(f[1]), []).append(int(name))
    return out


def descendants(pid: int, kids: dict[int, list[int]] | None = None) -> list[int]:
    kids = children_map() if kids is None else kids
    out: list[int] = []
    todo = list(kids.get(pid, ()))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


@dataclass
class TreeCpu:
    """CPU seconds of one process ("self") and of all below it ("children")."""

    own: float = 0.0
    children: float = 0.0

    def __sub__(self, other: TreeCpu) -> TreeCpu:
        return TreeCpu(self.own - other.own, self.children - other.children)


def tree_cpu(pid: int, kids: dict[int, list[int]] | None = None) -> TreeCpu:
    own, reaped = proc_times(pid)
    live = 0.0
    for d in descendants(pid, kids):
        # A live descendant's own time, plus what it reaped: a shell between the agent and
        # the task reaps the task.
        o, r = proc_times(d)
        live += o + r
    return TreeCpu(own, reaped + live)


def self_cpu() -> TreeCpu:
    """This process (all threads) and its reaped children."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return TreeCpu(me.ru_utime + me.ru_stime, ch.ru_utime + ch.ru_stime)


def per_task_ms(seconds: float, tasks: int) -> float:
    return seconds * 1000.0 / max(1, tasks)
