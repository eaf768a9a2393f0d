"""A task lists and reads only its own user's processes: another tenant's task on the same host
(another pool's agent) or another task of its own pool (another slot user) does not find it in
/proc, nor its command line, which often carries a storage URL's signature or a token, nor its
name among the host's cgroups. Found by a task that read every `/proc/*/cmdline` of its host.

Real coordinator, two real root agents running tasks as per-task slot users; the test itself (in
the host's own /proc) sees the hidden process, so a probe that finds nothing proves something.
"""

from __future__ import annotations

import os
import secrets

from coordinator.client import task_spec
from tests.harness import cluster_ctx
from tests.security.test_resource_limits import _procs_with
from tests.security.test_task_isolation import ISOLATED, JOB, PY, _run_one, open_root, pytestmark

__all__ = ["open_root", "pytestmark"]

# Prints: how many processes it sees, whether it sees its own, the marker's pids it found.
PROBE = r"""
import os, sys
mark = sys.argv[1][::-1].encode()  # given reversed: its own command line must not match
pids = [p for p in os.listdir('/proc') if p.isdigit()]
found = []
for p in pids:
    try:
        if mark in open('/proc/%s/cmdline' % p, 'rb').read():
            found.append(p)
    except OSError:
        pass
name = sys.argv[2][::-1]
named = [d for d, _, _ in os.walk('/sys/fs/cgroup') if name in os.path.basename(d)]
print(len(pids), str(os.getpid()) in pids, ','.join(found) or '-', len(named))
"""


async def test_a_task_does_not_see_other_users_processes_or_their_command_lines(
    nursery, tmp_path, open_root
):
    mark = f"secret-sig={secrets.token_hex(8)}"
    name = f"hold{secrets.token_hex(4)}"  # a task name is the tenant's too (cgroupfs is public)
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=3) as c:
        c.start_agent("a", extra_args=ISOLATED, root=os.path.join(open_root, "a"))
        await c.pool_with_tvms("pa", 1, max_tasks_per_vm=2)
        c.start_agent("b", extra_args=ISOLATED, root=os.path.join(open_root, "b"))
        await c.pool_with_tvms("pb", 1)
        # A long task of pool a whose command line holds the "secret".
        await c.client.workitems.add("holder", "pa")
        hold = f"{PY} -c \"import time; time.sleep(60)\" '{mark}'"
        await c.client.tasks.add_many("holder", JOB, [task_spec(name, hold)])
        pids = await c.wait_for(lambda: _procs_with(mark), what="the holder task running")

        probe = f"{PY} -c \"{PROBE}\" '{mark[::-1]}' {name[::-1]}"
        same_pool = (await _run_one(c, "snoop-a", "pa", "snoop", probe)).split()
        other_pool = (await _run_one(c, "snoop-b", "pb", "snoop", probe)).split()
        for seen in (same_pool, other_pool):
            count, sees_itself, found, named = seen
            assert named == "0", seen  # no cgroup directory carries the holder's task name
            assert sees_itself == "True", seen  # its own processes stay visible (ps works)
            assert found == "-", (seen, pids)  # but not the holder's (another slot user)
            assert int(count) < 10, seen  # nor the agents', the test's, the host's
        assert _procs_with(mark) == pids  # the holder ran throughout (the probe was not vacuous)

        # The host's own /proc is untouched (the namespace's mounts never propagate back).
        with open("/proc/self/mountinfo") as f:  # noqa: ASYNC230
            assert "hidepid" not in f.read()
        await c.client.tasks.terminate("holder", JOB, name)
        await c.wait_for(lambda: not _procs_with(mark), what="the holder task killed")
