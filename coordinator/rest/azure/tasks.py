"""Azure routes for tasks: add, addtaskcollection, list, get, PUT, delete, terminate, subtasks."""

from __future__ import annotations

from typing import Any

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import MAX_COLLECTION
from coordinator.core.records import Job, TaskRec
from coordinator.rest.dispatch import Dispatcher, Response
from coordinator.rest.inputlimits import check_request
from coordinator.rest.jobscope import check_elevation

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
from .ids import resolve_job
from .router import AzureApi, base, listing, select_one
from .views import subtasks_view, task_view

T = r"/jobs/(?P<job>[^/]+)/tasks/(?P<task>[^/]+)"


def _modified(t: TaskRec) -> float:
    return max(t.created, t.state_time)


def _error(exc: ApiError) -> dict[str, Any]:
    return {
        "code": exc.code,
        "message": {"lang": "en-us", "value": exc.message},
        "values": [{"key": k, "value": v} for k, v in exc.values.items()],
    }


class TaskApi:
    def __init__(self, app: Dispatcher) -> None:
        self.svc = app.svc
        self.core = app.core

    def register(self, r: AzureApi) -> None:
        r.route("GET", r"/jobs/(?P<job>[^/]+)/tasks", self.list_tasks)
        r.route("POST", r"/jobs/(?P<job>[^/]+)/tasks", self.add_task)
        r.route("POST", r"/jobs/(?P<job>[^/]+)/addtaskcollection", self.add_collection)
        r.route("GET", T, self.get_task)
        r.route("PUT", T, self.put_task)
        r.route("DELETE", T, self.delete_task)
        r.route("POST", T + "/terminate", self.terminate_task)
        r.route("POST", T + "/reactivate", self.reactivate_task)
        r.route("GET", T + "/subtasksinfo", self.subtasks)

    def _task(
        self, jid: str, name: str, headers: dict[str, str], *, read: bool
    ) -> tuple[Job, TaskRec]:
        job = resolve_job(self.core, jid)
        _, task = self.core.get_task(job.rec.workitem, job.rec.name, name)
        view = task_view(self.core, base(), job, task)
        check_conditions(headers, view["eTag"], _modified(task), read=read)
        return job, task

    async def list_tasks(
        self, job: str, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        j = resolve_job(self.core, job)
        return listing(
            list(j.tasks.values()),
            query,
            headers,
            kind="tasks",
            entity="tasks",
            key=lambda t: t.name,
            view=lambda t: task_view(self.core, base(), j, t),
        )

    async def add_task(self, job: str, body: bytes, headers: dict[str, str], **_: Any) -> Response:
        j = resolve_job(self.core, job)
        b = parse_json(body)
        req = inputs.task_add(b)
        b.log_unknown("task add")
        check_request(req)
        check_elevation(j, req, headers)
        await self.svc.execute(self.core.add_task, j.rec.workitem, j.rec.name, req)
        t = j.tasks[req.name]
        view = task_view(self.core, base(), j, t)
        return created(headers, view["url"], view["eTag"], _modified(t))

    async def add_collection(
        self, job: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        j = resolve_job(self.core, job)
        b = parse_json(body)
        items = b.objs("value")
        if not items:
            raise invalid("value", "", "value must hold at least one task")
        if len(items) > MAX_COLLECTION:
            raise ApiError(
                413,
                "RequestBodyTooLarge",
                f"a collection holds at most {MAX_COLLECTION} tasks, got {len(items)}",
            )
        refused: dict[int, dict[str, Any]] = {}
        reqs: list[tuple[int, m.TaskAdd]] = []
        for i, item in enumerate(items):
            try:
                req = inputs.task_add(item)
                check_request(req)
                check_elevation(j, req, headers)
                reqs.append((i, req))
            except ApiError as exc:
                tid = item.data.get("id")
                refused[i] = {
                    "status": "clienterror",
                    "taskId": tid if isinstance(tid, str) else "",
                    "error": _error(exc),
                }
        b.log_unknown("addtaskcollection")
        added = await self.svc.execute(
            self.core.add_tasks, j.rec.workitem, j.rec.name, [r for _, r in reqs]
        )
        results: list[dict[str, Any]] = [{} for _ in items]
        for i, body_ in refused.items():
            results[i] = body_
        for (i, req), res in zip(reqs, added, strict=True):
            results[i] = self._result(j, req.name, res)
        body_out = {
            "odata.metadata": metadata_url(
                base(), "Microsoft.Azure.Batch.Protocol.Entities.TaskAddResults"
            ),
            "value": results,
        }
        return json_response(200, body_out, headers)

    def _result(self, j: Job, name: str, res: m.TaskAddResult) -> dict[str, Any]:
        if res.status != "success":
            err = dict(res.error or {})
            code = err.get("code", "")
            err.setdefault("values", [])
            return (
                {"status": res.status, "taskId": name, "error": err}
                if code
                else {"status": res.status, "taskId": name}
            )
        t = j.tasks[name]
        view = task_view(self.core, base(), j, t)
        return {
            "status": "success",
            "taskId": name,
            "eTag": view["eTag"],
            "lastModified": view["lastModified"],
            "location": view["url"],
        }

    async def get_task(
        self, job: str, task: str, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        j, t = self._task(job, task, headers, read=True)
        view = task_view(self.core, base(), j, t)
        out = {"odata.metadata": metadata_url(base(), "tasks/@Element"), **select_one(view, query)}
        return json_response(200, out, headers, extra=resource_headers(view["eTag"], _modified(t)))

    async def put_task(
        self, job: str, task: str, body: bytes, headers: dict[str, str], **_: Any
    ) -> Response:
        j, t = self._task(job, task, headers, read=False)
        b: Body = parse_json(body, required=False)
        cons = inputs.constraints(b.obj("constraints"))
        b.log_unknown("task update")
        update = m.TaskUpdate(task_constraints=cons or m.TaskConstraints())
        await self.svc.execute(self.core.update_task, j.rec.workitem, j.rec.name, task, update)
        view = task_view(self.core, base(), j, t)
        return empty(
            200,
            headers,
            [
                (b"dataserviceid", view["url"].encode()),
                *resource_headers(view["eTag"], _modified(t)),
            ],
        )

    async def delete_task(self, job: str, task: str, headers: dict[str, str], **_: Any) -> Response:
        j, _t = self._task(job, task, headers, read=False)
        await self.svc.execute(self.core.delete_task, j.rec.workitem, j.rec.name, task)
        return empty(200, headers)

    async def terminate_task(
        self, job: str, task: str, headers: dict[str, str], **_: Any
    ) -> Response:
        j, _t = self._task(job, task, headers, read=False)
        await self.svc.execute(self.core.terminate_task, j.rec.workitem, j.rec.name, task)
        return empty(
            204, headers, [(b"dataserviceid", f"{base()}/jobs/{job}/tasks/{task}".encode())]
        )

    async def reactivate_task(
        self, job: str, task: str, headers: dict[str, str], **_: Any
    ) -> Response:
        j, _t = self._task(job, task, headers, read=False)
        await self.svc.execute(self.core.reactivate_task, j.rec.workitem, j.rec.name, task)
        url = f"{base()}/jobs/{job}/tasks/{task}".encode()
        return empty(204, headers, [(b"dataserviceid", url)])

    async def subtasks(self, job: str, task: str, headers: dict[str, str], **_: Any) -> Response:
        j, t = self._task(job, task, headers, read=True)
        subs = self.core.runs.gangs.last.get(f"{j.key}/{t.name}") if t.multi else None
        body = {
            "odata.metadata": metadata_url(base(), "subtaskinformations"),
            "value": subtasks_view(base(), j, t, subs or []),
        }
        return json_response(200, body, headers)
