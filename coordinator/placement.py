"""Pure placement: which active tasks go to which free task slots of one pool.

Order: job priority (high first); between jobs of equal priority, round robin (fair); within a job,
submission order. Fill policy: `spread` deals tasks across TVMs, most free slots first; `pack` fills
one TVM before the next. No I/O, no per-task allocation beyond the result list.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import groupby

from .records import ACTIVE, Job, TaskRec, Tvm


def _next_tasks(jobs: list[Job]) -> Iterator[tuple[Job, TaskRec]]:
    # Equal priority: the job served least recently first (`Job.served`), so one slot freed at a
    # time still alternates between jobs (round robin across scheduling passes, not only within one).
    ordered = sorted(jobs, key=lambda j: (-j.rec.priority, j.served, j.rec.created))
    for _, level_iter in groupby(ordered, key=lambda j: j.rec.priority):
        level = list(level_iter)
        while level:
            still: list[Job] = []
            for job in level:
                q = job.queue
                while q:
                    task = q.popleft()
                    # Lazy removal: tasks terminated or deleted while queued are skipped here.
                    if task.state == ACTIVE and job.tasks.get(task.name) is task:
                        yield job, task
                        break
                if q:
                    still.append(job)
            level = still


def place(tvms: list[Tvm], jobs: list[Job], fill: str) -> list[tuple[Job, TaskRec, Tvm]]:
    """Assign queued tasks of `jobs` to free slots of `tvms` (already filtered to schedulable)."""
    slots = [[t.free, t] for t in tvms if t.free > 0]
    if not slots or not jobs:
        return []
    out: list[tuple[Job, TaskRec, Tvm]] = []
    tasks = _next_tasks(jobs)
    if fill == "pack":
        slots.sort(key=lambda s: (s[0], s[1].rec.name))
        for entry in slots:
            for _ in range(entry[0]):
                nxt = next(tasks, None)
                if nxt is None:
                    return out
                out.append((nxt[0], nxt[1], entry[1]))
        return out
    # spread: deal one task per TVM per round, TVMs with more free slots first.
    slots.sort(key=lambda s: (-s[0], s[1].rec.name))
    while slots:
        remaining = []
        for entry in slots:
            nxt = next(tasks, None)
            if nxt is None:
                return out
            out.append((nxt[0], nxt[1], entry[1]))
            entry[0] -= 1
            if entry[0] > 0:
                remaining.append(entry)
        slots = remaining
    # Tasks pulled from a queue but not placed would be lost; the generator only pulls on demand.
    return out
