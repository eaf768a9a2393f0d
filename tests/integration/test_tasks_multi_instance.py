"""Multi-instance tasks over real agents: a 3-instance task gets three TVMs at once; the coordination
command (a plain socket server on its TVM's port range) runs on every TVM, then the application
command on the primary reaches the other two over their ports (an MPI-style exchange); the instances
are visible; a failed instance fails the task; terminating stops every instance; pools without
inter-TVM communication, or with more than one slot per TVM, refuse such tasks."""

from __future__ import annotations

import sys
import uuid

import pytest

from coordinator.client import BatchError
from coordinator.common import models as m
from tests.harness import cluster_ctx
from tests.integration.test_tasks_constraints import _marked_pids

JOB = "job-0000000001"
PY = sys.executable  # tasks run as root in the harness (isolation off)

# The coordination command: serve one connection on the first port of this TVM's range, answering
# with the instance's index and TVM name; it records what it saw in env.txt.
SERVER = (
    "import os,socket\n"
    "e=os.environ\n"
    "open('env.txt','w').write('|'.join(e.get(k,'') for k in ('AZ_BATCH_HOST_LIST',"
    "'AZ_BATCH_MASTER_NODE','AZ_BATCH_IS_CURRENT_NODE_MASTER','TVM_INSTANCE_INDEX',"
    "'AZ_BATCH_TASK_ID'))+'|'+open('common.txt').read())\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    "s.bind(('0.0.0.0',int(e['WATASK_PORTRANGE_LOW'])));s.listen(4)\n"
    "c,_=s.accept();c.sendall((e['TVM_INSTANCE_INDEX']+' '+e['AZ_BATCH_NODE_ID']).encode());c.close()\n"
)
# The application command: talk to every instance over its port, retrying while it starts (its own
# primary's too: that coordination command has recorded what it saw once it listens, and is
# cancelled when this command ends).
CLIENT = (
    "import os,socket,time\n"
    "e=os.environ\n"
    "hosts=e['TVM_HOST_PORT_LIST'].split(',')\n"
    "print('master',e['AZ_BATCH_MASTER_NODE'],e['AZ_BATCH_IS_CURRENT_NODE_MASTER'],e['AZ_BATCH_HOST_LIST'])\n"
    "for h in hosts:\n"
    "  ip,ports=h.rsplit(':',1);port=int(ports.split('-')[0])\n"
    "  for _ in range(400):\n"
    "    try:\n"
    "      c=socket.create_connection((ip,port),timeout=5);break\n"
    "    except OSError:\n"
    "      time.sleep(0.05)\n"
    "  print('got',c.recv(200).decode(),flush=True)\n"
)


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


async def _task(c, name):
    return await c.client.tasks.get("wi", JOB, name)


async def _done(c, name):
    t = await _task(c, name)
    return t if t.state == "completed" else None


async def test_three_instances_talk_over_the_pools_ports(nursery, tmp_path):
    server = _write(tmp_path, "server.py", SERVER)
    client = _write(tmp_path, "client.py", CLIENT)
    async with cluster_ctx(nursery, tmp_path, agents=4) as c:
        await c.pool_with_tvms("p", 4, communication=True)
        await c.client.workitems.add("wi", "p")
        common = await c.client.files.upload(b"shared input")
        await c.client.tasks.add(
            "wi",
            JOB,
            "mpi",
            f"{PY} {client}",
            instances=3,
            coordination_command_line=f"{PY} {server}",
            common_resource_files=[
                m.ResourceFile(blob_source=common["blobSource"], file_path="common.txt")
            ],
        )
        t = await c.wait_for(lambda: _done(c, "mpi"), timeout=60, what="mpi completed")
        info = t.execution_info
        assert info.exit_code == 0, info
        assert info.scheduling_error is None
        tvms = {x.name: x for x in await c.client.tvms.list("p")}
        subs = t.subtasks
        assert [s.id for s in subs] == [0, 1, 2]
        assert len({s.tvm_name for s in subs}) == 3  # three TVMs at once
        assert subs[0].tvm_name == t.tvm_info.tvm_name  # instance 0 is on the primary
        assert t.multi_instance_settings.number_of_instances == 3
        out = (await c.client.files.get_from_task("wi", JOB, "mpi", "stdout.txt")).decode()
        got = sorted(line.split(" ", 1)[1] for line in out.splitlines() if line.startswith("got"))
        assert got == [f"{i} {s.tvm_name}" for i, s in enumerate(subs)], out
        primary = tvms[subs[0].tvm_name]
        assert f"master {primary.ip_address}:{primary.port_range_low} true" in out
        # Every instance saw the same hosts, the master and whether it is the master.
        for i, s in enumerate(subs):
            env = (
                await c.client.files.get_from_tvm(
                    "p", s.tvm_name, f"tasks/wi/{JOB}/mpi~{i}/wd/env.txt"
                )
            ).decode()
            hosts, master, is_master, index, task_id, common_text = env.split("|")
            assert common_text == "shared input"  # commonResourceFiles on every instance
            assert len(hosts.split(",")) == 3
            assert master == f"{primary.ip_address}:{primary.port_range_low}"
            assert (is_master, index, task_id) == ("true" if i == 0 else "false", str(i), "mpi")
        # The gang's slots are free again.
        await c.wait_for(lambda: _all_idle(c), what="every TVM idle after the multi-instance task")

        # A failed instance fails the task (the primary's command would wait for ever).
        await c.client.tasks.add(
            "wi",
            JOB,
            "broken",
            "sleep 300",
            instances=2,
            coordination_command_line="sh -c 'if [ $TVM_INSTANCE_INDEX = 1 ]; then exit 5; fi; sleep 300'",
        )
        t = await c.wait_for(lambda: _done(c, "broken"), timeout=60, what="broken completed")
        err = t.execution_info.scheduling_error
        assert (err.code, t.execution_info.exit_code) == ("SubtaskFailed", 5)
        assert "instance 1" in err.message
        await c.wait_for(lambda: _all_idle(c), what="every TVM idle after the failed instance")

        # Terminating stops every instance and the application command: no process is left.
        mark = uuid.uuid4().hex
        await c.client.tasks.add(
            "wi",
            JOB,
            "long",
            "sleep 300",
            instances=3,
            coordination_command_line="sleep 300",
            env={"TVM_TEST_MARK": mark},
        )

        async def running():
            t = await _task(c, "long")
            return t.state == "running" and len(t.subtasks) == 3

        await c.wait_for(running, timeout=30, what="long running")
        await c.wait_for(lambda: len(_marked_pids(mark)) == 4, what="3 instances and the app")
        await c.client.tasks.terminate("wi", JOB, "long")
        t = await _task(c, "long")
        assert t.state == "completed"
        assert {s.state for s in t.subtasks} == {"completed"}
        await c.wait_for(lambda: _all_idle(c), what="every TVM idle after terminate")
        await c.wait_for(lambda: not _marked_pids(mark), what="every instance's process gone")

        # Refused where Azure refuses it, nothing stored.
        await c.client.pools.add("nocomm", target_dedicated=0)
        await c.client.pools.add(
            "multi", target_dedicated=0, communication=True, max_tasks_per_vm=2
        )
        for pool in ("nocomm", "multi"):
            await c.client.workitems.add(f"wi-{pool}", pool)
            with pytest.raises(BatchError) as ei:
                await c.client.tasks.add(
                    f"wi-{pool}", JOB, "m", "true", instances=2, coordination_command_line="true"
                )
            assert ei.value.status == 400
            assert "inter-TVM communication" in ei.value.message
        with pytest.raises(BatchError) as ei:
            await c.client.tasks.add("wi", JOB, "m", "true", instances=2)
        assert "coordinationCommandLine" in ei.value.message
        with pytest.raises(BatchError) as ei:
            await c.client.tasks.get("wi", JOB, "m")
        assert ei.value.status == 404


async def _all_idle(c):
    tvms = await c.client.tvms.list("p")
    return all(t.state == "idle" and t.running_task_slots_count == 0 for t in tvms)
