"""The names the Azure API shows for the core's records (pure).

A modern job `X` is workitem `X` with its one job; a job created by job schedule `S` is `S:job-N`
(workitem `S`, job `job-000000000N`). Node files: Azure's `startup/` is the TVM's `start/`, and a
task's directory `workitems/{job}/job-1/{task}` is the TVM's `tasks/{workitem}/{job}/{task}`.
"""

from __future__ import annotations

import re

from coordinator.common.errors import ApiError
from coordinator.core import CoordinatorState
from coordinator.core.records import Job, modern_job_id

_SCHEDULED = re.compile(r"(?P<wi>[^:]+):job-(?P<n>[0-9]{1,10})\Z")
_SEED_JOB = re.compile(r"job-(?P<n>[0-9]{10})\Z")


def _job_not_found(jid: str) -> ApiError:
    return ApiError(404, "JobNotFound", f"The specified job '{jid}' does not exist.", Name=jid)


def job_id(core: CoordinatorState, workitem: str, job: str) -> str:
    wi = core.workitems.get(workitem)
    return modern_job_id(workitem, job, wi is None or wi.spec.schedule is not None)


def resolve_job(core: CoordinatorState, jid: str) -> Job:
    """The job record an Azure job id names, or 404 JobNotFound."""
    sched = _SCHEDULED.match(jid)
    if sched:
        wi = core.workitems.get(sched["wi"])
        name = f"job-{int(sched['n']):010d}"
        job = core.jobs.get(f"{sched['wi']}/{name}")
        if wi is None or wi.spec.schedule is None or job is None:
            raise _job_not_found(jid)
        return job
    wi = core.workitems.get(jid)
    if wi is None or wi.spec.schedule is not None:
        raise _job_not_found(jid)
    jobs = core.workitem_jobs(jid)
    if not jobs:
        raise _job_not_found(jid)
    return jobs[0]


def _short_job(job: str) -> str:
    seed = _SEED_JOB.match(job)
    return f"job-{int(seed['n'])}" if seed else job


def node_path_out(path: str) -> str:
    """A path under the TVM root -> the path Azure shows under the node's files."""
    parts = path.split("/")
    if parts[0] == "start":
        return "/".join(["startup", *parts[1:]])
    if parts[0] == "tasks" and len(parts) >= 3:
        return "/".join(["workitems", parts[1], _short_job(parts[2]), *parts[3:]])
    return path


def node_path_in(path: str) -> str:
    """An Azure node file path -> the path under the TVM root."""
    parts = path.split("/")
    if parts[0] == "startup":
        return "/".join(["start", *parts[1:]])
    if parts[0] == "workitems" and len(parts) >= 3:
        m = re.fullmatch(r"job-([0-9]{1,10})", parts[2])
        job = f"job-{int(m[1]):010d}" if m else parts[2]
        return "/".join(["tasks", parts[1], job, *parts[3:]])
    return path
