"""REST route for where a job's preparation and release tasks ran: one entry per TVM."""

from __future__ import annotations

from typing import Any

from coordinator.common import models as m
from coordinator.common.timeutil import rfc3339
from coordinator.core.records import JobPrepRec, PrepRun

from . import paging
from .dispatch import Response, RouteAdder, RouteGroup, _json_response
from .views import scheduling_error


def _info(run: PrepRun | None, task_dir: str) -> m.PrepTaskExecutionInfo | None:
    if run is None:
        return None
    done = run.state == "completed"
    return m.PrepTaskExecutionInfo(
        state=run.state,
        start_time=rfc3339(run.start_time),
        end_time=rfc3339(run.end_time) if done else None,
        exit_code=run.exit_code if done else None,
        retry_count=run.retry_count,
        last_retry_time=rfc3339(run.last_retry),
        result=("success" if run.succeeded else "failure") if done else None,
        task_root_directory=task_dir,
        scheduling_error=scheduling_error(run.failure),
    )


def status_view(rec: JobPrepRec) -> m.JobPrepReleaseStatus:
    root = f"tasks/{rec.job}"
    return m.JobPrepReleaseStatus(
        pool_name=rec.pool,
        tvm_name=rec.tvm,
        job_preparation_task_execution_info=_info(rec.prep, f"{root}/{rec.prep_name}"),
        job_release_task_execution_info=_info(rec.release, f"{root}/{rec.release_name}"),
    )


class JobPrepRoutes(RouteGroup):
    def register(self, r: RouteAdder) -> None:
        r(
            "GET",
            r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/jobpreparationandreleasetaskstatus",
            self.status,
        )

    async def status(self, wi: str, job: str, query: dict[str, str], **_: Any) -> Response:
        recs = self.core.job_prep_status(wi, job)
        return _json_response(200, paging.listing(recs, query, lambda p: p.tvm, status_view))
