"""Where a job-scoped credential is valid: its own job's resources on the seed's routes and on
the Azure routes (`/jobs/{id}` with the modern id, `S:job-N` for a schedule's job)."""

from __future__ import annotations

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
