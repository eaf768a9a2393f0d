"""Azure route for `GET /jobs/{job}/jobpreparationandreleasetaskstatus`: one entry per node that
ran the job's preparation task (nodes that left the pool included, as Azure lists them)."""

from __future__ import annotations

from typing import Any

from coordinator.core.records import JobPrepRec
from coordinator.rest.dispatch import Dispatcher, Response

from .ids import resolve_job
from .jobprep_io import status_view
from .router import AzureApi, base, listing


class JobPrepApi:
    def __init__(self, app: Dispatcher) -> None:
        self.core = app.core

    def register(self, r: AzureApi) -> None:
        r.route("GET", r"/jobs/(?P<job>[^/]+)/jobpreparationandreleasetaskstatus", self.status)

    async def status(
        self, job: str, query: dict[str, str], headers: dict[str, str], **_: Any
    ) -> Response:
        rec = resolve_job(self.core, job)
        recs = self.core.job_prep_status(rec.rec.workitem, rec.rec.name)
        root = base()

        def view(p: JobPrepRec) -> dict[str, Any]:
            return status_view(root, p)

        return listing(
            recs,
            query,
            headers,
            kind="prepreleasestatus",
            entity="jobpreparationandreleasetaskstatus",
            key=lambda p: p.tvm,
            view=view,
            view_key="nodeId",
        )
