"""Disk-full suite: the coordinator's state on a small tmpfs filled up, then given room again; an
agent's TVM root filled up, then given room again. Counted: tasks acknowledged, refusals (503
StoreUnavailable with Retry-After), acknowledged tasks missing after a restart on the same state
(must be 0), refused-before-change tasks present after it (must be 0), seconds until writes
resume once space returns, seconds until a full TVM is `unusable` (DiskFull) and back `idle`.
Needs root (it mounts tmpfs file systems under a temporary directory).

    python -m benchmarks.reliability.disk [--full]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import trio

from benchmarks._common import coordinator, start_agents, stop_agents, wait_until
from coordinator.client import AsyncClient
from coordinator.client._http import _Call

from ._diskfill import can_mount_tmpfs, fill, tmpfs

JOB = "job-0000000001"


async def _status(c: AsyncClient, method: str, path: str, body: Any = None) -> tuple[int, str]:
    m, url, headers, content = c._prepare(_Call(method, path, body))
    resp = await c._http.request(m, url, headers=headers, content=content)
    code = resp.headers.get("x-tvm-error-code", "")
    if resp.status_code == 503 and not resp.headers.get("retry-after"):
        code += " (no Retry-After)"
    return resp.status_code, code


async def coordinator_store_full(base: str, rounds: int) -> dict:
    state = os.path.join(base, "state")
    acked: list[str] = []
    refused: list[str] = []
    ambiguous: list[str] = []  # the 503 of the commit that failed: may be written later
    resume_s: list[float] = []
    bad: list[str] = []
    with tmpfs(state, "3m"):
        async with coordinator(state) as rc:
            async with AsyncClient(rc.endpoint, rc.account, rc.key) as c:
                await c.workitems.add("wi", "p")
                tasks = f"/workitems/wi/jobs/{JOB}/tasks"
                for r in range(rounds):
                    for i in range(50):  # acknowledged before the disk fills: kept through it all
                        name = f"r{r}-b{i}"
                        body = {"name": name, "commandLine": "/bin/true"}
                        status, code = await _status(c, "POST", tasks, body)
                        if status == 201:
                            acked.append(name)
                        else:
                            bad.append(f"before filling: {status} {code}")
                    filler = fill(state, name=f"filler{r}")
                    for i in range(5000):
                        name = f"r{r}-a{i}"
                        body = {"name": name, "commandLine": "/bin/true " + "x" * 4000}
                        status, code = await _status(c, "POST", tasks, body)
                        if status == 201:
                            acked.append(name)
                            continue
                        if (status, code) != (503, "StoreUnavailable"):
                            bad.append(f"{status} {code}")
                        ambiguous.append(name)
                        break
                    for i in range(10):
                        name = f"r{r}-x{i}"
                        body = {"name": name, "commandLine": "/bin/true"}
                        status, code = await _status(c, "POST", tasks, body)
                        if (status, code) != (503, "StoreUnavailable"):
                            bad.append(f"{status} {code}")
                        refused.append(name)
                    os.unlink(filler)
                    freed = time.monotonic()
                    await wait_until(lambda: rc.service.journal.unavailable is None, 30, "resume")
                    resume_s.append(time.monotonic() - freed)
                    # Make room for the next round's WAL growth: the rows stay, the pages go.
                    status, _ = await _status(
                        c, "POST", tasks, {"name": f"r{r}-after", "commandLine": "x"}
                    )
                    if status == 201:
                        acked.append(f"r{r}-after")
                    else:
                        bad.append(f"after space returned: {status}")
        async with coordinator(state) as rc:
            core = rc.service.core
            job = core.get_job("wi", JOB)
            lost = [n for n in acked if n not in job.tasks]
            resurrected = [n for n in refused if n in job.tasks]
            ambiguous_written = sum(1 for n in ambiguous if n in job.tasks)
    return {
        "suite": "disk",
        "case": "coordinator store full",
        "rounds": rounds,
        "acknowledged": len(acked),
        "acknowledged_lost_after_restart": len(lost),
        "refused_before_change": len(refused),
        "refused_present_after_restart": len(resurrected),
        "failed_commit_503s": len(ambiguous),
        "failed_commit_written_later": ambiguous_written,
        "unexpected_answers": bad[:5],
        "resume_after_space_s_max": round(max(resume_s), 2),
    }


async def agent_root_full(base: str) -> dict:
    agents = os.path.join(base, "agents")
    root = os.path.join(agents, "agent0")
    result: dict[str, Any] = {"suite": "disk", "case": "agent TVM root full"}
    with tmpfs(root, "600m"):
        async with coordinator(os.path.join(base, "cstate"), heartbeat_timeout=2.0) as rc:
            procs = start_agents(rc, 1, agents)
            try:
                async with AsyncClient(rc.endpoint, rc.account, rc.key) as c:
                    await c.pools.add("p", target_dedicated=1)
                    core = rc.service.core

                    def state() -> tuple[str, str]:
                        tvm = next((t for t in core.tvms.values() if t.rec.pool == "p"), None)
                        return (tvm.rec.state, tvm.rec.state_reason) if tvm else ("", "")

                    await wait_until(lambda: state()[0] == "idle", 60, "an idle TVM")
                    t0 = time.monotonic()  # the filling (~0.5 GB) is part of it
                    filler = fill(root, keep_free=64 * 1024 * 1024)
                    await wait_until(lambda: state()[0] == "unusable", 60, "unusable")
                    result["unusable_after_s"] = round(time.monotonic() - t0, 2)
                    result["state_reason"] = state()[1]
                    os.unlink(filler)
                    t0 = time.monotonic()
                    await wait_until(lambda: state()[0] == "idle", 60, "idle again")
                    result["idle_again_after_s"] = round(time.monotonic() - t0, 2)
            finally:
                stop_agents(procs)
    return result


def run(full: bool) -> list[dict]:
    why = can_mount_tmpfs()
    if why:
        return [{"suite": "disk", "skipped": why}]
    with tempfile.TemporaryDirectory(prefix="tvm-disk-") as base:
        rows = [trio.run(coordinator_store_full, base, 5 if full else 1)]
        rows.append(trio.run(agent_root_full, base))
    return rows


def main() -> None:
    rows = run("--full" in sys.argv[1:])
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
