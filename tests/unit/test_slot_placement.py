"""Placement by slots (coordinator/core/slotplace.py) and the slots in use on a TVM
(freeslots.RunningTasks.extra): best fit under pack, emptiest under spread, a task that fits nowhere
keeps its place while narrower ones start, a pass stays bounded, gangs take whole TVMs or wait."""

from __future__ import annotations

from coordinator.common import models as m
from coordinator.core.freeslots import FreeSlots, TvmTable
from coordinator.core.records import Job, JobRec, TaskRec, Tvm, TvmRec
from coordinator.core.scheduler import _next_tasks
from coordinator.core.slotplace import MAX_SKIPPED, place_wide


def mk_tvm(name: str, slots: int) -> Tvm:
    return Tvm(TvmRec(name=name, pool="p", agent_id=name, created=0.0, state="idle"), slots)


def mk_job(*slots: int, multi: dict[int, int] | None = None) -> Job:
    job = Job(JobRec(workitem="w", name="j", pool="p", priority=0, created=0.0))
    for i, n in enumerate(slots):
        t = TaskRec(name=f"t{i}", command_line="c", seq=i, created=0.0, slots=n)
        if multi and i in multi:
            t.multi = m.MultiInstanceSettings(number_of_instances=multi[i])
        job.tasks[t.name] = t
        job.queue.append(t)
    job.wide = True
    return job


def names(placed):
    return [(t.name, tvm.rec.name) for _, t, tvm in placed]


def test_slots_in_use_follow_every_change():
    free = FreeSlots()
    table = TvmTable(free)
    a = table["a"] = mk_tvm("a", 4)
    wide = TaskRec(name="w", command_line="c", seq=0, created=0.0, slots=3)
    a.running["k"] = wide
    assert (a.free, [t.rec.name for t in free.with_room("p")]) == (1, ["a"])
    a.running["k2"] = TaskRec(name="n", command_line="c", seq=1, created=0.0)
    assert (a.free, free.with_room("p")) == (0, [])
    a.running["k"] = wide  # put again: counted once
    assert a.free == 0
    a.running.pop("k")
    assert a.free == 3
    del a.running["k2"]
    a.running["k"] = wide
    a.running.clear()
    assert (a.free, a.running.extra) == (4, 0)


def test_pack_is_best_fit_and_spread_the_emptiest():
    a, b = mk_tvm("a", 4), mk_tvm("b", 4)
    b.running["x"] = TaskRec(name="x", command_line="c", seq=9, created=0.0, slots=2)
    job = mk_job(2, 2, 1)
    assert names(place_wide([a, b], [job], "pack", _next_tasks)) == [
        ("t0", "b"),  # b has 2 free: the fullest TVM the task fits
        ("t1", "a"),
        ("t2", "a"),
    ]
    a2, b2 = mk_tvm("a", 4), mk_tvm("b", 4)
    b2.running["x"] = TaskRec(name="x", command_line="c", seq=9, created=0.0, slots=2)
    job = mk_job(2, 2)
    # a (4 free) first; then a and b have 2 free each: either is the emptiest.
    placed = names(place_wide([a2, b2], [job], "spread", _next_tasks))
    assert placed[0] == ("t0", "a")
    assert placed[1] in (("t1", "a"), ("t1", "b"))


def test_a_task_that_fits_nowhere_keeps_its_place():
    a = mk_tvm("a", 4)
    a.running["x"] = TaskRec(name="x", command_line="c", seq=9, created=0.0, slots=3)
    job = mk_job(2, 1, 2)
    assert names(place_wide([a], [job], "pack", _next_tasks)) == [("t1", "a")]
    assert [t.name for t in job.queue] == ["t0", "t2"]  # in order, at the head


def test_a_pass_over_wide_tasks_that_fit_nowhere_is_bounded():
    a = mk_tvm("a", 4)
    a.running["x"] = TaskRec(name="x", command_line="c", seq=9, created=0.0, slots=3)
    job = mk_job(*([2] * 10_000), 1)
    assert place_wide([a], [job], "pack", _next_tasks) == []
    assert len(job.queue) == 10_001  # nothing lost; only MAX_SKIPPED looked at
    assert MAX_SKIPPED < 10_000


def test_gangs_take_whole_tvms_at_once_or_wait():
    tvms = [mk_tvm(n, 1) for n in "abcd"]
    tvms[1].running["x"] = TaskRec(name="x", command_line="c", seq=9, created=0.0)
    gangs = []
    job = mk_job(1, 1, 1, multi={0: 3, 1: 2})

    def start(job, task, got):
        gangs.append((task.name, [t.rec.name for t in got]))

    placed = place_wide(tvms, [job], "spread", _next_tasks, start)
    assert gangs == [("t0", ["a", "c", "d"])]  # b is busy; all three at once
    assert placed == []  # t1 (two TVMs) and t2 wait: no TVM is left
    assert [t.name for t in job.queue] == ["t1", "t2"]
