"""The per-pool free-slot index (coordinator/core/freeslots.py): `with_room` is exact whatever adds
or removes runs or TVMs, and it is what the scheduler places from. A property test compares it with
a full scan after random changes; the scheduler tests check a freed slot is found without a scan."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.common import models as m
from coordinator.core import CoordinatorState
from coordinator.core.freeslots import FreeSlots, RunningTasks, TvmTable
from coordinator.core.records import TaskRec, Tvm, TvmRec
from protocol import messages as pm


def mk_tvm(name: str, pool: str, slots: int) -> Tvm:
    return Tvm(TvmRec(name=name, pool=pool, agent_id=name, created=0.0, state="idle"), slots)


def task(i: int) -> TaskRec:
    return TaskRec(name=f"t{i}", command_line="c", seq=i, created=0.0)


def scan(table: TvmTable) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for t in table.values():
        if t.free > 0:
            out.setdefault(t.rec.pool, set()).add(t.rec.name)
    return out


def indexed(free: FreeSlots) -> dict[str, set[str]]:
    out = {p: {t.rec.name for t in free.with_room(p)} for p in list(free.by_pool)}
    return {p: names for p, names in out.items() if names}


def queue_scan(table: TvmTable) -> dict[str, set[str]]:
    """TVMs whose slots are taken and whose agent's queue has room."""
    out: dict[str, set[str]] = {}
    for t in table.values():
        if t.free <= 0 and t.free + t.queue > 0:
            out.setdefault(t.rec.pool, set()).add(t.rec.name)
    return out


def queue_indexed(free: FreeSlots) -> dict[str, set[str]]:
    for p in list(free.by_pool):
        free.with_room(p)  # as the scheduler does first
    out = {p: {t.rec.name for t in free.with_queue_room(p)} for p in list(free.queues)}
    return {p: names for p, names in out.items() if names}


def test_full_tvm_leaves_the_index_and_returns_when_a_slot_frees():
    free = FreeSlots()
    table = TvmTable(free)
    a = mk_tvm("a", "p", 2)
    table["a"] = a
    assert indexed(free) == {"p": {"a"}}
    a.running["k1"] = task(1)
    assert indexed(free) == {"p": {"a"}}
    a.running["k2"] = task(2)
    assert indexed(free) == {}
    a.running.pop("k1")
    assert indexed(free) == {"p": {"a"}}
    a.running["k1"] = task(1)
    del a.running["k2"]
    assert indexed(free) == {"p": {"a"}}
    a.running["k2"] = task(2)
    a.running.clear()
    assert indexed(free) == {"p": {"a"}}


def test_tvm_outside_the_table_is_not_indexed_and_removed_tvm_leaves():
    free = FreeSlots()
    table = TvmTable(free)
    loose = mk_tvm("x", "p", 1)
    loose.running["k"] = task(1)
    loose.running.pop("k")  # not in a table: no index to touch
    assert indexed(free) == {}
    a, b = mk_tvm("a", "p", 1), mk_tvm("b", "p", 1)
    table["a"], table["b"] = a, b
    a.running["k"] = task(1)
    b.running["k"] = task(2)
    assert indexed(free) == {}
    table.pop("a")  # the pool's dict must survive for b
    b.running.pop("k")
    assert indexed(free) == {"p": {"b"}}
    del table["b"]
    assert indexed(free) == {}
    b.running["k"] = task(3)
    b.running.pop("k")
    assert indexed(free) == {}  # detached: b no longer writes into the index
    assert table.pop("gone", None) is None


def test_replacing_a_tvm_under_the_same_name_detaches_the_old_one():
    free = FreeSlots()
    table = TvmTable(free)
    old = mk_tvm("a", "p", 1)
    table["a"] = old
    new = mk_tvm("a", "q", 1)
    table["a"] = new
    assert indexed(free) == {"q": {"a"}}
    old.running["k"] = task(1)
    old.running.pop("k")
    assert indexed(free) == {"q": {"a"}}


def test_other_mutators_are_refused():
    table = TvmTable(FreeSlots())
    with pytest.raises(TypeError):
        table.update({"a": mk_tvm("a", "p", 1)})
    running = RunningTasks(mk_tvm("a", "p", 1))
    running["k"] = task(1)
    with pytest.raises(TypeError):
        running.popitem()
    assert list(running) == ["k"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "drop", "set", "pop", "clear", "remove", "readd"]),
            st.integers(0, 4),
            st.integers(0, 5),
        ),
        max_size=60,
    )
)
def test_index_equals_a_full_scan_after_any_changes(ops):
    free = FreeSlots()
    table = TvmTable(free)
    tvms = [mk_tvm(f"v{i}", f"p{i % 2}", 1 + i % 3) for i in range(5)]
    for j, t in enumerate(tvms):
        t.queue = 2 * (j % 2)  # some agents keep a queue
        table[t.rec.name] = t
    for op, i, k in ops:
        t = tvms[i]
        key = f"k{k}"
        if op == "set":
            t.running[key] = task(k)
        elif op == "pop":
            t.running.pop(key, None)
        elif op == "drop" and key in t.running:
            del t.running[key]
        elif op == "clear":
            t.running.clear()
        elif op == "remove":
            table.pop(t.rec.name, None)
        elif op in ("add", "readd"):
            table[t.rec.name] = t
        if k % 2 == 0:  # not after every change: full TVMs also linger between two passes
            assert indexed(free) == scan(table)
            assert queue_indexed(free) == queue_scan(table)
    assert indexed(free) == scan(table)
    assert queue_indexed(free) == queue_scan(table)


def test_a_busy_pool_is_not_scanned_again_until_a_slot_frees() -> None:
    free = FreeSlots()
    table = TvmTable(free)
    a, b = mk_tvm("a", "p", 1), mk_tvm("b", "p", 1)
    b.queue = 2
    table["a"], table["b"] = a, b
    a.running["k"] = task(1)
    b.running["k"] = task(2)
    assert free.with_room("p") == []
    assert free.by_pool["p"] == {}  # neither is looked at by the next pass's with_room
    assert free.with_queue_room("p") == [b]  # only when tasks are queued
    b.running["q1"], b.running["q2"] = task(3), task(4)
    assert free.with_queue_room("p") == []
    assert free.queues["p"] == {}
    b.running.pop("q1")
    assert free.with_room("p") == []  # back in by_pool, still no free slot: to the queues again
    assert free.with_queue_room("p") == [b]
    table.pop("b")
    assert free.with_queue_room("p") == []


def _ready_pool(core: CoordinatorState, n_agents: int, slots: int) -> list[str]:
    for i in range(n_agents):
        core.agent_hello(pm.Hello(agent_id=f"a{i}", token="t"))
    core.add_pool(
        m.PoolAdd(name="p", vm_size="large", target_dedicated=n_agents, max_tasks_per_vm=slots)
    )
    for tvm in list(core.tvms.values()):
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(
        m.WorkitemAdd(name="w", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    core.take_effects()
    return list(core.tvms)


def test_scheduler_places_on_the_one_tvm_a_completion_freed():
    core = CoordinatorState("acct")
    _ready_pool(core, 3, 1)
    core.add_tasks(
        "w", "job-0000000001", [m.TaskAdd(name=f"t{i}", command_line="c") for i in range(4)]
    )
    assert core.schedule() == 3
    assert core.store.free_slots.with_room("p") == []
    job = core.get_job("w", "job-0000000001")
    done = next(t for t in job.tasks.values() if t.state == "running")
    holder = done.tvm
    core.agent_message(
        core.tvms[holder].rec.agent_id,
        pm.TaskCompleted(
            key=f"w/job-0000000001/{done.name}",
            attempt=done.attempt,
            exit_code=0,
            start_time=1.0,
            end_time=2.0,
        ),
    )
    assert core.store.free_slots.by_pool["p"] == {holder: core.tvms[holder]}
    assert core.schedule() == 1
    assert job.tasks["t3"].tvm == holder
    assert core.store.free_slots.with_room("p") == []
    assert core.store.free_slots.by_pool["p"] == {}  # the full TVM was dropped


def test_restored_tvms_are_indexed():
    core = CoordinatorState("acct")
    names = _ready_pool(core, 2, 2)
    rows = [("pool", "p", _encode(core.pools["p"]))] + [
        ("tvm", n, _encode(core.tvms[n].rec)) for n in names
    ]
    again = CoordinatorState("acct", epoch=2)
    again.restore(rows)
    assert {t.rec.name for t in again.store.free_slots.with_room("p")} == set(names)


def _encode(rec: object) -> bytes:
    import msgspec

    return msgspec.msgpack.encode(rec)
