"""Task dependencies: checking `dependsOn` at add time, the per-job reverse index, and exit conditions.

A task with dependencies is resolved when it is added: every id (and every integer of every range)
must name a task of the job or of the same collection, so the dependency graph only grows by new
leaves and a cycle can only be made inside one collection (checked there). What a task resolved to
is kept on its record (`TaskRec.deps`, one unit per parent) and survives a restart.

The index (`records.JobDeps`) holds, per parent, the dependents to tell and, per waiting task, how
many units are still unsatisfied. A waiting task is not in its job's queue, so placement only ever
sees ready tasks; a completion touches only its own dependents (a 100,000-task chain or fan-in costs
O(edges) in all, never a scan of the job).

Outcomes follow Azure's exit conditions: exit 0 satisfies unless `exitCodes` lists 0; anything else
blocks unless a matching `exitCodes`/`exitCodeRanges` entry, `preProcessingError`,
`fileUploadError` or `default` says `satisfy`. A blocked dependent stays `active` (as in Azure) with
the reason on its record; reactivating the failed parent and having it succeed releases it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from coordinator.common import models as m
from coordinator.common.errors import ApiError, bad_request

from .jobs import Jobs
from .records import ACTIVE, COMPLETED, Job, JobDeps, TaskRec
from .store import Store

MAX_IDS_CHARS = 64_000  # Azure: taskIds' combined length
MAX_RANGES = 1_000
# Dependencies one add (a task or a collection) may resolve in all: a few bytes of taskIdRanges
# become one edge per task of the range, each in the reverse index and on the task's journal row
# (100 tasks on a 20,000-task range each: 5 s of the core and 11 MB of journal). A fan-in on
# 100,000 tasks fits; larger graphs are added over several requests.
MAX_DEPS_PER_ADD = 200_000
DEPENDENCY_ACTIONS = ("satisfy", "block")
JOB_ACTIONS = ("none", "disable", "terminate")
TASK_FAILURE_ACTIONS = ("noaction", "performexitoptionsjobaction")
_SHOWN = 5  # ids named in one error message


def _names(unit: str) -> list[str]:
    return unit.split("|") if "|" in unit else [unit]


# ---------------------------------------------------------------------- exit conditions


def check_exit_conditions(ec: m.ExitConditions, job: Job, field: str = "exitConditions") -> None:
    def opts(o: m.ExitOptions | None, where: str) -> None:
        if o is None:
            return
        if o.dependency_action is not None and o.dependency_action not in DEPENDENCY_ACTIONS:
            raise bad_request(
                "InvalidPropertyValue",
                f"{where}.dependencyAction must be satisfy or block, got {o.dependency_action!r}",
                field=f"{where}.dependencyAction",
            )
        if o.job_action is not None:
            if o.job_action not in JOB_ACTIONS:
                raise bad_request(
                    "InvalidPropertyValue",
                    f"{where}.jobAction must be none, disable or terminate, got {o.job_action!r}",
                    field=f"{where}.jobAction",
                )
            if o.job_action != "none" and job.rec.on_task_failure != "performexitoptionsjobaction":
                raise bad_request(
                    "InvalidPropertyValue",
                    f"{where}.jobAction needs the job's onTaskFailure to be "
                    "performexitoptionsjobaction",
                    field=f"{where}.jobAction",
                )

    for i, c in enumerate(ec.exit_codes):
        opts(c.exit_options, f"{field}.exitCodes[{i}].exitOptions")
    for i, r in enumerate(ec.exit_code_ranges):
        if r.start > r.end:
            raise bad_request(
                "InvalidPropertyValue",
                f"{field}.exitCodeRanges[{i}]: start {r.start} is greater than end {r.end}",
                field=f"{field}.exitCodeRanges[{i}]",
            )
        opts(r.exit_options, f"{field}.exitCodeRanges[{i}].exitOptions")
    opts(ec.pre_processing_error, f"{field}.preProcessingError")
    opts(ec.file_upload_error, f"{field}.fileUploadError")
    opts(ec.default, f"{field}.default")


def outcome(task: TaskRec) -> tuple[str, str]:
    """(dependencyAction, jobAction) of a completed task, after its exit conditions."""
    ok = task.exit_code == 0 and task.failure is None
    ec = task.exit_conditions
    chosen: m.ExitOptions | None = None
    if ec is not None:
        code = task.exit_code
        matched = False
        if code is not None:
            for c in ec.exit_codes:
                if c.code == code:
                    chosen, matched = c.exit_options, True
                    break
            else:
                for r in ec.exit_code_ranges:
                    if r.start <= code <= r.end:
                        chosen, matched = r.exit_options, True
                        break
        if not matched and not ok:
            fcode = task.failure[1] if task.failure else ""
            if task.failure is not None and "upload" in fcode.lower():
                chosen = ec.file_upload_error or ec.default
            elif code is None and task.failure is not None and fcode != "TaskEnded":
                chosen = ec.pre_processing_error or ec.default
            else:
                chosen = ec.default
    dep = chosen.dependency_action if chosen and chosen.dependency_action else None
    act = chosen.job_action if chosen and chosen.job_action else None
    return (dep or ("satisfy" if ok else "block"), act or ("none" if ok else "terminate"))


def _describe(t: TaskRec) -> str:
    if t.failure is not None:
        return f"failed ({t.failure[1]}: {t.failure[2]})"
    return f"failed with exit code {t.exit_code}"


def status(job: Job, task: TaskRec) -> tuple[str, str] | None:
    """("waiting" | "blocked", why) for an active task whose dependencies are not all satisfied."""
    d = job.deps
    if d is None or task.state != ACTIVE or task.name not in d.pending or not task.deps:
        return None
    blocked: list[str] = []
    waiting = 0
    for unit in task.deps:
        names = _names(unit)
        if any(n in d.propagated for n in names):
            continue
        parents = [job.tasks.get(n) for n in names]
        if all(p is None for p in parents):
            blocked.append(f"dependency {unit!r} was deleted")
        elif all(p is None or p.state == COMPLETED for p in parents):
            p = next(p for p in parents if p is not None)
            blocked.append(
                f"dependency {p.name!r} {_describe(p)} and its dependencyAction is block"
            )
        else:
            waiting += 1
    if blocked:
        more = f" (and {len(blocked) - 1} more)" if len(blocked) > 1 else ""
        return "blocked", blocked[0] + more
    return "waiting", f"waiting for {waiting} of {len(task.deps)} dependencies to complete"


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent ranges covering the same integers."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# ---------------------------------------------------------------------- the area


class IntNames:
    """The integer-named tasks a range may name: the job's (kept index) and the collection's own."""

    __slots__ = ("kept", "extra", "_len")

    def __init__(self, kept: dict[int, list[str]], extra: dict[int, list[str]]) -> None:
        self.kept = kept
        self.extra = extra
        self._len = len(kept) + sum(1 for n in extra if n not in kept)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, n: int) -> bool:
        return n in self.kept or n in self.extra

    def get(self, n: int) -> list[str] | None:
        a, b = self.kept.get(n), self.extra.get(n)
        if a is None or b is None:
            return a if b is None else b
        return a + b


_NO_INTS = IntNames({}, {})


class Deps:
    def __init__(self, store: Store, jobs: Jobs) -> None:
        self.s = store
        self.jobs = jobs
        self._budget = MAX_DEPS_PER_ADD  # what the add being checked may still resolve

    # ------------------------------------------------------------ add time

    def check(
        self, job: Job, tasks: list[TaskRec], refused: dict[str, ApiError] | None = None
    ) -> dict[str, ApiError]:
        """Resolve and check the dependencies of tasks about to be added together (set
        `TaskRec.deps`); returns the refused ones by name, `refused` (tasks of the same collection
        refused already, whose dependents are refused with them) included. Nothing changes here."""
        errors: dict[str, ApiError] = dict(refused or {})
        self._budget = MAX_DEPS_PER_ADD
        batch = {t.name: t for t in tasks}
        batch.update((n, TaskRec(name=n, command_line="", seq=0, created=0.0)) for n in errors)
        by_int: IntNames | None = None
        for t in tasks:
            if t.exit_conditions is not None:
                try:
                    check_exit_conditions(t.exit_conditions, job)
                except ApiError as exc:
                    errors[t.name] = exc
                    continue
            spec = t.depends_on
            if spec is None or (not spec.task_ids and not spec.task_id_ranges):
                t.depends_on = None
                continue
            try:
                if spec.task_id_ranges and by_int is None:
                    by_int = self._int_index(job, batch)
                t.deps = self._resolve(job, t.name, spec, batch, by_int or _NO_INTS)
            except ApiError as exc:
                errors[t.name] = exc
        if not any(t.deps for t in tasks):
            return errors
        # A task that depends on a refused task of the collection is refused too (to a fixpoint).
        changed = True
        while changed:
            changed = False
            for t in tasks:
                if t.name in errors or not t.deps:
                    continue
                for unit in t.deps:
                    names = _names(unit)
                    bad = [n for n in names if n in errors]
                    if bad and all(n in errors or n not in job.tasks for n in names):
                        errors[t.name] = bad_request(
                            "TaskDependencyNotAdded",
                            f"task {t.name!r} depends on task {bad[0]!r} of the same collection, "
                            f"which was refused ({errors[bad[0]].code})",
                            field="dependsOn",
                        )
                        changed = True
                        break
        self._refuse_cycles([t for t in tasks if t.name not in errors], batch, errors)
        return errors

    def _int_index(self, job: Job, batch: dict[str, TaskRec]) -> IntNames:
        if not job.rec.uses_deps:
            return IntNames({}, {})  # `_resolve` refuses the dependencies anyway
        d = job.deps
        if d is None:
            d = job.deps = JobDeps()
        if d.ints is None:
            d.ints = {}
            for name in job.tasks:
                if name.isdigit():
                    d.ints.setdefault(int(name), []).append(name)
        extra: dict[int, list[str]] = {}
        for name in batch:
            if name.isdigit() and name not in job.tasks:
                extra.setdefault(int(name), []).append(name)
        return IntNames(d.ints, extra)

    def inserted(self, job: Job, name: str) -> None:
        """A task was inserted into `job` (added or reactivated): keep the integer index."""
        d = job.deps
        if d is not None and d.ints is not None and name.isdigit():
            names = d.ints.setdefault(int(name), [])
            if name not in names:
                names.append(name)

    def deleted(self, job: Job, name: str) -> None:
        """A task was deleted from `job`: keep the integer index."""
        d = job.deps
        if d is not None and d.ints is not None and name.isdigit():
            names = d.ints.get(int(name))
            if names is not None and name in names:
                names.remove(name)
                if not names:
                    del d.ints[int(name)]

    def _resolve(
        self,
        job: Job,
        name: str,
        spec: m.TaskDependencies,
        batch: dict[str, TaskRec],
        by_int: IntNames,
    ) -> list[str]:
        if not job.rec.uses_deps:
            raise bad_request(
                "TaskDependenciesNotSpecifiedOnJob",
                f"task {name!r} has dependsOn but its job was not created with "
                "usesTaskDependencies true",
                field="dependsOn",
            )
        ids = spec.task_ids
        if sum(len(i) for i in ids) > MAX_IDS_CHARS:
            raise bad_request(
                "TaskDependencyListTooLong",
                f"dependsOn.taskIds of task {name!r} total more than {MAX_IDS_CHARS} characters; "
                "use taskIdRanges",
                field="dependsOn.taskIds",
            )
        if len(spec.task_id_ranges) > MAX_RANGES:
            raise bad_request(
                "TaskDependencyRangesTooLong",
                f"dependsOn.taskIdRanges of task {name!r} has {len(spec.task_id_ranges)} ranges; "
                f"at most {MAX_RANGES}",
                field="dependsOn.taskIdRanges",
            )
        units: list[str] = []
        seen: set[str] = set()
        missing: list[str] = []
        for i in ids:
            if i in seen:
                continue
            seen.add(i)
            if i not in job.tasks and i not in batch:
                missing.append(i)
            units.append(i)
        for k, r in enumerate(spec.task_id_ranges):
            if r.start > r.end or r.start < 0:
                raise bad_request(
                    "InvalidPropertyValue",
                    f"dependsOn.taskIdRanges[{k}] of task {name!r}: start {r.start} and end "
                    f"{r.end} must satisfy 0 <= start <= end",
                    field=f"dependsOn.taskIdRanges[{k}]",
                )
        # Overlapping ranges merged first: 1,000 copies of one range must cost what one does.
        merged = _merge_ranges([(r.start, r.end) for r in spec.task_id_ranges])
        span = sum(b - a + 1 for a, b in merged)
        cost = len(units) + min(span, len(by_int))
        if cost > self._budget:
            raise bad_request(
                "TooManyDependencies",
                f"task {name!r} would bring the dependencies resolved by this request to more than "
                f"{MAX_DEPS_PER_ADD}; add the tasks with the most dependencies in smaller "
                "collections (or one at a time)",
                field="dependsOn",
                limit=str(MAX_DEPS_PER_ADD),
            )
        self._budget -= cost
        if span > len(by_int):
            # More integers than integer-named tasks: some must be missing; name the first (the
            # search stops there, after at most one look per integer-named task).
            first = next(n for a, b in merged for n in range(a, b + 1) if n not in by_int)
            missing.append(str(first))
            merged = []
        for a, b in merged:
            for n in range(a, b + 1):
                names = by_int.get(n)
                if names is None:
                    missing.append(str(n))
                    continue
                unit = "|".join(names)
                if unit not in seen:
                    seen.add(unit)
                    units.append(unit)
        if missing:
            shown = ", ".join(repr(x) for x in missing[:_SHOWN])
            more = f" and {len(missing) - _SHOWN} more" if len(missing) > _SHOWN else ""
            raise bad_request(
                "TaskDependencyNotFound",
                f"task {name!r} depends on {shown}{more}, which the job does not have; add the "
                "tasks it depends on first or in the same collection",
                field="dependsOn",
            )
        if any(name in _names(u) for u in units):
            raise bad_request(
                "TaskDependencyCycle",
                f"task {name!r} depends on itself",
                field="dependsOn",
            )
        return units

    def _refuse_cycles(
        self, tasks: list[TaskRec], batch: dict[str, TaskRec], errors: dict[str, ApiError]
    ) -> None:
        # Kahn's algorithm over the collection's own edges; what is left sits on or behind a cycle.
        alive = {t.name for t in tasks}
        children: dict[str, list[str]] = {}
        indeg: dict[str, int] = {}
        for t in tasks:
            for unit in t.deps or ():
                for n in _names(unit):
                    if n in alive and n in batch:
                        children.setdefault(n, []).append(t.name)
                        indeg[t.name] = indeg.get(t.name, 0) + 1
        if not indeg:
            return
        ready = deque(n for n in alive if n not in indeg)
        while ready:
            n = ready.popleft()
            for c in children.get(n, ()):
                indeg[c] -= 1
                if indeg[c] == 0:
                    del indeg[c]
                    ready.append(c)
        if not indeg:
            return
        shown = ", ".join(repr(n) for n in sorted(indeg)[:_SHOWN])
        for n in indeg:
            errors[n] = bad_request(
                "TaskDependencyCycle",
                f"task {n!r} is on or behind a dependency cycle among the collection's tasks "
                f"({shown}{', ...' if len(indeg) > _SHOWN else ''})",
                field="dependsOn",
            )

    # ------------------------------------------------------------ the index

    def add(self, job: Job, task: TaskRec) -> bool:
        """Index a task being inserted; returns whether it is ready (may join the queue)."""
        if not task.deps:
            return True
        d = job.deps
        if d is None:
            d = job.deps = JobDeps()
        pending = 0
        for unit in task.deps:
            names = _names(unit)
            if any(n in d.propagated for n in names):
                continue
            pending += 1
            for n in names:
                d.dependents.setdefault(n, []).append((task.name, unit))
        if pending:
            d.pending[task.name] = pending
            return False
        return True

    def forget(self, job: Job, name: str) -> None:
        """A waiting task was deleted or terminated: it no longer waits."""
        if job.deps is not None:
            job.deps.pending.pop(name, None)

    def completed(self, job: Job, task: TaskRec) -> None:
        """`task` completed: release the dependents it satisfies; apply its jobAction."""
        dep_action, job_action = outcome(task)
        d = job.deps
        if d is None and job.rec.uses_deps:
            # Before any dependent exists: a dependent added later must find this one satisfied.
            d = job.deps = JobDeps()
        if d is not None and dep_action == "satisfy" and task.name not in d.propagated:
            d.propagated.add(task.name)
            entries = d.dependents.pop(task.name, None) or []
            seen: set[tuple[str, str]] = set()
            for entry in entries:
                if entry in seen:
                    continue  # registered twice (a dependent terminated and reactivated)
                seen.add(entry)
                dep, unit = entry
                if "|" in unit:
                    if entry in d.units_done:
                        continue  # another task of the same integer id satisfied it first
                    d.units_done.add(entry)
                left = d.pending.get(dep)
                if left is None:
                    continue
                if left > 1:
                    d.pending[dep] = left - 1
                    continue
                del d.pending[dep]
                t = job.tasks.get(dep)
                if t is not None and t.state == ACTIVE:
                    job.queue.append(t)
        if (
            job.rec.on_task_failure == "performexitoptionsjobaction"
            and job.rec.state == "active"
            and job_action != "none"
        ):
            if job_action == "terminate":
                self.jobs.terminate(job, "TaskFailed", self.s.clock())
            else:
                self.jobs.disable_job(job.rec.workitem, job.rec.name, "requeue")

    def rebuild(self, jobs: Iterable[Job]) -> None:
        """After a restore: the index from the task records, and waiting tasks out of the queues."""
        for job in jobs:
            if not job.rec.uses_deps:
                continue
            d = job.deps = JobDeps()
            for t in job.tasks.values():
                if t.state == COMPLETED and outcome(t)[0] == "satisfy":
                    d.propagated.add(t.name)
            for t in job.tasks.values():
                if t.deps and t.state == ACTIVE:
                    self.add(job, t)
            if d.pending:
                job.queue = deque(t for t in job.queue if t.name not in d.pending)
