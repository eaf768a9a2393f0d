"""What the dashboard shows, read from the core through its read views (no change to the core).

Every function here is a read of in-memory records rendered to plain JSON-able values. The costly
ones (task counts walk every task) are called through `feed.Feed`, which computes each view at
most once per interval however many browsers watch it.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from coordinator.common.errors import ApiError, bad_request
from coordinator.common.timeutil import rfc3339
from coordinator.core import CoordinatorState
from coordinator.core.records import COMPLETED, RUNNING, Job, TaskRec
from coordinator.rest.views import pool_view, task_view, tvm_view

HISTORY = 600  # samples kept for the throughput plots (10 minutes at one a second)
MAX_PAGE_SIZE = 500
_TARGET = re.compile(r"\$TargetDedicated(?:Nodes)?\s*=\s*(-?[0-9.]+)")


def _plain(obj: Any) -> Any:
    return msgspec.to_builtins(obj)


def _failed(t: TaskRec) -> bool:
    return t.state == COMPLETED and (t.exit_code != 0 or t.failure is not None)


Counts = Callable[[Job], dict[str, int]]


def counts(job: Job) -> dict[str, int]:
    # The one O(tasks) walk of the live views: kept to a few comparisons per task.
    active = running = completed = failed = 0
    for t in job.tasks.values():
        s = t.state
        if s == COMPLETED:
            completed += 1
            if t.exit_code != 0 or t.failure is not None:
                failed += 1
        elif s == RUNNING:
            running += 1
        else:
            active += 1
    return {
        "active": active,
        "running": running,
        "completed": completed,
        "succeeded": completed - failed,
        "failed": failed,
    }


@dataclass
class Throughput:
    """(time, placements so far, completions so far) samples, taken when a view is computed."""

    samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=HISTORY))

    min_gap: float = 0.5  # the feed sets it to half its interval: two views, one sample

    def sample(self, core: CoordinatorState, now: float) -> None:
        """The core's own samples (about one a second, from before any dashboard was open), then
        one for now."""
        last = self.samples[-1][0] if self.samples else 0.0
        for at, placed, done in core.rate_samples:
            if at > last:
                self.samples.append((at, placed, done))
                last = at
        if now - last >= self.min_gap:
            self.samples.append((now, core.placements, core.completions))

    def series(self) -> list[dict[str, float]]:
        """Per-second rates between consecutive samples (a deleted job can lower the completed
        total: that shows as zero, not as a negative rate)."""
        out = []
        prev = None
        for t, p, c in self.samples:
            if prev is not None and t > prev[0]:
                dt = t - prev[0]
                out.append(
                    {
                        "t": round(t, 3),
                        "placed": round(max(0, p - prev[1]) / dt, 2),
                        "completed": round(max(0, c - prev[2]) / dt, 2),
                    }
                )
            prev = (t, p, c)
        return out


@dataclass
class PoolHistory:
    """Autoscale runs and target/current sizes seen while someone watched the pool."""

    runs: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200))
    sizes: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=HISTORY))


def job_list(core: CoordinatorState, count: Counts = counts) -> list[dict[str, Any]]:
    jobs = []
    for job in core.jobs.values():
        r = job.rec
        jobs.append(
            {
                "workitem": r.workitem,
                "name": r.name,
                "state": r.state,
                "pool": r.pool,
                "counts": count(job),
            }
        )
    jobs.sort(key=lambda j: (j["state"] != "active", j["workitem"], j["name"]))
    return jobs


def overview(
    core: CoordinatorState, tp: Throughput, now: float, count: Counts = counts
) -> dict[str, Any]:
    jobs = job_list(core, count)
    totals = {k: sum(j["counts"][k] for j in jobs) for k in ("active", "running", "completed")}
    totals["failed"] = sum(j["counts"]["failed"] for j in jobs)
    tp.sample(core, now)
    pools = []
    by_pool: dict[str, list[list[Any]]] = {name: [] for name in core.pools}
    for tvm in sorted(core.tvms.values(), key=lambda t: t.rec.name):
        by_pool.setdefault(tvm.rec.pool, []).append([tvm.rec.name, tvm.rec.state, len(tvm.running)])
    for name, p in sorted(core.pools.items()):
        tvms = by_pool.get(name, [])
        states: dict[str, int] = {}
        for _, st, _ in tvms:
            states[st] = states.get(st, 0) + 1
        pools.append(
            {
                "name": name,
                "state": p.state,
                "allocationState": p.alloc_state,
                "target": p.target,
                "current": len(tvms),
                "states": states,
                "tvms": tvms,
            }
        )
    return {
        "account": core.account,
        "pools": pools,
        "jobs": jobs[:200],
        "jobCount": len(jobs),
        "totals": totals,
        "placements": core.placements,
        "throughput": tp.series()[-300:],
    }


def throughput(
    core: CoordinatorState, tp: Throughput, now: float, count: Counts = counts
) -> dict[str, Any]:
    tp.sample(core, now)
    return {"placements": core.placements, "completed": core.completions, "series": tp.series()}


def pool(core: CoordinatorState, name: str, hist: PoolHistory, now: float) -> dict[str, Any]:
    p = core.get_pool(name)
    view = pool_view(core, p)
    # The core keeps each pool's recent formula runs (newest last): the plot starts before the
    # dashboard was opened.
    seen = {r["at"] for r in hist.runs}
    for at, results, _code, message in core.autoscale.history.get(name, ()):
        if at in seen:
            continue
        target = _TARGET.search(results or "")
        hist.runs.append(
            {
                "at": at,
                "timestamp": rfc3339(at),
                "results": results,
                "target": float(target.group(1)) if target else None,
                "error": message,
            }
        )
    hist.sizes.append((now, p.target, view.current_dedicated))
    tvms = []
    for t in core.pool_tvms(name):
        v = tvm_view(core, t)
        st = v.start_task_info
        tvms.append(
            {
                "name": v.name,
                "state": v.state,
                "schedulingState": v.scheduling_state,
                "runningTasks": v.running_tasks_count,
                "totalTasksRun": v.total_tasks_run,
                "recentTasks": _plain(v.recent_tasks),
                "startTask": _plain(st) if st else None,
                "degradedModes": v.degraded_modes,
                "hostname": v.hostname,
                "lastHeartbeat": v.last_heartbeat_time,
            }
        )
    return {
        "pool": _plain(view),
        "tvms": sorted(tvms, key=lambda t: t["name"]),
        "autoscaleRuns": list(hist.runs),
        "sizes": [[round(t, 3), tg, cur] for t, tg, cur in hist.sizes][-300:],
    }


def job(core: CoordinatorState, wi: str, name: str, count: Counts = counts) -> dict[str, Any]:
    j = core.get_job(wi, name)
    r = j.rec
    return {
        "workitem": r.workitem,
        "name": r.name,
        "state": r.state,
        "pool": r.pool,
        "terminateReason": r.terminate_reason,
        "counts": count(j),
    }


_ORDER = {"failed": 0, "running": 1, "active": 2, "succeeded": 3}
FILTERS = ("all", "failed", "running", "active", "succeeded", "completed")


def _kind(t: TaskRec) -> str:
    if t.state == COMPLETED:
        return "failed" if _failed(t) else "succeeded"
    return t.state


def task_page(core: CoordinatorState, wi: str, name: str, query: dict[str, str]) -> dict[str, Any]:
    """One page of a job's tasks, failures first; `state` filters, `q` matches a name part."""
    j = core.get_job(wi, name)
    state = query.get("state", "all") or "all"
    if state not in FILTERS:
        raise bad_request("InvalidPropertyValue", f"state must be one of {', '.join(FILTERS)}")
    try:
        page = int(query.get("page", "0"))
        size = int(query.get("size", "50"))
    except ValueError:
        raise bad_request("InvalidPropertyValue", "page and size must be integers") from None
    if page < 0 or not 1 <= size <= MAX_PAGE_SIZE:
        raise bad_request("InvalidPropertyValue", f"page >= 0 and 1 <= size <= {MAX_PAGE_SIZE}")
    needle = query.get("q", "")
    rows = []
    for t in j.tasks.values():
        kind = _kind(t)
        if state != "all" and kind != state and not (state == "completed" and t.state == state):
            continue
        if needle and needle not in t.name:
            continue
        rows.append((_ORDER[kind], t.name, kind, t))
    rows.sort(key=lambda r: (r[0], r[1]))
    chosen = rows[page * size : (page + 1) * size]
    return {
        "total": len(rows),
        "page": page,
        "size": size,
        "tasks": [
            {
                "name": t.name,
                "state": t.state,
                "kind": kind,
                "exitCode": t.exit_code,
                "tvm": t.tvm,
                "failure": t.failure[1] if t.failure else None,
                "retryCount": t.retry_count,
            }
            for _, _, kind, t in chosen
        ],
    }


def task(core: CoordinatorState, wi: str, job_name: str, name: str) -> dict[str, Any]:
    j, t = core.get_task(wi, job_name, name)
    view = _plain(task_view(j, t))
    view["kind"] = _kind(t)
    view["workitemName"] = wi
    view["jobName"] = job_name
    view["history"] = state_history(t)
    return view


def state_history(t: TaskRec) -> list[dict[str, Any]]:
    """The task's life as far as the core keeps it (times, not a log): added, the last requeue and
    retry (with their counts), started, ended; oldest first."""
    events: list[tuple[float, str]] = [(t.created, "added")]
    if t.last_requeue:
        events.append((t.last_requeue, f"requeued ({t.requeue_count}x)"))
    if t.last_retry:
        events.append((t.last_retry, f"retried ({t.retry_count}x)"))
    if t.start_time and t.state in (RUNNING, COMPLETED):
        events.append((t.start_time, "running"))
    if t.end_time and t.state == COMPLETED:
        events.append((t.end_time, "completed"))
    events.sort(key=lambda e: e[0])
    return [{"time": rfc3339(at), "event": what} for at, what in events]


def resize_target(body: bytes) -> int:
    try:
        data = msgspec.json.decode(body) if body else None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        data = None
    target = data.get("targetDedicated") if isinstance(data, dict) else None
    if not isinstance(target, int) or isinstance(target, bool) or target < 0:
        raise bad_request(
            "InvalidRequestBody", 'the body must be {"targetDedicated": <integer >= 0>}'
        )
    return target


def not_found(what: str) -> ApiError:
    return ApiError(404, "ResourceNotFound", f"no such dashboard resource: {what}")
