"""Where a job-scoped credential is valid: its own job's resources on the seed's routes and on
the Azure routes (`/jobs/{id}` with the modern id, `S:job-N` for a schedule's job)."""

from __future__ import annotations

from coordinator.common.errors import ApiError
from coordinator.common.models import TaskAdd
from coordinator.core import CoordinatorState
from coordinator.core.records import Job, modern_job_id

# `TVMJobToken` (the seed's client) and `Bearer` (what Azure SDKs send for a token credential,
# given to them as AZ_BATCH_AUTHENTICATION_TOKEN): the same job-scoped credential.
SCHEMES = ("TVMJobToken", "Bearer")


def job_scopes(core: CoordinatorState, job: Job) -> tuple[str, str]:
    wi = core.workitems.get(job.rec.workitem)
    scheduled = wi is None or wi.spec.schedule is not None
    modern = modern_job_id(job.rec.workitem, job.rec.name, scheduled)
    return f"/workitems/{job.rec.workitem}/jobs/{job.rec.name}", f"/jobs/{modern}"


def in_scope(path: str, scopes: tuple[str, ...]) -> bool:
    return any(path == s or path.startswith(s + "/") for s in scopes)


def is_job_credential(headers: dict[str, str]) -> bool:
    """The request came with a job-scoped credential (the dispatcher has checked it by now)."""
    return headers.get("authorization", "").partition(" ")[0] in SCHEMES


def check_elevation(job: Job, req: TaskAdd, headers: dict[str, str]) -> None:
    """A job credential may add elevated tasks only where its holder runs elevated already: the
    credential lives in the job manager's environment, and a job manager running as an ordinary
    task user must not become root on the pool's TVMs (which run other jobs' tasks) by adding
    a task. The account key can always."""
    if not req.run_elevated or not is_job_credential(headers):
        return
    jm = job.tasks.get(job.rec.jm_name) if job.rec.jm_name else None
    if jm is not None and jm.run_elevated:
        return
    raise ApiError(
        403,
        "AuthorizationFailure",
        f"task {req.name!r} asks to run elevated, and this job credential belongs to a job manager "
        "that does not: a job credential adds elevated tasks only when its job manager runs "
        "elevated. Add the task with the account key, or make the job manager run elevated.",
    )
