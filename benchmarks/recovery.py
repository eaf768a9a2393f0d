"""Recovery: coordinator restart time with N tasks in the store.

The store is filled by the real core and journal code (N tasks added in collections of 100 to one
job, half of them completed), then a real `tvm coordinator` process is started on it. Value: wall
time from starting the process until its REST API answers a signed request (restore included).
The in-process restore time (`CoordinatorService.restore_seconds`, journal load + rebuild) is
reported as a second row.

    python -m benchmarks.recovery [--quick] [--tasks 1000000]
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time

import msgspec

from coordinator.client import BatchError, Client
from coordinator.common import models as m
from coordinator.core import CoordinatorState, Write
from coordinator.runtime.journal import SqliteStore
from coordinator.runtime.service import CoordinatorService

from ._common import args, child_env, emit, say


def fill(state_dir: str, n: int) -> None:
    svc = CoordinatorService(state_dir)  # creates keys, epoch, schema
    core: CoordinatorState = svc.core
    core.add_pool(m.PoolAdd(name="p", vm_size="small", target_dedicated=0))
    core.add_workitem(
        m.WorkitemAdd(name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    svc.store.apply(core.take_effects().writes)
    job = core.jobs["wi/job-0000000001"]
    enc = msgspec.msgpack.Encoder()
    pending: list[Write] = []
    for start in range(0, n, 100):
        names = [f"task-{i:07d}" for i in range(start, min(n, start + 100))]
        core.add_tasks(
            "wi",
            "job-0000000001",
            [m.TaskAdd(name=name, command_line=f'/bin/sh -c "render {name}"') for name in names],
        )
        writes = core.take_effects().writes
        if (start // 100) % 2 == 1:  # half the tasks finished before the restart
            writes = []
            for name in names:
                t = job.tasks[name]
                t.state, t.prev_state, t.exit_code, t.end_time = (
                    "completed",
                    "running",
                    0,
                    t.created + 1,
                )
                writes.append(Write("task", f"{job.key}/{name}", enc.encode(t)))
        pending.extend(writes)
        if len(pending) >= 20_000:
            svc.store.apply(pending)
            pending = []
    svc.store.apply(pending)
    svc.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def restart_time(state_dir: str) -> float:
    port = free_port()
    store = SqliteStore(os.path.join(state_dir, "coordinator.db"))
    account, key = store.get_meta("account"), store.get_meta("key1")
    store.close()
    log = open(os.path.join(os.path.dirname(state_dir), "coordinator.log"), "wb")  # noqa: SIM115
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "coordinator",
            "--state-dir",
            state_dir,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
        env=child_env(),
        start_new_session=True,
    )
    client = Client(f"http://127.0.0.1:{port}", account, key, timeout=5)
    try:
        while True:
            if proc.poll() is not None:
                log.close()
                with open(log.name, errors="replace") as f:
                    raise RuntimeError(
                        f"coordinator exited with {proc.returncode}: {f.read()[-2000:]}"
                    )
            try:
                client.pools.list()
                break
            except BatchError:
                time.sleep(0.02)
            if time.monotonic() - t0 > 300:
                raise RuntimeError("coordinator did not answer within 300 s")
        return time.monotonic() - t0
    finally:
        client.close()
        log.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    a = args(__doc__ or "", lambda p: p.add_argument("--tasks", type=int, default=0))
    n = a.tasks or (20_000 if a.quick else 1_000_000)
    with tempfile.TemporaryDirectory(prefix="tvm-bench-") as tmp:
        state = os.path.join(tmp, "state")
        t0 = time.monotonic()
        fill(state, n)
        fill_s = time.monotonic() - t0
        restart = restart_time(state)
        t0 = time.monotonic()
        svc = CoordinatorService(state)
        restore = svc.restore_seconds
        loaded = len(svc.core.jobs["wi/job-0000000001"].tasks)
        svc.close()
        if loaded != n:
            raise RuntimeError(f"restored {loaded} tasks, expected {n}")
    emit("coordinator_restart", {"tasks_in_store": n}, restart, "s")
    emit("coordinator_restore_in_process", {"tasks_in_store": n}, restore, "s")
    say(
        f"recovery: {n:,} tasks in the store (filled in {fill_s:.1f} s): restart until the API answers "
        f"{restart:.2f} s; restore alone {restore:.2f} s"
    )


if __name__ == "__main__":
    main()
