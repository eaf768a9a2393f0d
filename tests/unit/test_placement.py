"""Pure placement (coordinator/core/scheduler.py) and the scheduler's use of it: priority order,
equal-priority round robin, submission order, pack vs spread, maxTasksPerVM, one pass per call."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec.structs import astuple

from coordinator.common import models as m
from coordinator.core import CoordinatorState, scheduler
from coordinator.core.records import COMPLETED, Job, JobRec, TaskRec, Tvm, TvmRec
from coordinator.core.scheduler import place
from protocol import messages as pm


class CountingDeque(deque):
    """A job queue that counts how many entries placement takes out of it."""

    pops = 0

    def popleft(self):  # type: ignore[override]
        type(self).pops += 1
        return super().popleft()


def mk_tvm(name: str, slots: int, busy: int = 0) -> Tvm:
    t = Tvm(TvmRec(name=name, pool="p", agent_id=name, created=0.0, state="idle"), slots)
    for i in range(busy):
        t.running[f"x/y/busy{i}"] = TaskRec(name=f"busy{i}", command_line="c", seq=0, created=0.0)
    return t


_seq = iter(range(1, 10**9))


def mk_job(wi: str, priority: int, n: int, created: float = 0.0) -> Job:
    job = Job(
        JobRec(workitem=wi, name="job-0000000001", pool="p", priority=priority, created=created)
    )
    job.queue = CountingDeque()
    for i in range(n):
        t = TaskRec(name=f"{wi}-t{i}", command_line="c", seq=next(_seq), created=created)
        job.tasks[t.name] = t
        job.queue.append(t)
    return job


def names(out):
    return [t.name for _, t, _ in out]


def per_tvm(out):
    counts: dict[str, int] = {}
    for _, _, tvm in out:
        counts[tvm.rec.name] = counts.get(tvm.rec.name, 0) + 1
    return counts


def test_priority_order_high_first():
    low = mk_job("low", -5, 3, created=1)
    high = mk_job("high", 100, 3, created=2)
    mid = mk_job("mid", 0, 3, created=0)
    out = place([mk_tvm("a", 4)], [low, mid, high], "spread")
    assert names(out) == ["high-t0", "high-t1", "high-t2", "mid-t0"]
    assert [t.name for t in mid.queue] == ["mid-t1", "mid-t2"]
    assert len(low.queue) == 3


def test_equal_priority_round_robin_in_creation_order():
    a = mk_job("a", 0, 3, created=1)
    b = mk_job("b", 0, 3, created=2)
    c = mk_job("c", 0, 1, created=3)
    out = place([mk_tvm("v", 6)], [c, b, a], "pack")
    assert names(out) == ["a-t0", "b-t0", "c-t0", "a-t1", "b-t1", "a-t2"]


def test_submission_order_within_a_job():
    j = mk_job("w", 0, 5)
    out = place([mk_tvm("a", 1), mk_tvm("b", 1)], [j], "spread")
    assert names(out) == ["w-t0", "w-t1"]
    assert [t.name for t in j.queue] == ["w-t2", "w-t3", "w-t4"]


def test_spread_deals_one_per_tvm_most_free_first():
    tvms = [mk_tvm("a", 4, busy=3), mk_tvm("b", 4), mk_tvm("c", 4, busy=1)]
    out = place(tvms, [mk_job("w", 0, 3)], "spread")
    assert [tvm.rec.name for _, _, tvm in out] == ["b", "c", "a"]


def test_spread_with_more_tasks_than_tvms_stays_balanced():
    tvms = [mk_tvm(n, 4) for n in "abc"]
    out = place(tvms, [mk_job("w", 0, 7)], "spread")
    assert sorted(per_tvm(out).values()) == [2, 2, 3]


def test_pack_fills_one_tvm_before_the_next_busiest_first():
    tvms = [mk_tvm("a", 4), mk_tvm("b", 4, busy=2), mk_tvm("c", 4)]
    out = place(tvms, [mk_job("w", 0, 5)], "pack")
    assert [tvm.rec.name for _, _, tvm in out] == ["b", "b", "a", "a", "a"]


@pytest.mark.parametrize("fill", ["pack", "spread"])
def test_max_tasks_per_vm_honoured(fill):
    tvms = [mk_tvm("a", 2), mk_tvm("b", 3, busy=1), mk_tvm("c", 1, busy=1)]
    out = place(tvms, [mk_job("w", 0, 50)], fill)
    assert per_tvm(out) == {"a": 2, "b": 2}


def test_nothing_to_do():
    assert place([], [mk_job("w", 0, 3)], "spread") == []
    assert place([mk_tvm("a", 1, busy=1)], [mk_job("w", 0, 3)], "spread") == []
    assert place([mk_tvm("a", 2)], [], "pack") == []
    assert place([mk_tvm("a", 2)], [mk_job("w", 0, 0)], "pack") == []


def test_stale_queue_entries_are_skipped_and_dropped():
    j = mk_job("w", 0, 4)
    j.tasks["w-t0"].state = COMPLETED  # terminated while queued
    del j.tasks["w-t1"]  # deleted while queued
    out = place([mk_tvm("a", 1)], [j], "spread")
    assert names(out) == ["w-t2"]
    assert [t.name for t in j.queue] == ["w-t3"]


def test_one_pass_takes_only_what_it_places():
    CountingDeque.pops = 0
    jobs = [mk_job(f"j{i}", i % 3, 1000) for i in range(10)]
    out = place([mk_tvm("a", 3), mk_tvm("b", 2)], jobs, "spread")
    assert len(out) == 5
    assert CountingDeque.pops == 5  # no rescans of queues: 10,000 queued tasks, five touched
    assert sum(len(j.queue) for j in jobs) == 10_000 - 5


@settings(max_examples=200, deadline=None)
@given(
    jobs=st.lists(st.tuples(st.integers(-2, 2), st.integers(0, 6)), min_size=1, max_size=6),
    tvms=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 4)), min_size=1, max_size=5),
    fill=st.sampled_from(["pack", "spread"]),
)
def test_placement_invariants(jobs, tvms, fill):
    js = [mk_job(f"j{i}", p, n, created=i) for i, (p, n) in enumerate(jobs)]
    vs = [mk_tvm(f"v{i}", slots, busy=min(busy, slots)) for i, (slots, busy) in enumerate(tvms)]
    before = {j.rec.workitem: list(j.queue) for j in js}
    out = place(vs, js, fill)
    free = sum(v.free for v in vs)
    total = sum(n for _, n in jobs)
    assert len(out) == min(free, total)
    for v in vs:
        assert per_tvm(out).get(v.rec.name, 0) <= v.free
    assert len({id(t) for _, t, _ in out}) == len(out)  # never the same task twice
    placed_by_job: dict[str, list[TaskRec]] = {}
    for job, task, _ in out:
        placed_by_job.setdefault(job.rec.workitem, []).append(task)
    for j in js:
        got = placed_by_job.get(j.rec.workitem, [])
        assert got == before[j.rec.workitem][: len(got)]  # a prefix, in submission order
        assert list(j.queue) == before[j.rec.workitem][len(got) :]  # the rest is still queued
    # A job is left waiting only if no job of lower priority got a slot.
    for j in js:
        if j.queue:
            assert all(job.rec.priority >= j.rec.priority for job, _, _ in out)
    # Round robin: within one priority level, jobs that still wait got within one task of each other.
    for p in {j.rec.priority for j in js}:
        level = [j for j in js if j.rec.priority == p]
        waiting = [len(placed_by_job.get(j.rec.workitem, [])) for j in level if j.queue]
        if waiting:
            most = max(len(placed_by_job.get(j.rec.workitem, [])) for j in level)
            assert most - min(waiting) <= 1


# ---------------------------------------------------------------------------- the scheduler


def _core(n_agents: int, slots: int, fill: str = "spread") -> CoordinatorState:
    core = CoordinatorState("acct", clock=lambda: 1000.0)
    for i in range(n_agents):
        core.agent_hello(pm.Hello(agent_id=f"a{i}", token="t"))
    core.add_pool(
        m.PoolAdd(
            name="p",
            target_dedicated=n_agents,
            max_tasks_per_vm=slots,
            vm_size="large",
            tvm_fill_type=fill,
        )
    )
    for tvm in list(core.tvms.values()):
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.take_effects()
    return core


def test_schedule_calls_placement_once_per_pool(monkeypatch):
    calls: list[int] = []

    def counting(tvms, jobs, fill):
        calls.append(len(jobs))
        return place(tvms, jobs, fill)

    monkeypatch.setattr(scheduler, "place", counting)
    core = _core(2, 3)
    for w in ("w1", "w2"):
        core.add_workitem(
            m.WorkitemAdd(
                name=w, job_execution_environment=m.JobExecutionEnvironment(pool_name="p")
            )
        )
        core.add_tasks(
            w, "job-0000000001", [m.TaskAdd(name=f"t{i}", command_line="c") for i in range(100)]
        )
    core.take_effects()
    assert core.schedule() == 6
    assert calls == [2]
    runs = [
        msg for _, msg in map(astuple, core.take_effects().sends) if isinstance(msg, pm.RunTask)
    ]
    assert len(runs) == 6
    assert core.schedule() == 0  # every slot taken: nothing more, and no busy loop
    assert core.take_effects().sends == []


def test_schedule_honours_max_tasks_per_vm_and_pack():
    core = _core(2, 4, fill="pack")
    core.add_workitem(
        m.WorkitemAdd(name="w", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    core.add_tasks(
        "w", "job-0000000001", [m.TaskAdd(name=f"t{i}", command_line="c") for i in range(3)]
    )
    core.take_effects()
    core.schedule()
    runs = core.take_effects().sends
    assert len({agent for agent, _ in map(astuple, runs)}) == 1  # pack: one TVM
    core.add_tasks(
        "w", "job-0000000001", [m.TaskAdd(name=f"u{i}", command_line="c") for i in range(10)]
    )
    core.schedule()
    assert all(len(t.running) == 4 for t in core.tvms.values())
    assert sum(len(j.queue) for j in core.jobs.values()) == 13 - 8
