"""A pool's resource limits: what the REST API accepts and what the agents receive.

* ``taskPidsLimit``: processes (and threads) one task may have at once; the agent enforces it with
  the pids cgroup (RLIMIT_NPROC on the task's own user where there is none). Absent: the agent's
  default, 4,096 per task slot.
* ``tvmDiskLimitMiB``: disk space the files of a TVM's running tasks may take (their task
  directories, plus what their users own in ``shared/``). The agent measures it about once a second
  and fails the task holding the most with ``DiskLimitExceeded``. Absent: no such limit (the TVM
  still goes ``unusable`` when its disk has less than 256 MiB free).
"""

from __future__ import annotations

from coordinator.common import models as m
from coordinator.common.timeutil import parse_duration
from coordinator.common.validation import check_range

PIDS_MIN, PIDS_MAX = (
    16,
    1_000_000,
)  # below 16 even a shell pipeline fails; the kernel's pid_max bounds the rest
DISK_MIB_MIN, DISK_MIB_MAX = 1, 1 << 30  # 1 MiB .. 1 PiB


def check_pool_limits(req: m.PoolAdd, prefix: str = "") -> None:
    """400 naming the field for an out-of-range limit."""
    if req.unknown_tvm_timeout is not None:
        seconds = parse_duration(req.unknown_tvm_timeout, prefix + "unknownTvmTimeout")
        check_range(int(seconds), 1, 7 * 24 * 3600, prefix + "unknownTvmTimeout")
    for value, low, high, name in (
        (req.task_pids_limit, PIDS_MIN, PIDS_MAX, "taskPidsLimit"),
        (req.tvm_disk_limit_mib, DISK_MIB_MIN, DISK_MIB_MAX, "tvmDiskLimitMiB"),
    ):
        if value is not None:
            check_range(value, low, high, prefix + name)


def join_limits(spec: m.PoolAdd) -> dict[str, int]:
    """The JoinPool fields for the pool's limits (0: the agent's default / none)."""
    return {
        "task_pids_limit": spec.task_pids_limit or 0,
        "disk_limit_bytes": (spec.tvm_disk_limit_mib or 0) * 1024 * 1024,
    }
