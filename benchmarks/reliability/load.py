"""Load suite: many concurrent clients adding tasks one by one and listing them a page at a time
while the tasks run on real agents. Counted: errors other than the documented throttling (503
ServerBusy / StoreUnavailable with Retry-After, retried after it), tasks completed, and the API
latency (p50, p99) of adds and of list pages.

    python -m benchmarks.reliability.load [--full]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import trio

from benchmarks._common import (
    _tail,
    child_env,
    coordinator,
    local_pool,
    percentile,
    stop_agents,
    wait_until,
)
from coordinator.client import AsyncClient
from coordinator.client._http import _Call

JOB = "job-0000000001"
SMALL = {"clients": 20, "tasks": 400, "agents": 2, "slots": 4}
FULL = {"clients": 100, "tasks": 10_000, "agents": 4, "slots": 4}
THROTTLE_CODES = ("ServerBusy", "StoreUnavailable")


class Stats:
    def __init__(self) -> None:
        self.add_ms: list[float] = []
        self.list_ms: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.throttled = 0
        self.errors: list[str] = []

    def dump(self) -> str:
        return json.dumps(
            {
                "add_ms": self.add_ms,
                "list_ms": self.list_ms,
                "statuses": dict(self.statuses),
                "throttled": self.throttled,
                "errors": self.errors,
            }
        )

    def load(self, d: dict[str, Any]) -> None:
        self.add_ms, self.list_ms = d["add_ms"], d["list_ms"]
        self.statuses = Counter({int(k): v for k, v in d["statuses"].items()})
        self.throttled, self.errors = d["throttled"], d["errors"]


async def clients_only(clients: int, tasks: int) -> Stats:
    """The clients alone (their own process), against TVM_ENDPOINT / TVM_ACCOUNT / TVM_KEY."""
    stats = Stats()
    async with trio.open_nursery() as nursery:
        for i in range(clients):
            count = tasks // clients + (1 if i < tasks % clients else 0)
            nursery.start_soon(_one_client, AsyncClient(timeout=120), stats, i, count)
    return stats


async def _request(
    c: AsyncClient, stats: Stats, call: _Call, into: list[float]
) -> dict[str, Any] | None:
    """One call, retried after Retry-After while throttled; its JSON body, or None on an error."""
    while True:
        method, url, headers, content = c._prepare(call)
        started = time.perf_counter()
        try:
            resp = await c._http.request(method, url, headers=headers, content=content)
        except Exception as exc:  # noqa: BLE001 - a transport failure is an error to count
            stats.errors.append(f"{call.method} {call.path}: {type(exc).__name__}: {exc}")
            return None
        into.append((time.perf_counter() - started) * 1000)
        stats.statuses[resp.status_code] += 1
        code = resp.headers.get("x-tvm-error-code", "")
        if resp.status_code in (429, 503) and code in THROTTLE_CODES:
            retry = resp.headers.get("retry-after")
            if retry is None:
                stats.errors.append(f"{resp.status_code} {code} without Retry-After")
                return None
            stats.throttled += 1
            await trio.sleep(min(float(retry), 2.0))
            continue
        if resp.status_code >= 300:
            stats.errors.append(f"{call.method} {call.path}: {resp.status_code} {resp.text[:200]}")
            return None
        return resp.json() if resp.content else {}


async def _client(c: AsyncClient, stats: Stats, index: int, count: int) -> None:
    base = f"/workitems/wi/jobs/{JOB}/tasks"
    for j in range(count):
        body = {"name": f"c{index}-{j}", "commandLine": "/bin/true"}
        await _request(c, stats, _Call("POST", base, body), stats.add_ms)
        if j % 4 == 3:
            # A listing, paged: the first page of 100 and the one its nextLink names.
            page = await _request(
                c, stats, _Call("GET", base, params={"maxresults": "100"}), stats.list_ms
            )
            link = page.get("odata.nextLink") if page else None
            if isinstance(link, str):
                params = dict(parse_qsl(urlsplit(link).query, keep_blank_values=True))
                await _request(c, stats, _Call("GET", base, params=params), stats.list_ms)


async def load_run(base: str, clients: int, tasks: int, agents: int, slots: int) -> dict:
    stats = Stats()
    async with coordinator(os.path.join(base, "state")) as rc:
        procs = await local_pool(rc, base, agents, slots, "small", pool="load")
        try:
            core = rc.service.core
            started = time.monotonic()
            # The clients run in a process of their own, so their work does not count as the
            # coordinator's latency (the credentials go by environment, not argv).
            env = child_env(
                {"TVM_ENDPOINT": rc.endpoint, "TVM_ACCOUNT": rc.account, "TVM_KEY": rc.key}
            )
            proc = await trio.run_process(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.reliability.load",
                    "--clients-only",
                    str(clients),
                    str(tasks),
                ],
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"the clients failed: {proc.stderr.decode()[-2000:]}")
            stats.load(json.loads(proc.stdout))
            added = time.monotonic() - started
            job = core.get_job("wi", JOB)
            try:
                await wait_until(
                    lambda: core.task_counts(job).completed >= len(job.tasks),
                    max(120.0, tasks / 20),
                    "every task completed",
                    poll=0.1,
                )
            except TimeoutError:
                pass  # reported as tasks_completed < tasks
            counts = core.task_counts(job)
            finished = time.monotonic() - started
        finally:
            stop_agents(procs)
    logs = ""
    failed = [t for t in job.tasks.values() if t.exit_code != 0 or t.failure is not None]
    if failed:
        logs = f"{len(failed)} failed, e.g. exit {failed[0].exit_code}: {failed[0].failure}\n"
    if counts.completed < tasks or failed:  # what the agents said, for whoever reads the figure
        logs += "\n".join(
            _tail(os.path.join(base, "agents", f"agent{i}.log"), 800) for i in range(agents)
        )
    return {
        "agent_logs_if_incomplete": logs,
        "suite": "load",
        "clients": clients,
        "tasks": tasks,
        "agents": agents,
        "slots_per_agent": slots,
        "tasks_added": len(job.tasks),
        "tasks_completed": counts.completed,
        "tasks_succeeded": counts.succeeded,
        "errors": len(stats.errors),
        "first_errors": stats.errors[:5],
        "throttled": stats.throttled,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "add_requests": len(stats.add_ms),
        "add_p50_ms": round(percentile(stats.add_ms, 50), 2),
        "add_p99_ms": round(percentile(stats.add_ms, 99), 2),
        "list_requests": len(stats.list_ms),
        "list_p50_ms": round(percentile(stats.list_ms, 50), 2),
        "list_p99_ms": round(percentile(stats.list_ms, 99), 2),
        "seconds_adding": round(added, 1),
        "seconds_to_all_completed": round(finished, 1),
    }


async def _one_client(c: AsyncClient, stats: Stats, index: int, count: int) -> None:
    async with c:
        await _client(c, stats, index, count)


def run(full: bool) -> list[dict]:
    size = FULL if full else SMALL
    with tempfile.TemporaryDirectory(prefix="tvm-load-") as base:
        return [trio.run(lambda: load_run(base, **size))]


def main() -> None:
    if sys.argv[1:2] == ["--clients-only"]:
        stats = trio.run(clients_only, int(sys.argv[2]), int(sys.argv[3]))
        print(stats.dump(), flush=True)
        return
    rows = run("--full" in sys.argv[1:])
    for row in rows:
        print(json.dumps(row), flush=True)
    if any(r["errors"] or r["tasks_completed"] != r["tasks"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
