"""Slots per task over a real agent: 2-slot tasks on a 4-slot TVM run two at a time (a 1-slot task
behind them waits for room, never overbooks the TVM), the TVM counts the slots in use
(runningTaskSlotsCount on both APIs), and a task wider than the pool's TVMs is refused."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from coordinator.client import BatchError, task_spec
from tests.harness import cluster_ctx

JOB = "job-0000000001"


@pytest.fixture
def gate_dir():
    d = tempfile.mkdtemp(prefix=f"tvm-slots-{os.getpid()}-")
    os.chmod(d, 0o777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


async def _states(c):
    return {t.name: t.state for t in await c.client.tasks.list("wi", JOB)}


async def test_two_slot_tasks_pack_two_at_a_time(nursery, tmp_path, gate_dir):
    async with cluster_ctx(nursery, tmp_path, agents=1) as c:
        await c.pool_with_tvms("p", 1, max_tasks_per_vm=4)
        await c.client.workitems.add("wi", "p")
        # Each task waits until the test opens its gate.
        wait = f"sh -c 'while [ ! -e {gate_dir}/$AZ_BATCH_TASK_ID ]; do sleep 0.05; done'"
        await c.client.tasks.add_many(
            "wi",
            JOB,
            [task_spec(n, wait, required_slots=2) for n in ("w1", "w2", "w3")]
            + [task_spec("n1", wait)],
        )

        async def running(names):
            s = await _states(c)
            return all(s[n] == "running" for n in names) and s

        s = await c.wait_for(lambda: running(["w1", "w2"]), what="w1 and w2 running")
        assert (s["w3"], s["n1"]) == ("active", "active")
        tvm = (await c.client.tvms.list("p"))[0]
        assert (tvm.running_tasks_count, tvm.running_task_slots_count) == (2, 4)
        assert (await c.client.tasks.get("wi", JOB, "w1")).required_slots == 2

        open(os.path.join(gate_dir, "w1"), "w").close()
        s = await c.wait_for(lambda: running(["w2", "w3"]), what="w3 running after w1")
        assert s["w1"] == "completed"
        assert s["n1"] == "active"  # 4 slots in use: no room for one more
        tvm = (await c.client.tvms.list("p"))[0]
        assert tvm.running_task_slots_count == 4

        open(os.path.join(gate_dir, "w2"), "w").close()
        s = await c.wait_for(lambda: running(["w3", "n1"]), what="n1 running after w2")
        tvm = (await c.client.tvms.list("p"))[0]
        assert (tvm.running_tasks_count, tvm.running_task_slots_count) == (2, 3)
        for n in ("w3", "n1"):
            open(os.path.join(gate_dir, n), "w").close()
        await c.client.tasks.wait("wi", JOB, timeout=30)
        for n in ("w1", "w2", "w3", "n1"):
            assert (await c.client.tasks.get("wi", JOB, n)).execution_info.exit_code == 0

        # Wider than the pool's TVMs (or no slot at all): refused, nothing stored.
        for slots, why in ((5, "has 4 task slots"), (0, "at least 1")):
            with pytest.raises(BatchError) as ei:
                await c.client.tasks.add("wi", JOB, "wide", "true", required_slots=slots)
            assert ei.value.status == 400
            assert why in ei.value.message
            assert ei.value.values.get("requiredSlots", str(slots)) == str(slots)
        assert "wide" not in await _states(c)
