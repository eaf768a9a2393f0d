"""Azure routes for jobs: a job is a workitem with its one job (`S:job-N` for a schedule's jobs)."""

from __future__ import annotations

from typing import Any

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core.records import Job
from coordinator.rest.dispatch import Dispatcher, Response

from . import inputs
from .body import Body, parse_json
from .conv import (
    check_conditions,
    created,
    empty,
    invalid,
    json_response,
    metadata_url,
    resource_headers,
)
from .ids import job_id, resolve_job
from .router import AzureApi, base, listing, select_one
from .views import job_view

J = r"/jobs/(?P<job>[^/]+)"


def _modified(job: Job) -> float:
    return max(job.rec.created, job.rec.state_time)


class JobApi:
    def __init__(self, app: Dispatcher) -> None:
        self.svc = app.svc
        self.core = app.core

    def register(self, r: AzureApi) -> None:
        r.route("GET", "/jobs", self.list_jobs)
        r.route("POST", "/jobs", self.add_job)
        r.route("GET", J, self.get_job)
        r.route("PATCH", J, self.patch_job)
        r.route("PUT", J, self.put_job)
        r.route("DELETE", J, self.delete_job)
        r.route("POST", J + "/terminate", self.terminate_job)
        r.route("POST", J + "/disable", self.disable_job)
        r.route("POST", J + "/enable", self.enable_job)
        r.route("GET", J + "/taskcounts", self.task_counts)

    def _view(self, job: Job) -> dict[str, Any]:
        return job_view(self.core, base(), job)

    def _job(self, jid: str, headers: dict[str, str], *, read: bool) -> Job:
        job = resolve_job(self.core, jid)
        check_conditions(headers, self._view(job)["eTag"], _modified(job), read=read)
        return job

    async def list_jobs(self, query: dict[str, str], headers: dict[str, str], **_: Any) -> Response:
        return listing(
            list(self.core.jobs.values()),
            query,
            headers,
            kind="jobs",
            entity="jobs",
            key=lambda j: job_id(self.core, j.rec.workitem, j.rec.name),
            view=self._view,
        )

    async def add_job(self, body: bytes, headers: dict[str, str], **_: Any) -> Response:
        b = parse_json(body)
        req = inputs.job_add(b, self.core.vm_sizes())
        b.log_unknown("job add")
        if any(w.lower() == req.name.lower() for w in self.core.workitems):
            raise _exists(req.name)
        await self.svc.execute(self.core.add_workitem, req)
        job = resolve_job(self.core, req.name)
        view = self._view(job)
        return created(headers, view["url"], view["eTag"], _modified(job))

    async def get_job(
        self, job: str, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        rec = self._job(job, headers, read=True)
        view = self._view(rec)
        out = {"odata.metadata": metadata_url(base(), "jobs/@Element"), **select_one(view, query)}
        return json_response(
            200, out, headers, extra=resource_headers(view["eTag"], _modified(rec))
        )

    async def _apply(
        self, rec: Job, b: Body, *, replace: bool, headers: dict[str, str]
    ) -> Response:
        info = b.obj("poolInfo")
        if info is not None:
            pool = info.text("poolId")
            # A job on an auto pool may repeat its specification (a read, changed, written back);
            # the pool stays the one it has.
            auto = self.core.pools.get(rec.rec.pool)
            on_auto = auto is not None and bool(auto.auto_owner)
            if (info.has("autoPoolSpecification") and not on_auto) or (
                pool is not None and pool != rec.rec.pool
            ):
                raise invalid("poolInfo", pool, "a job's pool cannot be changed here")
        elif replace:
            raise invalid("poolInfo", None, "poolInfo is required")
        on_failure = inputs.task_failure(b)
        if b.has("onTaskFailure") and on_failure != rec.rec.on_task_failure:
            raise invalid(
                "onTaskFailure", on_failure, "onTaskFailure cannot change after the job is created"
            )
        b.accept("allowTaskPreemption", "networkConfiguration")
        priority = b.integer("priority", 0 if replace else None)
        cons = inputs.job_constraints(b.obj("constraints"))
        if replace and cons is None:
            cons = m.JobConstraints(max_wall_clock_time=None, max_task_retry_count=0)
        update = m.JobUpdate(
            priority=priority,
            job_constraints=cons,
            on_all_tasks_complete=inputs.on_all_complete(b) or ("noaction" if replace else None),
            max_parallel_tasks=inputs.max_parallel(b, -1 if replace else None),
        )
        meta = inputs.metadata(b.objs("metadata")) if b.has("metadata") or replace else None
        b.log_unknown("job update")
        wi = self.core.get_workitem(rec.rec.workitem)
        if meta is not None and wi.state in ("completed", "terminating"):
            # Checked before either change: the job and its metadata change together or not at all.
            raise ApiError(
                409, "JobCompleted", f"job {rec.rec.workitem!r} has ended; it cannot be updated"
            )
        await self.svc.execute(self.core.update_job, rec.rec.workitem, rec.rec.name, update)
        if meta is not None:
            await self.svc.execute(
                self.core.update_workitem, rec.rec.workitem, m.WorkitemUpdate(metadata=meta)
            )
        view = self._view(rec)
        extra = [
            (b"dataserviceid", view["url"].encode()),
            *resource_headers(view["eTag"], _modified(rec)),
        ]
        return empty(200, headers, extra)

    async def patch_job(self, job: str, body: bytes, headers: dict[str, str], **_: Any) -> Response:
        rec = self._job(job, headers, read=False)
        return await self._apply(rec, parse_json(body), replace=False, headers=headers)

    async def put_job(self, job: str, body: bytes, headers: dict[str, str], **_: Any) -> Response:
        rec = self._job(job, headers, read=False)
        return await self._apply(rec, parse_json(body), replace=True, headers=headers)

    async def delete_job(self, job: str, headers: dict[str, str], **_: Any) -> Response:
        rec = self._job(job, headers, read=False)
        wi = self.core.workitems.get(rec.rec.workitem)
        if wi is not None and wi.spec.schedule is None:
            await self.svc.execute(self.core.delete_workitem, rec.rec.workitem)
        else:
            await self.svc.execute(self.core.delete_job, rec.rec.workitem, rec.rec.name)
        return empty(202, headers)

    async def terminate_job(
        self, job: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        rec = self._job(job, headers, read=False)
        b = parse_json(body, required=False)
        reason = b.text("terminateReason")
        b.log_unknown("job terminate")
        await self.svc.execute(self.core.terminate_job, rec.rec.workitem, rec.rec.name, reason)
        return empty(202, headers, [(b"dataserviceid", f"{base()}/jobs/{job}".encode())])

    async def disable_job(
        self, job: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        rec = self._job(job, headers, read=False)
        b = parse_json(body)
        option = b.req_text("disableTasks").lower()
        b.log_unknown("job disable")
        await self.svc.execute(self.core.disable_job, rec.rec.workitem, rec.rec.name, option)
        return empty(202, headers, [(b"dataserviceid", f"{base()}/jobs/{job}".encode())])

    async def enable_job(self, job: str, headers: dict[str, str], **_: Any) -> Response:
        rec = self._job(job, headers, read=False)
        await self.svc.execute(self.core.enable_job, rec.rec.workitem, rec.rec.name)
        return empty(202, headers, [(b"dataserviceid", f"{base()}/jobs/{job}".encode())])

    async def task_counts(self, job: str, headers: dict[str, str], **_: Any) -> Response:
        rec = resolve_job(self.core, job)
        c = self.core.task_counts(rec)
        counts = {
            "active": c.active,
            "running": c.running,
            "completed": c.completed,
            "succeeded": c.succeeded,
            "failed": c.failed,
        }
        body = {
            "odata.metadata": metadata_url(base(), "taskcounts/@Element"),
            "taskCounts": counts,
            "taskSlotCounts": dict(counts),  # every task takes one slot here
        }
        return json_response(200, body, headers)


def _exists(name: str) -> Exception:
    return ApiError(409, "JobExists", f"The specified job '{name}' already exists.", Name=name)
