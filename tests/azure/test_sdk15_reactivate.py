"""Microsoft's `azure-batch` 15.1.0 against a real `tvm up`: a running task terminated and reactivated
at once runs again on the same TVM in a directory of its own. Terminate answers before the agent has
killed the old run and deleted its files; that deletion must not take the new run's directory."""

from __future__ import annotations

import os
import time
import uuid

from azure.batch import BatchClient
from azure.batch import models as bm

from tests.azure import sdk15
from tests.azure.sdk15 import batch_client, ubuntu_pool
from tests.tvmup import TvmUp

ROUNDS = 6


up = sdk15.up_fixture(1)


def _state(client: BatchClient, job_id: str, task_id: str) -> bm.BatchTask:
    return client.get_task(job_id, task_id)


def _wait_state(client: BatchClient, job_id: str, task_id: str, state: str) -> bm.BatchTask:
    deadline = time.monotonic() + 60
    while (t := _state(client, job_id, task_id)).state != state:
        assert time.monotonic() < deadline, f"{task_id} never {state}: {t.state}"
        time.sleep(0.05)
    return t


def test_reactivated_task_keeps_its_new_directory(up: TvmUp) -> None:
    client = batch_client(up)
    suffix = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    pool_id, job_id = f"re-pool-{suffix}", f"re-job-{suffix}"
    client.create_pool(ubuntu_pool(pool_id, 1))
    client.create_job(
        bm.BatchJobCreateOptions(id=job_id, pool_info=bm.BatchPoolInfo(pool_id=pool_id))
    )
    failures = []
    try:
        for i in range(ROUNDS):
            tid = f"t{i}"
            # The new run proves its directory held: it writes there, then waits to be stopped.
            client.create_task(
                job_id,
                bm.BatchTaskCreateOptions(
                    id=tid, command_line="/bin/sh -c 'echo run > mine; sleep 300'"
                ),
            )
            _wait_state(client, job_id, tid, bm.BatchTaskState.RUNNING)
            client.terminate_task(job_id, tid)
            _wait_state(client, job_id, tid, bm.BatchTaskState.COMPLETED)
            client.reactivate_task(job_id, tid)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                t = _state(client, job_id, tid)
                if t.state == bm.BatchTaskState.COMPLETED:
                    info = t.execution_info
                    why = info.failure_info.message if info and info.failure_info else None
                    failures.append(f"{tid}: the reactivated run ended at once: {why}")
                    break
                time.sleep(0.05)
            else:
                got = b"".join(client.download_task_file(job_id, tid, "wd/mine"))
                assert got == b"run\n", got
            client.delete_task(job_id, tid)
    finally:
        client.begin_delete_job(job_id).result()
        client.begin_delete_pool(pool_id).result()
        client.close()
    assert not failures, failures
