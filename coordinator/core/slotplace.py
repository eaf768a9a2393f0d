"""Placement of tasks that take more than one slot (`requiredSlots`).

The scheduler's `place` deals one slot per task; a job that ever held a wider task is placed here
instead: each task goes to a TVM with enough free slots — under `pack` the fullest one it fits
(best fit, so TVMs fill up one by one), under `spread` the emptiest. A task that fits nowhere now
keeps its place at the head of its job's queue while narrower tasks behind it may start (as in Azure:
a large task does not hold a pool's small free slots hostage); it is retried on every pass. The pass
stops once no slot is free or after `MAX_SKIPPED` tasks did not fit, so a long queue of wide tasks
costs a bounded amount per pass, not a scan of the queue.

A multi-instance task needs `numberOfInstances` TVMs with every slot free, all at once (a gang): it
is handed to `start_gang` with them, or waits like a task that does not fit. With a job preparation
task, `gang_order` says which whole TVMs may serve the job and in what order, and `start_gang` may
decline (False: the preparation is not done on all of them yet); the TVMs stay taken for the pass.
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
    start_gang: Callable[[Job, TaskRec, list[Tvm]], bool | None] | None = None,
    gang_order: Callable[[Job, list[Tvm]], list[Tvm]] | None = None,
) -> list[tuple[Job, TaskRec, Tvm]]:
    out: list[tuple[Job, TaskRec, Tvm]] = []
    if not tvms or not jobs:
        return out
    # TVMs by their free slots (buckets[k]: the TVMs with k free): choosing one is a look at a few
    # buckets, not a scan of the pool's TVMs, whatever its size.
    top = max(t.slots for t in tvms)
    buckets: list[dict[str, Tvm]] = [{} for _ in range(top + 1)]
    total = 0
    for t in sorted(tvms, key=lambda t: t.rec.name):
        if t.free > 0:
            buckets[t.free][t.rec.name] = t
            total += t.free
    free = {name: k for k, b in enumerate(buckets) for name in b}
    skipped: list[tuple[Job, TaskRec]] = []
    pack = fill == "pack"

    def take(t: Tvm, n: int) -> None:
        nonlocal total
        k = free.pop(t.rec.name)
        del buckets[k][t.rec.name]
        total -= n
        if k > n:
            free[t.rec.name] = k - n
            buckets[k - n][t.rec.name] = t

    for job, task in next_tasks(jobs) if total else ():
        if task.multi is not None and start_gang is not None:
            count = task.multi.number_of_instances
            whole = [t for b in buckets for t in b.values() if free[t.rec.name] == t.slots]
            whole = (
                gang_order(job, whole)
                if gang_order is not None
                else sorted(whole, key=lambda t: t.rec.name)
            )
            if len(whole) < count:
                skipped.append((job, task))
                if len(skipped) >= MAX_SKIPPED:
                    break
                continue
            gang = whole[:count]
            for t in gang:
                take(t, t.slots)
            if start_gang(job, task, gang) is False:
                skipped.append((job, task))
        else:
            need = task.slots
            ks = range(need, top + 1) if pack else range(top, need - 1, -1)
            k = next((k for k in ks if buckets[k]), 0)
            if not k:
                skipped.append((job, task))
                if len(skipped) >= MAX_SKIPPED:
                    break
                continue
            tvm = next(iter(buckets[k].values()))
            take(tvm, need)
            out.append((job, task, tvm))
        if not total:
            break
    # Back to the head of their queues, in their order: the generator popped them.
    for job, task in reversed(skipped):
        job.queue.appendleft(task)
    return out
