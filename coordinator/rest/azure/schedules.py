"""Azure routes for job schedules: a job schedule is a workitem with a schedule.

Its jobs are the workitem's jobs (`S:job-N`), served by the job routes too. Job schedules and jobs
share one namespace here (both are workitems): an id taken by a job is refused for a schedule with
409 `JobScheduleExists`, naming the job. The core's workitem errors are answered with the job
schedule codes Azure uses (`JobScheduleNotFound`, `JobScheduleCompleted`, ...).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from coordinator.common.errors import ApiError
from coordinator.core.records import WorkitemRec
from coordinator.rest.dispatch import Dispatcher, Response

from . import schedule_inputs
from .body import parse_json
from .conv import (
    check_conditions,
    created,
    empty,
    http_date,
    json_response,
    metadata_url,
    query_get,
)
from .ids import job_id
from .odata import parse_expand
from .router import AzureApi, base, listing, select_one
from .schedule_views import schedule_modified, schedule_view
from .views import job_view

S = r"/jobschedules/(?P<schedule>[^/]+)"
_CODES = {
    "WorkItemNotFound": "JobScheduleNotFound",
    "WorkItemExists": "JobScheduleExists",
    "WorkItemCompleted": "JobScheduleCompleted",
    "WorkItemBeingTerminated": "JobScheduleBeingTerminated",
    "WorkItemNotActive": "JobScheduleNotActive",
}


def _not_found(name: str) -> ApiError:
    return ApiError(
        404,
        "JobScheduleNotFound",
        f"The specified job schedule '{name}' does not exist.",
        Name=name,
    )


def _stats_wanted(query: dict[str, str]) -> bool:
    text = query_get(query, "$expand")
    return bool(text) and "stats" in parse_expand(text or "")


class ScheduleApi:
    def __init__(self, app: Dispatcher) -> None:
        self.svc = app.svc
        self.core = app.core

    def register(self, r: AzureApi) -> None:
        r.route("GET", "/jobschedules", self.list_schedules)
        r.route("POST", "/jobschedules", self.add_schedule)
        r.route("GET", S, self.get_schedule)
        r.route("HEAD", S, self.schedule_exists)
        r.route("PATCH", S, self.patch_schedule)
        r.route("PUT", S, self.put_schedule)
        r.route("DELETE", S, self.delete_schedule)
        r.route("POST", S + "/terminate", self.terminate_schedule)
        r.route("POST", S + "/disable", self.disable_schedule)
        r.route("POST", S + "/enable", self.enable_schedule)
        r.route("GET", S + "/jobs", self.list_jobs)

    # ------------------------------------------------------------------ helpers

    def _view(self, wi: WorkitemRec, stats: bool = False) -> dict[str, Any]:
        return schedule_view(self.core, base(), wi, stats_at=time.time() if stats else None)

    def _find(self, name: str) -> WorkitemRec:
        wi = self.core.workitems.get(name)
        if wi is None or wi.spec.schedule is None:
            raise _not_found(name)
        return wi

    def _schedule(self, name: str, headers: dict[str, str], *, read: bool) -> WorkitemRec:
        wi = self._find(name)
        check_conditions(headers, self._view(wi)["eTag"], schedule_modified(wi), read=read)
        return wi

    async def _run(self, fn: Callable[..., Any], *args: Any) -> None:
        await _translated(self.svc.execute(fn, *args))

    def _validators(self, wi: WorkitemRec) -> list[tuple[bytes, bytes]]:
        """`ETag` and `Last-Modified` of the job schedule as it is now."""
        etag = self._view(wi)["eTag"]
        return [(b"etag", etag.encode()), *_last_modified(schedule_modified(wi))]

    def _id_header(self, name: str) -> list[tuple[bytes, bytes]]:
        return [(b"dataserviceid", f"{base()}/jobschedules/{name}".encode())]

    # ------------------------------------------------------------------ routes

    async def list_schedules(
        self, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        stats = _stats_wanted(query)
        return listing(
            [w for w in self.core.workitems.values() if w.spec.schedule is not None],
            query,
            headers,
            kind="jobschedules",
            entity="jobschedules",
            key=lambda w: w.spec.name,
            view=lambda w: self._view(w, stats),
        )

    async def add_schedule(self, body: bytes, headers: dict[str, str], **_: Any) -> Response:
        b = parse_json(body)
        req = schedule_inputs.schedule_add(b, self.core.vm_sizes())
        b.log_unknown("job schedule add")
        taken = next((w for w in self.core.workitems if w.lower() == req.name.lower()), None)
        if taken is not None:
            what = "job schedule" if self.core.workitems[taken].spec.schedule else "job"
            raise ApiError(
                409,
                "JobScheduleExists",
                f"The specified job schedule '{req.name}' already exists"
                + ("." if what == "job schedule" else f" (a {what} has that id)."),
                Name=req.name,
            )
        await self._run(self.core.add_workitem, req)
        wi = self._find(req.name)
        view = self._view(wi)
        return created(headers, view["url"], view["eTag"], schedule_modified(wi))

    async def get_schedule(
        self, schedule: str, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        wi = self._schedule(schedule, headers, read=True)
        view = self._view(wi, _stats_wanted(query))
        out = {
            "odata.metadata": metadata_url(base(), "jobschedules/@Element"),
            **select_one(view, query),
        }
        return json_response(200, out, headers, extra=self._validators(wi))

    async def schedule_exists(self, schedule: str, headers: dict[str, str], **_: Any) -> Response:
        wi = self._schedule(schedule, headers, read=True)
        return empty(200, headers, self._validators(wi))

    async def _change(
        self, schedule: str, body: bytes, headers: dict[str, str], *, replace: bool
    ) -> Response:
        wi = self._schedule(schedule, headers, read=False)
        b = parse_json(body)
        new = schedule_inputs.schedule_change(b, wi.spec, self.core.vm_sizes(), replace=replace)
        b.log_unknown("job schedule " + ("replace" if replace else "update"))
        # When it changed (Last-Modified): the workitem record has no field of its own for it.
        new = msgspec.structs.replace(new, azure={**(new.azure or {}), "lastModified": time.time()})
        await self._run(self.core.replace_workitem, wi.spec.name, new)
        changed = self._find(schedule)
        return empty(200, headers, self._id_header(schedule) + self._validators(changed))

    async def patch_schedule(
        self, schedule: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        return await self._change(schedule, body, headers, replace=False)

    async def put_schedule(
        self, schedule: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        return await self._change(schedule, body, headers, replace=True)

    async def delete_schedule(self, schedule: str, headers: dict[str, str], **_: Any) -> Response:
        wi = self._schedule(schedule, headers, read=False)
        await self._run(self.core.delete_workitem, wi.spec.name)
        return empty(202, headers)

    async def terminate_schedule(
        self, schedule: str, headers: dict[str, str], **_: Any
    ) -> Response:
        wi = self._schedule(schedule, headers, read=False)
        await self._run(self.core.terminate_workitem, wi.spec.name)
        return empty(202, headers, self._id_header(wi.spec.name))

    async def disable_schedule(self, schedule: str, headers: dict[str, str], **_: Any) -> Response:
        wi = self._schedule(schedule, headers, read=False)
        await self._run(self.core.disable_workitem, wi.spec.name)
        return empty(204, headers, self._id_header(wi.spec.name))

    async def enable_schedule(self, schedule: str, headers: dict[str, str], **_: Any) -> Response:
        wi = self._schedule(schedule, headers, read=False)
        await self._run(self.core.enable_workitem, wi.spec.name)
        return empty(204, headers, self._id_header(wi.spec.name))

    async def list_jobs(
        self, schedule: str, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        wi = self._find(schedule)
        return listing(
            self.core.workitem_jobs(wi.spec.name),
            query,
            headers,
            kind="jobs",
            entity="jobs",
            key=lambda j: job_id(self.core, j.rec.workitem, j.rec.name),
            view=lambda j: job_view(self.core, base(), j),
        )


def _last_modified(ts: float) -> list[tuple[bytes, bytes]]:
    return [(b"last-modified", http_date(ts).encode())]


async def _translated(call: Awaitable[Any]) -> Any:
    """Run a core command; its workitem error codes become the job schedule ones."""
    try:
        return await call
    except ApiError as exc:
        code = _CODES.get(exc.code)
        if code is None:
            raise
        raise ApiError(exc.status, code, exc.message.replace("workitem", "job schedule")) from None
