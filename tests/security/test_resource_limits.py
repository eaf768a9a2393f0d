"""Attacks: a fork flood and a disk flood from a task (root agents with per-task users, end to end
through the coordinator). The flood is stopped by the pool's limit, reported with a clear code, and
the TVM keeps running other tasks; nothing of the flood is left in /proc."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.client import BatchError, task_spec
from tests.harness import cluster_ctx
from tvmagent.sandbox import ProcessSpec, Sandbox, SandboxCapabilities, ensure_user

PY = "/usr/bin/python3"  # readable by unprivileged users (the venv's interpreter lives under /root)
ISOLATED = ["--task-isolation", "users"]
JOB = "job-0000000001"

_caps = SandboxCapabilities.detect()
_root_reason = (
    None
    if (_caps.can_switch_user and os.path.exists(PY))
    else "needs root, setpriv and /usr/bin/python3"
)

# Forks up to 1,000 sleeping children (each tagged with a unique marker on its command line) and
# reports how many it got; the children are the task's leftovers, killed with its tree.
FORK_FLOOD = r"""
import os, sys, time
n, err = 0, ''
for _ in range(1000):
    try:
        pid = os.fork()
    except OSError as e:
        err = e.strerror
        break
    if pid == 0:
        os.execv('/bin/sleep', ['sleep', '300', sys.argv[1]])
    n += 1
print('forked', n, err, flush=True)
"""


@pytest.fixture
def open_root() -> Iterator[str]:
    """Agent roots for task users: pytest's tmp dirs sit under a 0700 directory nobody else may enter."""
    base = tempfile.mkdtemp(prefix="tvm-limits-")
    os.chmod(base, 0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def _procs_with(marker: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        out.append(int(d))
            except OSError:
                continue
    return out


async def _run(c, specs, wait_s: float = 120):
    await c.client.tasks.add_many("wi", JOB, specs)
    await c.client.tasks.wait("wi", JOB, timeout=wait_s)
    return {t.name: t for t in await c.client.tasks.list("wi", JOB)}


@pytest.mark.parametrize(
    ("field", "value"),
    [("taskPidsLimit", 15), ("taskPidsLimit", 1_000_001), ("tvmDiskLimitMiB", 0)],
)
async def test_a_pool_limit_out_of_range_is_refused_naming_the_field(
    nursery, tmp_path, field, value
):
    async with cluster_ctx(nursery, tmp_path) as c:
        kw = {"task_pids_limit" if field == "taskPidsLimit" else "tvm_disk_limit_mib": value}
        with pytest.raises(BatchError) as err:
            await c.client.pools.add("p", **kw)
        assert err.value.status == 400
        assert field in err.value.message
        assert [p.name for p in await c.client.pools.list()] == []  # nothing half-created
        pool = await c.client.pools.add("q", task_pids_limit=16, tvm_disk_limit_mib=50)
        assert (pool.task_pids_limit, pool.tvm_disk_limit_mib) == (16, 50)


@pytest.mark.skipif(_root_reason is not None, reason=_root_reason or "")
async def test_a_fork_flood_is_stopped_by_the_pools_process_limit(nursery, tmp_path, open_root):
    marker = f"tvmforkflood{os.getpid()}{secrets.token_hex(3)}"
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=5) as c:
        c.start_agent(extra_args=ISOLATED, root=os.path.join(open_root, "a0"))
        await c.pool_with_tvms("p", 1, task_pids_limit=64)
        await c.client.workitems.add("wi", "p")
        try:
            tasks = await _run(c, [task_spec("flood", f'{PY} -c "{FORK_FLOOD}" {marker}')])
            out = (
                (await c.client.files.get_from_task("wi", JOB, "flood", "stdout.txt"))
                .decode()
                .split()
            )
            assert out[0] == "forked", out
            assert int(out[1]) < 64, out  # the limit counts the task's own python too
            assert tasks["flood"].execution_info.exit_code == 0
            assert _procs_with(marker) == []  # the sleeping children went with the task's tree
            tasks = await _run(c, [task_spec("after", f"{PY} -c \"print('fine')\"")])
            assert tasks["after"].execution_info.exit_code == 0
            assert (await c.client.tvms.list("p"))[0].state in ("idle", "running")
        finally:
            for pid in _procs_with(marker):  # only when the limit failed: the flood's own children
                os.kill(pid, 9)


@pytest.mark.skipif(_root_reason is not None, reason=_root_reason or "")
@pytest.mark.parametrize(
    ("linger", "where"),
    [(True, "big"), (False, "big"), (True, "/tmp/tvm-flood-{}/big"), (True, "/var/tmp/tvm-{}")],
    ids=["writes-and-waits", "writes-and-exits", "writes-into-tmp", "writes-into-var-tmp"],
)
async def test_a_disk_flood_fails_with_disk_limit_exceeded_and_the_tvm_keeps_working(
    nursery, tmp_path, open_root, linger, where
):
    """Also outside the task's directory: what its user owns in /tmp and /var/tmp counts (the
    host's disk is every tenant's); swept when the task ends."""
    where = where.format(secrets.token_hex(4))
    mkdir = f"mkdir -p {os.path.dirname(where)}; " if where.startswith("/tmp/") else ""
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=5) as c:
        c.start_agent(extra_args=ISOLATED, root=os.path.join(open_root, "a0"))
        await c.pool_with_tvms("p", 1, tvm_disk_limit_mib=50)
        await c.client.workitems.add("wi", "p")
        then = "; sleep 120" if linger else ""
        tasks = await _run(
            c,
            [
                task_spec(
                    "flood",
                    f"sh -c '{mkdir}dd if=/dev/zero of={where} bs=1M count=200 2>/dev/null{then}'",
                )
            ],
        )
        info = tasks["flood"].execution_info
        assert info.scheduling_error is not None, info
        assert info.scheduling_error.code == "DiskLimitExceeded"
        assert "50 MiB" in info.scheduling_error.message
        tasks = await _run(c, [task_spec("after", "sh -c 'echo fine > f'")])
        assert tasks["after"].execution_info.exit_code == 0
        assert tasks["after"].execution_info.scheduling_error is None
        assert (await c.client.tvms.list("p"))[0].state in ("idle", "running")
        if where.startswith("/"):
            assert not os.path.exists(where)  # noqa: ASYNC240 - swept with the task's user
            assert not os.path.exists(os.path.dirname(where)) or where.startswith("/var/")  # noqa: ASYNC240


@pytest.fixture
def own_user() -> Iterator[str]:
    """A task user of this test's own (RLIMIT_NPROC counts every process of the uid)."""
    name = f"tvmnp{os.getpid()}{secrets.token_hex(2)}"
    ensure_user(name)
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.mark.skipif(
    _root_reason is not None or not _caps.has_prlimit, reason=_root_reason or "needs prlimit"
)
async def test_without_a_pids_cgroup_a_fork_flood_meets_rlimit_nproc(open_root, own_user):
    marker = f"tvmforkflood{os.getpid()}{secrets.token_hex(3)}"
    lay = _caps.layout
    no_pids = dataclasses.replace(
        lay,
        v2_controllers=lay.v2_controllers - {"pids"},
        v1_bases={k: v for k, v in lay.v1_bases.items() if k != "pids"},
    )
    caps = dataclasses.replace(_caps, layout=no_pids, cgroup_mode=no_pids.mode, notes=[])
    assert any("falls back to RLIMIT_NPROC" in line for line in caps.describe())
    sandbox = Sandbox(caps, cgroup_prefix=f"tvmtest-np-{os.getpid()}", kill_grace=1.0)
    wd = Path(open_root)
    try:
        proc = await sandbox.start(
            ProcessSpec(
                argv=[PY, "-c", FORK_FLOOD, marker],
                cwd=str(wd),
                env={"PATH": "/usr/bin:/bin"},
                stdout_path=str(wd / "stdout.txt"),
                stderr_path=str(wd / "stderr.txt"),
                run_as=own_user,
                pids_limit=64,
            )
        )
        outcome = await proc.wait()
        out = (wd / "stdout.txt").read_text().split()
        assert outcome.exit_code == 0, (outcome, (wd / "stderr.txt").read_text())
        assert out[0] == "forked", out
        assert int(out[1]) < 64, out
        assert _procs_with(marker) == []
    finally:
        for pid in _procs_with(marker):
            os.kill(pid, 9)
        sandbox.close()
