"""An agent killed outright whose root was then deleted leaves its task cgroups (with what runs in
them) and its pool group to the next agent that starts on the host (`tvmagent.leftovers`)."""

from __future__ import annotations

import grp
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tvmagent import _cgroups, isolation, leftovers


@pytest.fixture
def layout() -> _cgroups.CgroupLayout:
    found = _cgroups.detect_layout([])
    if os.geteuid() != 0 or not found.v2_base or not os.access(found.v2_base, os.W_OK):
        pytest.skip("needs root (groupadd) and a writable cgroup v2 hierarchy")
    return found


@pytest.fixture
def group() -> Iterator[str]:
    name = isolation.pool_group_name(f"tvmtest-lo{os.getpid()}", "acct", "pool", "tvm-0")
    isolation.ensure_group(name)
    try:
        yield name
    finally:
        isolation.remove_group(name)


def _dead_agent_record(
    directory: Path, root: Path, layout: _cgroups.CgroupLayout, prefix: str, group: str
) -> None:
    """A record as a killed agent of `root` left it: written by a process that has ended."""
    code = (
        "import sys; from tvmagent import _cgroups, leftovers; "
        "leftovers.record(sys.argv[1], _cgroups.detect_layout([]), sys.argv[2], sys.argv[3], "
        "sys.argv[4])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(root), prefix, group, str(directory)], check=True
    )


def _task_in_cgroup(layout: _cgroups.CgroupLayout, prefix: str) -> tuple[subprocess.Popen, str]:
    task_dir = os.path.join(layout.v2_base or "", prefix, "task-1-0123abcd")
    os.makedirs(task_dir)
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    with open(os.path.join(task_dir, "cgroup.procs"), "w") as f:
        f.write(str(proc.pid))
    return proc, task_dir


def _cleanup(proc: subprocess.Popen, task_dir: str) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for d in (task_dir, os.path.dirname(task_dir)):
        if os.path.isdir(d):
            for _ in range(100):
                try:
                    os.rmdir(d)
                    break
                except OSError:
                    time.sleep(0.02)


def test_a_dead_agent_of_a_deleted_root_loses_its_task_and_group(
    tmp_path: Path, layout: _cgroups.CgroupLayout, group: str
) -> None:
    records, root = tmp_path / "records", tmp_path / "agent-root"
    prefix = f"tvm-tvmtest-lo{os.getpid()}-a"
    root.mkdir()
    _dead_agent_record(records, root, layout, prefix, group)
    proc, task_dir = _task_in_cgroup(layout, prefix)
    try:
        assert leftovers.sweep(str(records)) == []  # its root is still there: kept for a restart
        assert proc.poll() is None
        assert grp.getgrnam(group)
        root.rmdir()
        removed = leftovers.sweep(str(records))
        assert proc.wait(timeout=10) == -signal.SIGKILL
        assert not os.path.exists(os.path.dirname(task_dir))
        with pytest.raises(KeyError):
            grp.getgrnam(group)
        assert group in removed
        assert os.listdir(records) == []  # done: the record went too
    finally:
        _cleanup(proc, task_dir)


def test_a_live_agent_is_never_swept(
    tmp_path: Path, layout: _cgroups.CgroupLayout, group: str
) -> None:
    records, root = tmp_path / "records", tmp_path / "gone-root"
    prefix = f"tvm-tvmtest-lo{os.getpid()}-b"
    leftovers.record(str(root), layout, prefix, group, str(records))  # this process: alive
    proc, task_dir = _task_in_cgroup(layout, prefix)
    try:
        assert leftovers.sweep(str(records)) == []
        assert proc.poll() is None
        assert grp.getgrnam(group)
        assert len(os.listdir(records)) == 1
    finally:
        _cleanup(proc, task_dir)


def test_a_group_a_process_still_has_is_kept_until_it_ends(
    tmp_path: Path, layout: _cgroups.CgroupLayout, group: str
) -> None:
    """Its number must not go to another pool's group while a process (outside the cgroups) holds
    it; the record stays, and the next sweep after that process ended removes the group."""
    records, root = tmp_path / "records", tmp_path / "gone-root"
    _dead_agent_record(records, root, layout, f"tvm-tvmtest-lo{os.getpid()}-c", group)
    gid = grp.getgrnam(group).gr_gid
    holder = subprocess.Popen(["sleep", "60"], extra_groups=[gid])
    try:
        assert leftovers.gid_in_use(gid)
        assert group not in leftovers.sweep(str(records))
        assert grp.getgrnam(group)
        assert len(os.listdir(records)) == 1
        holder.kill()  # killed but not yet reaped (a zombie): it reaches nothing any more
        for _ in range(500):
            if Path(f"/proc/{holder.pid}/status").read_text().split("State:")[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        assert not leftovers.gid_in_use(gid)
    finally:
        holder.kill()
        holder.wait()
    assert group in leftovers.sweep(str(records))
    with pytest.raises(KeyError):
        grp.getgrnam(group)


def test_a_record_from_before_a_reboot_is_not_alive_whatever_runs_under_its_pid(
    tmp_path: Path, layout: _cgroups.CgroupLayout, group: str
) -> None:
    records, root = tmp_path / "records", tmp_path / "gone-root"
    leftovers.record(str(root), layout, f"tvm-tvmtest-lo{os.getpid()}-d", group, str(records))
    (path,) = records.iterdir()
    rec = json.loads(path.read_text())
    rec["boot"] = "another-boot"  # our own pid and start time, but of another boot
    path.write_text(json.dumps(rec))
    assert group in leftovers.sweep(str(records))


def test_unreadable_records_and_paths_outside_cgroupfs_are_left_alone(
    tmp_path: Path, layout: _cgroups.CgroupLayout
) -> None:
    records = tmp_path / "records"
    records.mkdir()
    (records / "garbage").write_text("{not json")
    victim = tmp_path / "victim" / "task-1"
    victim.mkdir(parents=True)
    (records / "outside").write_text(
        json.dumps(
            {
                "root": str(tmp_path / "gone"),
                "cgroups": [str(victim.parent)],
                "group": "",
                "pid": 1,
                "start": "0",
                "boot": "x",
            }
        )
    )
    assert leftovers.sweep(str(records)) == []
    assert victim.is_dir()
    assert (records / "garbage").exists()


async def test_the_next_agent_removes_what_a_killed_agent_of_a_deleted_root_left(
    nursery, tmp_path: Path, layout: _cgroups.CgroupLayout
) -> None:
    """Real agents: one runs a task as a task user (a pool group, a task cgroup), is killed
    outright, and its root deleted; the next agent to start on the host removes both."""
    import shutil

    from benchmarks._procs import remove_agent_cgroups
    from coordinator.client import task_spec
    from tests.harness import cluster_ctx
    from tests.security.pool_groups import open_agent_base
    from tvmagent.pool_isolation import POOL_GROUP_FILE

    os.makedirs(tmp_path / "agents", exist_ok=True)
    with open_agent_base("tvm-leftovers-") as base:
        root0 = os.path.join(base, "a0")
        async with cluster_ctx(nursery, tmp_path) as c:
            a0 = c.start_agent(extra_args=["--task-isolation", "users"], root=root0)
            await c.pool_with_tvms("p", 1)
            await c.client.workitems.add("wi", "p")
            await c.client.tasks.add_many("wi", "job-0000000001", [task_spec("t", "sleep 300")])

            async def running() -> bool:
                t = await c.client.tasks.get("wi", "job-0000000001", "t")
                return t.state == "running"

            await c.wait_for(running, what="the task running")
            group = Path(root0, POOL_GROUP_FILE).read_text().strip()
            record = Path(leftovers.RECORDS_DIR) / os.path.basename(
                leftovers._path(root0, leftovers.RECORDS_DIR)
            )
            cgroups = json.loads(record.read_text())["cgroups"]

            def task_cgroups() -> list[str]:  # "running" is said at placement: wait for the start
                return [
                    e.path
                    for p in cgroups
                    if os.path.isdir(p)
                    for e in os.scandir(p)
                    if e.is_dir() and Path(e.path, "cgroup.procs").read_text().strip()
                ]

            await c.wait_for(task_cgroups, what="the task's process in its cgroup")
            assert grp.getgrnam(group)
            a0.kill()
            a0.proc.wait()
            try:
                shutil.rmtree(root0)
                c.start_agent(
                    extra_args=["--task-isolation", "users"], root=os.path.join(base, "a1")
                )

                def swept() -> bool:
                    try:
                        grp.getgrnam(group)
                        return False
                    except KeyError:
                        return not any(os.path.exists(p) for p in cgroups) and not record.exists()

                await c.wait_for(swept, what="the killed agent's group and cgroups removed")
            finally:
                os.makedirs(root0, exist_ok=True)
                remove_agent_cgroups(a0.name, root0)  # on failure: leave nothing behind


def test_the_last_record_forgotten_takes_the_directory_with_it(
    layout: _cgroups.CgroupLayout, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing of the agents stays on a host where none runs: the records' directory (and its
    parent, when empty) goes with the last record; another agent's record keeps it."""
    parent = tmp_path / "tvm-batch"
    records = parent / "agents"
    a, b = tmp_path / "a", tmp_path / "b"
    leftovers.record(str(a), layout, "tvm-x", "", directory=str(records))
    leftovers.record(str(b), layout, "tvm-y", "", directory=str(records))
    leftovers.forget(str(a), directory=str(records))
    assert len(os.listdir(records)) == 1  # b's
    leftovers.forget(str(b), directory=str(records))
    assert not parent.exists()
    # an agent recording itself just as the last one removed the directory writes it again
    real_open = os.open
    removed: list[str] = []

    def racing_open(path: str, *args: object, **kwargs: object) -> int:
        if not removed:
            removed.append(path)
            os.rmdir(records)  # what a stopping agent's forget does between makedirs and open
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(os, "open", racing_open)
        leftovers.record(str(a), layout, "tvm-x", "", directory=str(records))
    assert removed
    assert len(os.listdir(records)) == 1
    leftovers.forget(str(a), directory=str(records))
    assert not parent.exists()
