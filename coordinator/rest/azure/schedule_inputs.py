"""Azure job schedule bodies -> the seed's workitem with a schedule (pure, read leniently).

`schedule` is the workitem's schedule; `jobSpecification` is its job settings: priority,
constraints, job manager, common environment, `onAllTasksComplete`, and `poolInfo` — a pool id, or
an `autoPoolSpecification` whose lifetime `jobschedule` is the seed's `workitem` (and `job` is
`job`), `autoPoolIdPrefix` its `autoPoolNamePrefix`. What the workitem has no field for (the
schedule's display name, the jobs' display name and metadata, the auto pool exactly as sent) is
kept in the spec's `azure` dict and echoed back.

Durations come in every ISO 8601 form clients send (`PT05M00S` from the 15.x SDK, `P1D`,
`PT1H30M`, `P2W`, .NET's years of 365 and months of 30 days) and are stored in one normal form.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from coordinator.common import models as m
from coordinator.common.timeutil import UNLIMITED, format_duration

from . import inputs, jobprep_io
from .body import Body
from .conv import invalid

_ISO = re.compile(
    r"P(?!\Z)(?:(?P<y>\d+(?:\.\d+)?)Y)?(?:(?P<mo>\d+(?:\.\d+)?)M)?(?:(?P<w>\d+(?:\.\d+)?)W)?"
    r"(?:(?P<d>\d+(?:\.\d+)?)D)?(?:T(?=\d)(?:(?P<h>\d+(?:\.\d+)?)H)?(?:(?P<mi>\d+(?:\.\d+)?)M)?"
    r"(?:(?P<s>\d+(?:\.\d+)?)S)?)?\Z"
)
_UNIT_S = {"y": 365 * 86400, "mo": 30 * 86400, "w": 7 * 86400, "d": 86400, "h": 3600, "mi": 60}


def duration(b: Body, key: str) -> str | None:
    """An ISO 8601 duration property in its normal form (`PT5M`), or None when absent."""
    text = b.text(key)
    if text is None:
        return None
    t = text.strip().upper()
    if t == UNLIMITED:
        return UNLIMITED
    match = _ISO.fullmatch(t)
    if match is None:
        raise invalid(
            b._p(key), text, f"{b._p(key)} is not an ISO 8601 duration (like PT1H30M): {text!r}"
        )
    seconds = sum(float(v) * _UNIT_S.get(k, 1) for k, v in match.groupdict().items() if v)
    return format_duration(seconds)


def schedule(b: Body | None, *, required: bool) -> m.Schedule | None:
    if b is None:
        if required:
            raise invalid("schedule", None, "schedule is required (it may be empty: {})")
        return None
    return m.Schedule(
        do_not_run_until=b.text("doNotRunUntil"),
        do_not_run_after=b.text("doNotRunAfter"),
        start_window=duration(b, "startWindow"),
        recurrence_interval=duration(b, "recurrenceInterval"),
    )


def job_specification(
    js: Body,
    *,
    name: str,
    sched: m.Schedule,
    metadata: list[m.MetadataItem],
    display_name: str | None,
    catalogue: dict[str, tuple[int, int, int, str]],
) -> m.WorkitemAdd:
    """A job schedule (id, schedule, jobSpecification, metadata) as the seed's workitem."""
    js.refuse(("networkConfiguration",), inputs.WHY_LOCAL)
    uses_deps = js.flag("usesTaskDependencies", False)
    on_failure = inputs.task_failure(js)
    js.accept("allowTaskPreemption")
    info = js.obj("poolInfo")
    if info is None:
        raise invalid(js._p("poolInfo"), None, f"{js._p('poolInfo')} is required")
    azure: dict[str, Any] = {
        "displayName": display_name,
        "jobDisplayName": js.text("displayName"),
        "jobMetadata": [
            {"name": x.name, "value": x.value} for x in inputs.metadata(js.objs("metadata"))
        ],
    }
    env, echo = inputs.pool_info(info, catalogue)
    if echo is not None:
        azure["autoPoolSpecification"] = echo
    return m.WorkitemAdd(
        name=name,
        max_parallel_tasks=inputs.max_parallel(js, -1) or -1,
        job_execution_environment=env,
        priority=js.integer("priority", 0) or 0,
        job_constraints=inputs.job_constraints(js.obj("constraints")),
        job_manager=inputs.job_manager(js.obj("jobManagerTask")),
        schedule=sched,
        common_environment_settings=inputs.env_settings(js.objs("commonEnvironmentSettings")),
        metadata=metadata,
        on_all_tasks_complete=inputs.on_all_complete(js) or "noaction",
        azure={k: v for k, v in azure.items() if v is not None},
        job_preparation_task=jobprep_io.prep_task(js.obj("jobPreparationTask")),
        job_release_task=jobprep_io.release_task(js.obj("jobReleaseTask")),
        uses_task_dependencies=uses_deps,
        on_task_failure=on_failure,
    )


def schedule_add(b: Body, catalogue: dict[str, tuple[int, int, int, str]]) -> m.WorkitemAdd:
    name = b.req_text("id")
    sched = schedule(b.obj("schedule"), required=True)
    assert sched is not None
    js = b.obj("jobSpecification")
    if js is None:
        raise invalid("jobSpecification", None, "jobSpecification is required")
    return job_specification(
        js,
        name=name,
        sched=sched,
        metadata=inputs.metadata(b.objs("metadata")),
        display_name=b.text("displayName"),
        catalogue=catalogue,
    )


def schedule_change(
    b: Body,
    old: m.WorkitemAdd,
    catalogue: dict[str, tuple[int, int, int, str]],
    *,
    replace: bool,
) -> m.WorkitemAdd:
    """PATCH (`replace=False`: what is present changes) or PUT (schedule and jobSpecification
    required, absent metadata removed) of a job schedule: the workitem's new specification."""
    az = dict(old.azure or {})
    sched = schedule(b.obj("schedule"), required=replace) or old.schedule or m.Schedule()
    if b.has("metadata") or replace:
        meta = inputs.metadata(b.objs("metadata"))
    else:
        meta = list(old.metadata)
    js = b.obj("jobSpecification")
    if js is None:
        if replace:
            raise invalid("jobSpecification", None, "jobSpecification is required")
        return msgspec.structs.replace(old, schedule=sched, metadata=meta)
    new = job_specification(
        js,
        name=old.name,
        sched=sched,
        metadata=meta,
        display_name=az.get("displayName"),
        catalogue=catalogue,
    )
    return new
