"""REST routes for tasks."""

from __future__ import annotations

import re
from typing import Any

from coordinator.common import models as m
from coordinator.common.errors import ApiError, bad_request
from coordinator.common.timeutil import parse_duration
from coordinator.core import MAX_COLLECTION
from coordinator.core.records import ACTIVE, COMPLETED, RUNNING

from . import paging
from .dispatch import CLIENT_GONE, Response, RouteAdder, RouteGroup, _decode, _json_response
from .inputlimits import check_request
from .jobscope import check_elevation
from .views import task_view

MAX_WAIT_S = 60.0  # a waiting GET holds a connection: bounded like any long poll

MAX_FILE_CHUNK = 4 * 1024 * 1024


class TaskRoutes(RouteGroup):
    def register(self, r: RouteAdder) -> None:
        r(
            "POST",
            r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)/terminate",
            self.terminate_task,
        )
        r("GET", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks", self.list_tasks)
        r("POST", r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks", self.add_task)
        r(
            "POST",
            r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/addtaskcollection",
            self.add_task_collection,
        )
        r(
            "GET",
            r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)",
            self.get_task,
        )
        r(
            "PATCH",
            r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)",
            self.update_task,
        )
        r(
            "DELETE",
            r"/workitems/(?P<wi>[^/]+)/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)",
            self.delete_task,
        )

    # ------------------------------------------------------------------ tasks

    async def list_tasks(self, wi: str, job: str, query: dict[str, str], **_: Any) -> Response:
        j = self.core.get_job(wi, job)
        state = query.get("state")
        flt = query.get("$filter", "")
        if not state and flt:
            mt = re.fullmatch(r"\s*state\s+eq\s+'(\w+)'\s*", flt)
            if not mt:
                raise bad_request(
                    "InvalidFilter", f"unsupported $filter {flt!r}; use state eq 'active'"
                )
            state = mt.group(1)
        if state and state not in (ACTIVE, RUNNING, COMPLETED):
            raise bad_request(
                "InvalidPropertyValue", "state must be active, running or completed", field="state"
            )
        tasks = (
            list(j.tasks.values())
            if not state
            else [t for t in j.tasks.values() if t.state == state]
        )
        return _json_response(
            200, paging.listing(tasks, query, lambda t: t.name, lambda t: task_view(j, t))
        )

    async def add_task(
        self, wi: str, job: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        req = _decode(body, m.TaskAdd)
        self._check_elevation(wi, job, req, headers)
        await self.svc.execute(self.core.add_task, wi, job, req)
        return Response(201)

    def _check_elevation(self, wi: str, job: str, req: m.TaskAdd, headers: dict[str, str]) -> None:
        if not req.run_elevated:
            return
        j = self.core.jobs.get(f"{wi}/{job}")
        if j is not None:  # else the add answers that the job does not exist
            check_elevation(j, req, headers)

    async def add_task_collection(
        self, wi: str, job: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        req = _decode(body, m.TaskAddCollection, check=False)
        # A task over the input limits fails alone (clienterror at its index), like a bad name does.
        refused: dict[int, m.TaskAddResult] = {}
        if len(req.value) <= MAX_COLLECTION:  # over the cap the whole request is refused below
            for i, t in enumerate(req.value):
                try:
                    check_request(t)
                    self._check_elevation(wi, job, t, headers)
                except ApiError as exc:
                    refused[i] = m.TaskAddResult(
                        name=t.name,
                        status="clienterror",
                        error={
                            "code": exc.code,
                            "message": {"lang": "en-us", "value": exc.message},
                            "values": [{"key": k, "value": v} for k, v in exc.values.items()],
                        },
                    )
        added = iter(
            await self.svc.execute(
                self.core.add_tasks,
                wi,
                job,
                [t for i, t in enumerate(req.value) if i not in refused],
            )
        )
        results = [refused[i] if i in refused else next(added) for i in range(len(req.value))]
        return _json_response(200, m.TaskAddCollectionResult(value=results))

    async def get_task(
        self, wi: str, job: str, task: str, query: dict[str, str] | None = None, **_: Any
    ) -> Response:
        """`?waitForCompletion=PT30S` (at most PT60S): answer when the task completes or the time
        is up, whichever is first, instead of the client polling."""
        j, t = self.core.get_task(wi, job, task)
        wait = (query or {}).get("waitForCompletion")
        if wait is not None:
            seconds = parse_duration(wait, "waitForCompletion")
            if seconds > MAX_WAIT_S:
                raise bad_request(
                    "InvalidQueryParameterValue",
                    f"waitForCompletion is at most PT{MAX_WAIT_S:g}S, not {wait!r}",
                    field="waitForCompletion",
                )
            if t.state != COMPLETED:
                await self._wait_done(f"{wi}/{job}/{task}", seconds)
                j, t = self.core.get_task(wi, job, task)
        subs = self.core.runs.gangs.last.get(f"{j.key}/{t.name}") if t.multi else None
        return _json_response(200, task_view(j, t, subs))

    async def _wait_done(self, key: str, seconds: float) -> None:
        """Until the task completes, `seconds` pass or the client hangs up (a waiting GET holds a
        slot of the coordinator's requests in progress: one nobody waits for gives it back)."""
        await self.svc.done_waiters.wait(key, seconds, CLIENT_GONE.get(None))

    async def update_task(self, wi: str, job: str, task: str, body: bytes, **_: Any) -> Response:
        req = _decode(body, m.TaskUpdate)
        await self.svc.execute(self.core.update_task, wi, job, task, req)
        return Response(200)

    async def delete_task(self, wi: str, job: str, task: str, **_: Any) -> Response:
        await self.svc.execute(self.core.delete_task, wi, job, task)
        return Response(200)

    async def terminate_task(self, wi: str, job: str, task: str, **_: Any) -> Response:
        await self.svc.execute(self.core.terminate_task, wi, job, task)
        return Response(204)
