"""Apache Airflow's `AzureBatchOperator` (apache-airflow-providers-microsoft-azure), unmodified,
executed against the endpoint in TVM_ENDPOINT / TVM_ACCOUNT / TVM_KEY through an Airflow connection
(`AIRFLOW_CONN_AZURE_BATCH_DEFAULT`, the way a deployment passes one in). Runs in its own virtual
environment; prints one JSON report line (see report.py) and exits 1 if any step failed.

The operator creates the pool (picking the image from /supportedimages with a $filter), waits for
its node to be idle, creates the job and the task, waits for success and deletes job and pool.
"""

from __future__ import annotations

import json
import os
import sys

POOL = "airflow-pool"
JOB = "airflow-job"
TASK = "airflow-task"


def main() -> int:
    os.environ["AIRFLOW_CONN_AZURE_BATCH_DEFAULT"] = json.dumps(
        {
            "conn_type": "azure_batch",
            "login": os.environ["TVM_ACCOUNT"],
            "password": os.environ["TVM_KEY"],
            "extra": {"account_url": os.environ["TVM_ENDPOINT"]},
        }
    )
    # Imported after the connection is set: Airflow reads its configuration at import.
    from airflow.providers.microsoft.azure.hooks.batch import AzureBatchHook
    from airflow.providers.microsoft.azure.operators.batch import AzureBatchOperator
    from azure.core.exceptions import ResourceNotFoundError
    from report import Abort, Report

    r = Report()
    try:
        with r.step("connection test lists jobs"):
            ok, message = AzureBatchHook().test_connection()
            assert ok, message
        op = AzureBatchOperator(
            task_id="tvm_batch",
            batch_pool_id=POOL,
            batch_pool_vm_size="Standard_A1_v2",
            batch_job_id=JOB,
            batch_task_id=TASK,
            batch_task_command_line="/bin/sh -c 'echo hello $AZ_BATCH_TASK_ID'",
            # The image comes from /supportedimages ($filter=verificationType eq 'verified').
            use_latest_verified_vm_image_and_sku=True,
            vm_publisher="canonical",
            vm_offer="0001-com-ubuntu-server-jammy",
            sku_starts_with="22_04",
            vm_sku="22_04-lts",
            vm_node_agent_sku_id="batch.node.ubuntu 22.04",
            target_dedicated_nodes=1,
            timeout=5,  # minutes for the task
            should_delete_job=True,
            should_delete_pool=True,
        )
        with r.step("operator ran: pool, nodes idle, job, task succeeded, cleanup", fatal=True):
            op.execute(context={})  # type: ignore[arg-type]
        client = AzureBatchHook().get_conn()
        with r.step("job and pool are gone afterwards"):
            for get, name in ((client.get_job, JOB), (client.get_pool, POOL)):
                try:
                    get(name)
                except ResourceNotFoundError:
                    continue
                raise AssertionError(f"{name} still exists after the operator deleted it")
    except Abort:
        pass
    return r.dump()


if __name__ == "__main__":
    sys.exit(main())
