"""A workitem with a schedule -> an Azure job schedule (2025-06-01 property names; pure).

`executionInfo.nextRunTime` is the workitem's next unused occurrence, `recentJob` its latest job
(`S:job-N`), `stats` (with `$expand=stats`) are summed over the tasks of its jobs still kept.
"""

from __future__ import annotations

from typing import Any

from coordinator.common import models as m
from coordinator.common.timeutil import UNLIMITED, format_duration, parse_duration, parse_time
from coordinator.core import CoordinatorState
from coordinator.core.records import COMPLETED, WorkitemRec

from .ids import job_id
from .jobprep_io import prep_view, release_view
from .views import _clean, _env, _finish, _jm, _t


def schedule_modified(wi: WorkitemRec) -> float:
    changed = (wi.spec.azure or {}).get("lastModified")
    return max(wi.created, wi.state_time, float(changed or 0.0))


def _time(text: str | None, field: str) -> str | None:
    return _t(parse_time(text, field)) if text else None


def _schedule(s: m.Schedule | None) -> dict[str, Any]:
    if s is None:
        return {}
    return _clean(
        {
            "doNotRunUntil": _time(s.do_not_run_until, "schedule.doNotRunUntil"),
            "doNotRunAfter": _time(s.do_not_run_after, "schedule.doNotRunAfter"),
            "startWindow": s.start_window,
            "recurrenceInterval": s.recurrence_interval,
        }
    )


def job_specification(spec: m.WorkitemAdd) -> dict[str, Any]:
    az = spec.azure or {}
    jc = spec.job_constraints
    wall = UNLIMITED
    if jc is not None and jc.max_wall_clock_time:
        wall = format_duration(parse_duration(jc.max_wall_clock_time, "maxWallClockTime"))
    env = spec.job_execution_environment
    pool_info: dict[str, Any] = (
        {"autoPoolSpecification": az.get("autoPoolSpecification") or {}}
        if env.auto_pool_specification is not None
        else {"poolId": env.pool_name}
    )
    return _clean(
        {
            "priority": spec.priority,
            "maxParallelTasks": spec.max_parallel_tasks,
            "allowTaskPreemption": False,
            "displayName": az.get("jobDisplayName"),
            "usesTaskDependencies": spec.uses_task_dependencies,
            "onAllTasksComplete": spec.on_all_tasks_complete,
            "onTaskFailure": spec.on_task_failure,
            "constraints": {
                "maxWallClockTime": wall,
                "maxTaskRetryCount": (jc.max_task_retry_count or 0) if jc else 0,
            },
            "jobManagerTask": _jm(spec.job_manager) if spec.job_manager else None,
            "jobPreparationTask": prep_view(spec.job_preparation_task),
            "jobReleaseTask": release_view(spec.job_release_task),
            "commonEnvironmentSettings": _env(spec.common_environment_settings),
            "poolInfo": pool_info,
            "metadata": az.get("jobMetadata", []),
        }
    )


def schedule_stats(
    core: CoordinatorState, base: str, wi: WorkitemRec, now: float
) -> dict[str, Any]:
    """Task totals over the schedule's jobs. CPU and I/O are not measured per task here: zero."""
    succeeded = failed = retries = 0
    wall = wait = 0.0
    for job in core.workitem_jobs(wi.spec.name):
        for t in job.tasks.values():
            retries += t.retry_count
            if t.state == COMPLETED:
                if t.exit_code == 0 and t.failure is None:
                    succeeded += 1
                else:
                    failed += 1
            if t.start_time is not None:
                wait += max(0.0, t.start_time - t.created)
                if t.end_time is not None:
                    wall += max(0.0, t.end_time - t.start_time)
    return {
        "url": f"{base}/jobschedules/{wi.spec.name}/stats",
        "startTime": _t(wi.created),
        "lastUpdateTime": _t(now),
        "userCPUTime": "PT0S",
        "kernelCPUTime": "PT0S",
        "wallClockTime": format_duration(wall),
        "readIOps": "0",
        "writeIOps": "0",
        "readIOGiB": 0.0,
        "writeIOGiB": 0.0,
        "numSucceededTasks": str(succeeded),
        "numFailedTasks": str(failed),
        "numTaskRetries": str(retries),
        "waitTime": format_duration(wait),
    }


def schedule_view(
    core: CoordinatorState, base: str, wi: WorkitemRec, *, stats_at: float | None = None
) -> dict[str, Any]:
    spec = wi.spec
    az = spec.azure or {}
    recent = None
    if wi.recent_job is not None:
        jid = job_id(core, spec.name, wi.recent_job)
        recent = {"id": jid, "url": f"{base}/jobs/{jid}"}
    view: dict[str, Any] = {
        "id": spec.name,
        "displayName": az.get("displayName"),
        "url": f"{base}/jobschedules/{spec.name}",
        "creationTime": _t(wi.created),
        "state": wi.state,
        "stateTransitionTime": _t(wi.state_time),
        "schedule": _schedule(spec.schedule),
        "jobSpecification": job_specification(spec),
        "executionInfo": _clean(
            {
                "nextRunTime": _t(wi.next_run),
                "recentJob": recent,
                "endTime": _t(wi.end_time),
            }
        ),
        "metadata": [{"name": x.name, "value": x.value} for x in spec.metadata],
    }
    if stats_at is not None:
        view["stats"] = schedule_stats(core, base, wi, stats_at)
    return _finish(view, schedule_modified(wi))
