"""Pool limits on the wire and the agent's disk measurement (pure, files in tmp_path)."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core.pool_limits import check_pool_limits, join_limits
from protocol import agent_codec
from protocol import messages as pm
from tvmagent.limits import DEFAULT_TASK_PIDS, TaskLimits, dir_usage, scratch_usage, tasks_usage


def test_old_coordinators_messages_decode_with_the_defaults() -> None:
    # What a coordinator without the limits (or the pool of PoolMembers) sends.
    old_join = msgspec.msgpack.encode(
        {"t": "tvm.join", "pool": "p", "tvm_name": "t", "account": "a"}
    )
    join = agent_codec().decode_message(old_join)
    assert isinstance(join, pm.JoinPool)
    assert (join.task_pids_limit, join.disk_limit_bytes) == (0, 0)
    limits = TaskLimits("/nonexistent")
    limits.apply_join(join)
    assert limits.process_limits() == {"memory_limit_bytes": None, "pids_limit": DEFAULT_TASK_PIDS}
    members = agent_codec().decode_message(
        msgspec.msgpack.encode({"t": "pool.members", "addresses": ["10.0.0.1"]})
    )
    assert isinstance(members, pm.PoolMembers)
    assert members.pool == ""


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"task_pids_limit": 15}, "taskPidsLimit"),
        ({"task_pids_limit": 1_000_001}, "taskPidsLimit"),
        ({"tvm_disk_limit_mib": 0}, "tvmDiskLimitMiB"),
        ({"tvm_disk_limit_mib": -5}, "tvmDiskLimitMiB"),
    ],
)
def test_pool_limits_out_of_range_name_the_field(kw: dict[str, int], field: str) -> None:
    with pytest.raises(ApiError) as err:
        check_pool_limits(m.PoolAdd(name="p", **kw), "autoPoolSpecification.pool.")
    assert f"autoPoolSpecification.pool.{field}" in str(err.value.__dict__)


def test_pool_limits_reach_the_join_message() -> None:
    spec = m.PoolAdd(name="p", task_pids_limit=16, tvm_disk_limit_mib=50)
    check_pool_limits(spec)
    assert join_limits(spec) == {"task_pids_limit": 16, "disk_limit_bytes": 50 << 20}
    assert join_limits(m.PoolAdd(name="p")) == {"task_pids_limit": 0, "disk_limit_bytes": 0}
    wire = msgspec.json.decode(msgspec.json.encode(spec))
    assert (wire["taskPidsLimit"], wire["tvmDiskLimitMiB"]) == (16, 50)


def test_dir_usage_counts_each_inode_once_and_follows_no_symlink(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    big = tmp_path / "d" / "big"
    big.write_bytes(os.urandom(1 << 20))
    os.link(big, tmp_path / "d" / "hardlink")
    os.symlink("/usr", tmp_path / "d" / "link-out")
    used = dir_usage(str(tmp_path), set(), [1000])
    assert (1 << 20) <= used < (1 << 20) + (64 << 10)  # the file once, plus directory blocks
    assert dir_usage(str(tmp_path), set(), [1]) == 0  # the entry budget bounds the walk


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files of other uids)")
def test_a_tasks_files_in_the_scratch_roots_count_for_it(tmp_path: Path) -> None:
    """What a running task's user owns in /tmp-like roots is its disk use too: found in its own
    and in world-writable directories, nowhere else; split between tasks sharing one user."""
    uid_a, uid_b = 61001, 61002
    scratch = tmp_path / "scratch"
    (scratch / "open").mkdir(parents=True)
    os.chmod(scratch / "open", 0o1777)
    (scratch / "closed").mkdir()  # someone else's, not world-writable: a task could not write here

    def put(path: Path, size: int, uid: int) -> None:
        path.write_bytes(b"\1" * size)
        os.chown(path, uid, uid)

    put(scratch / "a1", 1 << 20, uid_a)
    put(scratch / "open" / "a2", 1 << 20, uid_a)
    (scratch / "mine").mkdir()
    os.chown(scratch / "mine", uid_a, uid_a)
    put(scratch / "mine" / "a3", 1 << 20, uid_a)
    put(scratch / "closed" / "a4", 8 << 20, uid_a)  # planted by root: not looked for
    put(scratch / "b1", 2 << 20, uid_b)
    got = scratch_usage(frozenset({uid_a, uid_b}), set(), [1000], (str(scratch),))
    assert 3 << 20 <= got[uid_a] < (3 << 20) + (64 << 10)
    assert 2 << 20 <= got[uid_b] < (2 << 20) + (16 << 10)

    root = tmp_path / "tvm"
    for key, uid in (("w/j/t1", uid_a), ("w/j/t2", uid_b), ("w/j/t3", uid_b), ("w/j/t4", 0)):
        d = root / "tasks" / key
        d.mkdir(parents=True)
        os.chown(d, uid, uid)
    keys = ["w/j/t1", "w/j/t2", "w/j/t3", "w/j/t4"]
    usage, truncated = tasks_usage(str(root), keys, (str(scratch),))
    assert not truncated
    assert usage["w/j/t1"] >= 3 << 20
    assert 1 << 20 <= usage["w/j/t2"] == usage["w/j/t3"] < 2 << 20  # one user, two tasks
    assert usage["w/j/t4"] < 64 << 10  # root's files are nobody's
