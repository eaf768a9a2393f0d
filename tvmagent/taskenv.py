"""Directory layout of a TVM and the environment each task sees (pure; DESIGN.md §3)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

from protocol.messages import TaskSpec

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class TvmIdentity:
    account: str
    account_url: str
    pool: str
    tvm_name: str
    root: str
    port_low: int = 0
    port_high: int = 0

    @property
    def shared_dir(self) -> str:
        return os.path.join(self.root, "shared")

    @property
    def start_dir(self) -> str:
        return os.path.join(self.root, "start")

    @property
    def certs_dir(self) -> str:
        return os.path.join(self.root, "certs")


def task_dir(root: str, key: str) -> str:
    wi, job, task = key.split("/")
    return os.path.join(root, "tasks", wi, job, task)


def tvm_env(tvm: TvmIdentity) -> dict[str, str]:
    """Variables every process on the TVM gets (the start task gets only these). A new dict each
    call (callers may change theirs); built once per TVM identity."""
    return dict(_tvm_env(tvm))


@functools.lru_cache(maxsize=8)
def _tvm_env(tvm: TvmIdentity) -> dict[str, str]:
    return {
        "WATASK_ACCOUNT_NAME": tvm.account,
        "WATASK_POOL_NAME": tvm.pool,
        "WATASK_TVM_NAME": tvm.tvm_name,
        "WATASK_TVM_ROOT_DIR": tvm.root,
        "WATASK_PORTRANGE_LOW": str(tvm.port_low),
        "WATASK_PORTRANGE_HIGH": str(tvm.port_high),
        "WATASK_CERTIFICATES_DIR": tvm.certs_dir,
        "AZ_BATCH_ACCOUNT_NAME": tvm.account,
        "AZ_BATCH_ACCOUNT_URL": tvm.account_url,
        "AZ_BATCH_POOL_ID": tvm.pool,
        "AZ_BATCH_NODE_ID": tvm.tvm_name,
        "AZ_BATCH_NODE_IS_DEDICATED": "true",
        "AZ_BATCH_NODE_ROOT_DIR": tvm.root,
        "AZ_BATCH_NODE_SHARED_DIR": tvm.shared_dir,
        "AZ_BATCH_NODE_STARTUP_DIR": tvm.start_dir,
        "AZ_BATCH_CERTIFICATES_DIR": tvm.certs_dir,
    }


def start_task_env(tvm: TvmIdentity, user_env: dict[str, str]) -> dict[str, str]:
    wd = os.path.join(tvm.start_dir, "wd")
    env = {"PATH": f"{DEFAULT_PATH}:{tvm.shared_dir}:{wd}", "HOME": wd, "PWD": wd}
    env.update(user_env)
    env.update(_tvm_env(tvm))
    return env


def task_env(tvm: TvmIdentity, spec: TaskSpec) -> dict[str, str]:
    """User settings first, then the system variables on top: users cannot override them."""
    tdir = task_dir(tvm.root, spec.key)
    wd = os.path.join(tdir, "wd")
    env = {"PATH": f"{DEFAULT_PATH}:{tvm.shared_dir}:{wd}", "HOME": wd, "PWD": wd}
    env.update(spec.env)
    env.update(_tvm_env(tvm))
    env.update(
        {
            "WATASK_WORKITEM_NAME": spec.workitem,
            "WATASK_JOB_NAME": spec.job,
            "WATASK_TASK_NAME": spec.task,
            "AZ_BATCH_JOB_ID": spec.job_id or spec.workitem,
            "AZ_BATCH_TASK_ID": spec.task,
            "AZ_BATCH_TASK_DIR": tdir,
            "AZ_BATCH_TASK_WORKING_DIR": wd,
            "AZ_BATCH_TASK_SHARED_DIR": tdir,  # one instance per task: its own directory
            "AZ_BATCH_TASK_USER_IDENTITY": "PoolAdmin" if spec.run_elevated else "PoolNonAdmin",
            "TVM_WORKITEM_NAME": spec.workitem,
        }
    )
    if spec.job_prep and spec.kind != "jobprep":
        prep = os.path.join(os.path.dirname(tdir), spec.job_prep)
        env["AZ_BATCH_JOB_PREP_DIR"] = prep
        env["AZ_BATCH_JOB_PREP_WORKING_DIR"] = os.path.join(prep, "wd")
    if spec.system_env:
        env.update(spec.system_env)
    return env
