"""REST routes for the account, workitems and jobs."""

from __future__ import annotations

from typing import Any

from coordinator.common import models as m

from . import paging
from .dispatch import Response, RouteAdder, RouteGroup, _decode, _json_response
from .views import job_view, workitem_view

MAX_FILE_CHUNK = 4 * 1024 * 1024


class JobRoutes(RouteGroup):
    def register(self, r: RouteAdder) -> None:
        r("GET", r"/workitems", self.list_workitems)
        r("POST", r"/workitems", self.add_workitem)
        r("GET", r"/workitems/(?P<wi>[^/]+)", self.get_workitem)
        r("DELETE", r"/workitems/(?P<wi>[^/]+)", self.delete_workitem)
        r("PATCH", r"/workitems/(?P<wi>[^/]+)", self.update_workitem)
        r(
            "POST",
            r"/workitems/(?P<wi>[^/]+)/(?P<verb>terminate|disable|enable)",
            self.workitem_action,
        )
        r("GET", r"/workitems/(?P<wi>[^/]+)/jobs", self.list_jobs)
        r("GET", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)", self.get_job)
        r("PATCH", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)", self.update_job)
        r("DELETE", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)", self.delete_job)
        r("POST", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/terminate", self.terminate_job)
        r("POST", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/disable", self.disable_job)
        r("POST", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/enable", self.enable_job)
        r("GET", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/taskcounts", self.task_counts)
        r("GET", r"/account", self.get_account)

    # ------------------------------------------------------------------ account

    async def get_account(self, **_: Any) -> Response:
        return _json_response(200, {"name": self.svc.account, "endpoint": self.svc.endpoint})

    # ------------------------------------------------------------------ workitems and jobs

    async def list_workitems(self, query: dict[str, str], **_: Any) -> Response:
        return _json_response(
            200,
            paging.listing(
                list(self.core.workitems.values()), query, lambda w: w.spec.name, workitem_view
            ),
        )

    async def add_workitem(self, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.WorkitemAdd)
        await self.svc.execute(self.core.add_workitem, req)
        return _json_response(201, workitem_view(self.core.workitems[req.name]))

    async def get_workitem(self, wi: str, **_: Any) -> Response:
        return _json_response(200, workitem_view(self.core.get_workitem(wi)))

    async def delete_workitem(self, wi: str, **_: Any) -> Response:
        await self.svc.execute(self.core.delete_workitem, wi)
        return Response(202)

    async def list_jobs(self, wi: str, query: dict[str, str], **_: Any) -> Response:
        return _json_response(
            200,
            paging.listing(
                list(self.core.workitem_jobs(wi)),
                query,
                lambda j: j.rec.name,
                lambda j: job_view(self.core, j),
            ),
        )

    async def get_job(self, wi: str, job: str, **_: Any) -> Response:
        return _json_response(200, job_view(self.core, self.core.get_job(wi, job)))

    async def task_counts(self, wi: str, job: str, **_: Any) -> Response:
        return _json_response(
            200, {"taskCounts": self.core.task_counts(self.core.get_job(wi, job))}
        )

    # ------------------------------------------------------------------ operations (issue 6)

    async def update_workitem(self, wi: str, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.WorkitemUpdate)
        await self.svc.execute(self.core.update_workitem, wi, req)
        return _json_response(200, workitem_view(self.core.get_workitem(wi)))

    async def workitem_action(self, wi: str, verb: str, **_: Any) -> Response:
        fn = {
            "terminate": self.core.terminate_workitem,
            "disable": self.core.disable_workitem,
            "enable": self.core.enable_workitem,
        }[verb]
        await self.svc.execute(fn, wi)
        return Response(202 if verb == "terminate" else 204)

    async def update_job(self, wi: str, job: str, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.JobUpdate)
        await self.svc.execute(self.core.update_job, wi, job, req)
        return _json_response(200, job_view(self.core, self.core.get_job(wi, job)))

    async def delete_job(self, wi: str, job: str, **_: Any) -> Response:
        await self.svc.execute(self.core.delete_job, wi, job)
        return Response(202)

    async def terminate_job(self, wi: str, job: str, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.JobTerminate) if body else m.JobTerminate()
        await self.svc.execute(self.core.terminate_job, wi, job, req.terminate_reason)
        return Response(202)

    async def disable_job(self, wi: str, job: str, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.JobDisable) if body else m.JobDisable()
        await self.svc.execute(self.core.disable_job, wi, job, req.disable_tasks)
        return Response(202)

    async def enable_job(self, wi: str, job: str, **_: Any) -> Response:
        await self.svc.execute(self.core.enable_job, wi, job)
        return Response(202)
