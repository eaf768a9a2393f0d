"""Placement of tasks that take more than one slot (`requiredSlots`).

The scheduler's `place` deals one slot per task; a job that ever held a wider task is placed here
instead: each task goes to a TVM with enough free slots — under `pack` the fullest one it fits
(best fit, so TVMs fill up one by one), under `spread` the emptiest. A task that fits nowhere now
keeps its place at the head of its job's queue while narrower tasks behind it may start (as in Azure:
a large task does not hold a pool's small free slots hostage); it is retried on every pass. The pass
stops once no slot is free or after `MAX_SKIPPED` tasks did not fit, so a long queue of wide tasks
costs a bounded amount per pass, not a scan of the queue.

A multi-instance task needs `numberOfInstances` TVMs with every slot free, all at once (a gang): it
is handed to `start_gang` with them, or waits like a task that does not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .records import Job, TaskRec, Tvm

MAX_SKIPPED = 256


def place_wide(
    tvms: list[Tvm],
    jobs: list[Job],
    fill: str,
    next_tasks: Callable[[list[Job]], Iterator[tuple[Job, TaskRec]]],
    start_gang: Callable[[Job, TaskRec, list[Tvm]], None] | None = None,
) -> list[tuple[Job, TaskRec, Tvm]]:
    free = {t.rec.name: t.free for t in tvms if t.free > 0}
    by_name = {t.rec.name: t for t in tvms}
    total = sum(free.values())
    out: list[tuple[Job, TaskRec, Tvm]] = []
    skipped: list[tuple[Job, TaskRec]] = []
    if not total or not jobs:
        return out
    pack = fill == "pack"
    for job, task in next_tasks(jobs):
        if task.multi is not None and start_gang is not None:
            whole = sorted(n for n, k in free.items() if k == by_name[n].slots)
            count = task.multi.number_of_instances
            if len(whole) < count:
                skipped.append((job, task))
                if len(skipped) >= MAX_SKIPPED:
                    break
                continue
            gang = [by_name[n] for n in whole[:count]]
            for t in gang:
                total -= free.pop(t.rec.name)
            start_gang(job, task, gang)
            if not total:
                break
            continue
        need = task.slots
        best: str | None = None
        for name, n in free.items():
            if n < need:
                continue
            if best is None:
                best = name
                continue
            b = free[best]
            if (n < b if pack else n > b) or (n == b and name < best):
                best = name
        if best is None:
            skipped.append((job, task))
            if len(skipped) >= MAX_SKIPPED:
                break
            continue
        free[best] -= need
        total -= need
        if not free[best]:
            del free[best]
        out.append((job, task, by_name[best]))
        if not total:
            break
    # Back to the head of their queues, in their order: the generator popped them.
    for job, task in reversed(skipped):
        job.queue.appendleft(task)
    return out
