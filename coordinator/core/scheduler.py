"""The scheduler: the whole placement decision.

Job managers first (`Scheduler.place_job_managers`): restarts before first starts, then by job
priority; a restarted manager that finds no room requeues tasks of lower-or-equal priority jobs
(`make_room`); a waiting runExclusive manager reserves the least busy TVM so it drains. Then, pool by
pool, `place`: order by job priority (high first); between jobs of equal priority, round robin (fair);
within a job, submission order; a job with maxParallelTasks gets no more than it has `room` for;
a task with an affinity goes to the TVM it names while that one has a free slot.
Fill policy: `spread` deals tasks across TVMs, most free slots first;
`pack` fills one TVM before the next. No per-task allocation beyond the result list.

Once a pool's free slots are taken, jobs of short tasks (their tasks' moving average of run time
under QUEUE_TASK_S) may place a few more into the queues of agents that keep one (`Tvm.queue`):
each starts there the moment a slot frees, without a round trip through the coordinator. Only plain
one-slot tasks of jobs without a preparation task, and only while every job waiting in the pool is
such a job and no job manager waits there: anything else gets the slots as the queues drain, in
the order above. An agent hands back a task that waited a second (a long task ahead of it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from itertools import groupby
from typing import Any

from .jobprep import JobPrep
from .records import ACTIVE, RUNNING, Job, TaskRec, Tvm
from .runs import Runs
from .slotplace import place_wide
from .store import Store

# A job whose tasks run shorter than this on average may have tasks wait in agents' queues.
QUEUE_TASK_S = 0.05


def queues_tasks(job: Job) -> bool:
    """`job`'s waiting tasks may be placed into agents' queues (see the module's docstring)."""
    return 0.0 <= job.run_s < QUEUE_TASK_S and not job.wide and job.rec.prep is None


def _free(t: Tvm) -> int:
    return t.free


def _queue_room(t: Tvm) -> int:
    return t.free + t.queue


def _usable(agents: dict[str, Any], held: Callable[[Tvm], bool] | None) -> Callable[[Tvm], bool]:
    """Whether a TVM may take a task now: ready, scheduling, its agent linked, not held for a
    runExclusive job manager."""

    def usable(t: Tvm) -> bool:
        return (
            t.rec.state in ("idle", "running")
            and t.rec.scheduling == "enabled"
            and (a := agents.get(t.rec.agent_id)) is not None
            and a.connected
            and (held is None or not held(t))
        )

    return usable


def room(job: Job) -> int | None:
    """How many more of `job`'s tasks may start now under its maxParallelTasks (None: no limit).
    Its job manager is not counted: with a limit of 1 it would otherwise hold its own job."""
    cap = job.rec.max_parallel
    if cap < 0:
        return None
    running = job.tally.running
    if job.rec.jm_name:
        jm = job.tasks.get(job.rec.jm_name)
        if jm is not None and jm.state == RUNNING:
            running -= 1
    return max(0, cap - running)


def _next_tasks(jobs: list[Job]) -> Iterator[tuple[Job, TaskRec]]:
    # Equal priority: the job served least recently first (`Job.served`), so one slot freed at a
    # time still alternates between jobs (round robin across scheduling passes, not only within one).
    ordered = sorted(jobs, key=lambda j: (-j.rec.priority, j.served, j.rec.created))
    # Jobs under a maxParallelTasks: what each may still start in this pass. A task pulled and then
    # put back (a gang that did not fit, a preparation gate) counts until the next pass: never over.
    budget = {j: n for j in ordered if (n := room(j)) is not None}
    for _, level_iter in groupby(ordered, key=lambda j: j.rec.priority):
        level = [j for j in level_iter if budget.get(j, 1) > 0]
        while level:
            still: list[Job] = []
            for job in level:
                q = job.queue
                while q:
                    task = q.popleft()
                    # Lazy removal: tasks terminated or deleted while queued are skipped here.
                    if task.state == ACTIVE and job.tasks.get(task.name) is task:
                        yield job, task
                        if job in budget:
                            budget[job] -= 1
                        break
                if q and budget.get(job, 1) > 0:
                    still.append(job)
            level = still


def place(
    tvms: list[Tvm], jobs: list[Job], fill: str, room: Callable[[Tvm], int] = _free
) -> list[tuple[Job, TaskRec, Tvm]]:
    """Assign queued tasks of `jobs` to free slots of `tvms` (already filtered to schedulable).
    A task with an affinity goes to that TVM if it has a free slot (a hint: else where it is dealt).
    `room`: how many more tasks a TVM takes (its free slots; with its agent's queue: `_queue_room`)."""
    # [free slots, TVM]: a list so the count goes down in place as tasks are dealt.
    slots: list[list[Any]] = [[n, t] for t in tvms if (n := room(t)) > 0]
    if not slots or not jobs:
        return []
    out: list[tuple[Job, TaskRec, Tvm]] = []
    tasks = _next_tasks(jobs)
    named: dict[str, list[Any]] | None = None  # made at the first task with an affinity

    def next_for(entry: list[Any]) -> tuple[Job, TaskRec] | None:
        """The next task for `entry`'s TVM; tasks that prefer another TVM with room go there."""
        nonlocal named
        while True:
            nxt = next(tasks, None)
            if nxt is None or nxt[1].affinity is None:
                return nxt
            if named is None:
                named = {e[1].rec.name: e for e in slots}
            hint = named.get(nxt[1].affinity)
            if hint is None or hint is entry or hint[0] <= 0:
                return nxt
            out.append((nxt[0], nxt[1], hint[1]))
            hint[0] -= 1

    if fill == "pack":
        slots.sort(key=lambda s: (s[0], s[1].rec.name))
        for entry in slots:
            while entry[0] > 0:
                nxt = next_for(entry)
                if nxt is None:
                    return out
                out.append((nxt[0], nxt[1], entry[1]))
                entry[0] -= 1
        return out
    # spread: deal one task per TVM per round, TVMs with more free slots first.
    slots.sort(key=lambda s: (-s[0], s[1].rec.name))
    while slots:
        remaining = []
        for entry in slots:
            if entry[0] <= 0:
                continue  # filled by tasks that preferred it
            nxt = next_for(entry)
            if nxt is None:
                return out
            out.append((nxt[0], nxt[1], entry[1]))
            entry[0] -= 1
            if entry[0] > 0:
                remaining.append(entry)
        slots = [e for e in remaining if e[0] > 0]
    # Tasks pulled from a queue but not placed would be lost; the generator only pulls on demand.
    return out


def jm_pending(job: Job) -> bool:
    """The job's manager waits to be placed: none of its other tasks may start before it."""
    if not job.rec.jm_name:
        return False
    jm = job.tasks.get(job.rec.jm_name)
    return jm is not None and jm.state == ACTIVE


class Scheduler:
    def __init__(self, store: Store, runs: Runs) -> None:
        self.s = store
        self.runs = runs
        # TVMs being emptied for a waiting runExclusive job manager (recomputed on every pass).
        self.jm_reserved: set[str] | frozenset[str] = frozenset()
        self.prep: JobPrep | None = None  # set by the facade: the job preparation gate

    def schedule(self) -> int:
        """Place what can be placed now; returns the number of tasks placed."""
        s = self.s
        if s.recovering_until is not None:
            return 0
        placed = self.place_job_managers()  # job managers go first
        by_pool: dict[str, list[Job]] = {}
        jm_waits: set[str] = set()  # pools where a job manager waits: no task is queued there
        for job in s.jobs.values():
            if job.queue and job.rec.state == "active" and not jm_pending(job) and room(job) != 0:
                by_pool.setdefault(job.rec.pool, []).append(job)
            elif job.rec.jm_name and job.rec.state == "active" and jm_pending(job):
                jm_waits.add(job.rec.pool)
        agents = s.agents
        start = self.runs.start
        # Without a job manager anywhere no TVM can be held for one: skip the look at every
        # candidate's running tasks (with 1,000 TVMs, most of a pass's cost).
        held = (
            self._exclusive_held
            if self.jm_reserved or any(j.rec.jm_name for j in s.jobs.values())
            else None
        )
        usable = _usable(agents, held)
        for pool_name, jobs in by_pool.items():
            pool = s.pools.get(pool_name)
            if pool is None or pool.state != "active":
                continue
            # Only TVMs with a free slot (the index), not a scan of every TVM of the account.
            tvms = [t for t in s.free_slots.with_room(pool_name) if usable(t)]
            fill = pool.spec.tvm_fill_type
            gate = self.prep
            if gate is None or not any(j.rec.prep is not None for j in jobs):
                for job, task, tvm in self._placing(tvms, jobs, fill):
                    start(job, task, tvm)
                    job.served = s.attempts  # fairness between equal-priority jobs
                    placed += 1
            else:
                placed += self._place_gated(gate, tvms, jobs, fill)
            waiting = [j for j in jobs if j.queue and room(j) != 0]
            if not waiting or pool_name in jm_waits or not all(map(queues_tasks, waiting)):
                continue
            # The TVMs just filled, then those whose slots were already taken (once each).
            queues = {t.rec.name: t for t in tvms if t.queue and _queue_room(t) > 0}
            for t in s.free_slots.with_queue_room(pool_name):
                if usable(t):
                    queues.setdefault(t.rec.name, t)
            if queues:
                for job, task, tvm in place(list(queues.values()), waiting, fill, _queue_room):
                    start(job, task, tvm)
                    job.served = s.attempts
                    placed += 1
        s.placements += placed
        return placed

    def _placing(
        self, tvms: list[Tvm], jobs: list[Job], fill: str, gate: JobPrep | None = None
    ) -> Iterable[tuple[Job, TaskRec, Tvm]]:
        if not any(j.wide for j in jobs):
            return place(tvms, jobs, fill)
        # requiredSlots > 1 or multi-instance tasks
        if gate is None:
            return place_wide(tvms, jobs, fill, _next_tasks, self.runs.gangs.start)
        start = self.runs.gangs.start

        def gang_order(job: Job, whole: list[Tvm]) -> list[Tvm]:
            # Where the preparation succeeded first, then where it runs, then where it has not
            # run; never where it failed.
            ranked = [(gate.rank(job, t), t.rec.name, t) for t in whole]
            return [t for r, _, t in sorted(ranked, key=lambda x: x[:2]) if r < 3]

        def start_gated(job: Job, task: TaskRec, gang: list[Tvm]) -> bool:
            ready = [gate.allows(job, t) for t in gang]  # every one: starts the preparations
            if not all(ready):
                return False
            start(job, task, gang)
            return True

        return place_wide(tvms, jobs, fill, _next_tasks, start_gated, gang_order)

    def _place_gated(self, gate: JobPrep, tvms: list[Tvm], jobs: list[Job], fill: str) -> int:
        """`place`, holding back a job's tasks from TVMs where its preparation task has not
        succeeded yet (the gate starts it there); the slots they leave go to the other jobs."""
        placed = 0
        for _ in range(2):
            held: dict[Job, list[TaskRec]] = {}
            for job, task, tvm in self._placing(tvms, jobs, fill, gate):
                if gate.allows(job, tvm):
                    self.runs.start(job, task, tvm)
                    job.served = self.s.attempts
                    placed += 1
                else:
                    held.setdefault(job, []).append(task)
            for job, tasks in held.items():
                job.queue.extendleft(reversed(tasks))  # back at the front, in their order
            if not held:
                break
            jobs = [j for j in jobs if j not in held]
            tvms = [t for t in tvms if t.free > 0]
        return placed

    def _exclusive_held(self, tvm: Tvm) -> bool:
        """A runExclusive job manager runs on `tvm`, or `tvm` is being emptied for one that waits:
        nothing else may start there."""
        if tvm.rec.name in self.jm_reserved:
            return True
        for key, t in tvm.running.items():
            if t.job_manager:
                job = self.s.job_of(key)
                if job is None or job.rec.jm_exclusive:
                    return True
        return False

    def place_job_managers(self) -> int:
        """Place waiting job managers first: restarts before first starts, then by job priority.
        A restarted manager that finds no room requeues tasks of lower-or-equal priority jobs."""
        s = self.s
        reserved: set[str] = set()
        self.jm_reserved = reserved
        waiting = [
            (job, job.tasks[job.rec.jm_name])
            for job in s.jobs.values()
            if job.rec.state == "active" and job.rec.jm_name and jm_pending(job)
        ]
        if not waiting:
            return 0
        waiting.sort(
            key=lambda jt: (
                -(jt[1].requeue_count + jt[1].retry_count > 0),
                -jt[0].rec.priority,
                jt[0].rec.created,
            )
        )
        placed = 0
        for job, task in waiting:
            pool = s.pools.get(job.rec.pool)
            if pool is None or pool.state != "active":
                continue
            tvms = sorted(
                (
                    t
                    for t in s.tvms.values()
                    if t.rec.pool == job.rec.pool
                    and t.rec.state in ("idle", "running")
                    and t.rec.scheduling == "enabled"
                    and s.connected(t)
                ),
                key=lambda t: (-t.free, t.rec.name),
            )
            exclusive = job.rec.jm_exclusive
            fits = [
                t
                for t in tvms
                if not self._exclusive_held(t) and (t.free == t.slots if exclusive else t.free > 0)
            ]
            if self.prep is not None and job.rec.prep is not None:
                # Where its preparation task succeeded first, then where it runs; never where it
                # failed. A manager waits while the preparation runs.
                fits = sorted(
                    (t for t in fits if self.prep.rank(job, t) < 3),
                    key=lambda t: self.prep.rank(job, t) if self.prep else 0,
                )
                if fits and not self.prep.allows(job, fits[0]):
                    continue
            tvm = fits[0] if fits else None
            if tvm is None and task.requeue_count + task.retry_count > 0:
                tvm = self._make_room(job, tvms, exclusive)
            if tvm is not None:
                self.runs.start(job, task, tvm)
                placed += 1
            elif exclusive:
                # Without this a busy multi-slot pool could refill every freed slot and never have a
                # whole TVM free: let the least busy TVM drain (nothing new starts there).
                free = [t for t in tvms if not self._exclusive_held(t)]
                if free:
                    reserved.add(min(free, key=lambda t: (len(t.running), t.rec.name)).rec.name)
        return placed

    def _make_room(self, job: Job, tvms: list[Tvm], exclusive: bool) -> Tvm | None:
        """Requeue running tasks of jobs of lower or equal priority on one TVM so `job`'s manager fits.
        Never displaces another job manager or a task of a higher-priority job."""
        best: tuple[int, Tvm, list[tuple[Job, TaskRec]]] | None = None
        for tvm in tvms:
            victims: list[tuple[Job, TaskRec]] = []
            ok = True
            for key, t in tvm.running.items():
                owner = self.s.job_of(key)
                if t.job_manager or owner is None or owner.rec.priority > job.rec.priority:
                    ok = False
                    break
                victims.append((owner, t))
            if not ok:
                continue
            if not exclusive:
                # One slot is enough: the victim of the lowest priority, most recently started.
                victims.sort(key=lambda ot: (ot[0].rec.priority, -ot[1].state_time))
                # As many as it takes to free one slot (its agent's queue counts as taken).
                victims = victims[: max(0, 1 - tvm.free)]
            if best is None or len(victims) < best[0]:
                best = (len(victims), tvm, victims)
        if best is None:
            return None
        for owner, t in best[2]:
            self.runs.requeue_running(owner, t, "making room for a job manager")
        return best[1]
