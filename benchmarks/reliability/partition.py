"""Partition: one agent in a network namespace the suite creates (veth pair to the host), one on the
host; the coordinator listens on the host end of the veth. While tasks run on both, an nftables table
inside the namespace cuts the link — drop or reject, host-to-agent, agent-to-host or both — for
shorter or longer than the heartbeat timeout, then the link comes back.

Each case ends when every task completed and both TVMs are usable again; shown per case: tasks
lost 0, completions recorded twice 0 (the coordinator's own count against the tasks), executions no
requeue explains 0; reported: requeues and how the cut TVM was seen (unknown or not).

    python -m benchmarks.reliability.partition [--quick]
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections import Counter
from typing import Any

import trio

from coordinator.client import AsyncClient, task_spec

from . import Skipped, main_for, row, say
from ._cluster import RunLog, inproc_coordinator, start_agent, stop_agents, tally, wait_for
from ._netns import Netns, unavailable

WI, JOB = "wi", "job-0000000001"
HEARTBEAT = 2.0


async def _tvms(client: AsyncClient) -> list[Any]:
    return list(await client.tvms.list("p"))


async def _one_case(
    rc: Any,
    client: AsyncClient,
    ns: Netns,
    runlog: RunLog,
    cut_agent: str,
    case: dict[str, Any],
    index: int,
    tasks: int,
    task_seconds: float,
) -> dict[str, Any]:
    core = rc.service.core
    completions0 = core.completions
    names = [f"c{index:02d}t{i:03d}" for i in range(tasks)]
    results = await client.tasks.add_many(
        WI, JOB, [task_spec(n, runlog.command(task_seconds)) for n in names]
    )
    acked = {r.name for r in results if r.status == "success"}
    cut_tvm = next(t.name for t in await _tvms(client) if t.agent_id == cut_agent)

    async def busy() -> bool:
        running = await client.tasks.list(WI, JOB, state="running")
        return any(t.tvm_info and t.tvm_info.tvm_name == cut_tvm for t in running)

    await wait_for(busy, 60, "tasks running on the namespaced agent")
    seconds = HEARTBEAT * (0.5 if case["length"] == "short" else 2.5)
    ns.cut(case["action"], case["direction"])
    went_unknown = False
    try:
        deadline = trio.current_time() + seconds
        while trio.current_time() < deadline:
            state = next((t.state for t in await _tvms(client) if t.name == cut_tvm), "gone")
            went_unknown = went_unknown or state == "unknown"
            await trio.sleep(0.1)
    finally:
        ns.heal()

    async def done() -> bool:
        c = await client.jobs.task_counts(WI, JOB)
        return bool(c.active == 0 and c.running == 0)

    await wait_for(done, 120, "every task of the case completed", poll=0.1)

    async def both_back() -> bool:
        return sum(t.state in ("idle", "running") for t in await _tvms(client)) >= 2

    await wait_for(both_back, 60, "both TVMs usable again", poll=0.1)
    mine = set(names)
    final = [t for t in await client.tasks.list(WI, JOB) if t.name in mine]
    runs = Counter({n: c for n, c in runlog.counts().items() if n in mine})
    figures = tally(acked, final, runs)
    figures["completions_recorded_twice"] = max(
        0, core.completions - completions0 - sum(t.state == "completed" for t in final)
    )
    figures["went_unknown"] = int(went_unknown)
    figures["cut_s"] = seconds
    return {**case, **figures}


def cases(full: bool) -> list[dict[str, str]]:
    if not full:
        return [
            {"action": "drop", "direction": "both", "length": "long"},
            {"action": "reject", "direction": "in", "length": "short"},
        ]
    return [
        {"action": a, "direction": d, "length": n}
        for a, d, n in itertools.product(
            ("drop", "reject"), ("in", "out", "both"), ("short", "long")
        )
    ]


async def scenario(
    base: str, *, full: bool, tasks: int = 8, task_seconds: float = 1.0
) -> list[dict[str, Any]]:
    why = unavailable()
    if why:
        raise Skipped(why)
    runlog = RunLog(os.path.join(base, "runs.log"))
    ns = Netns()
    agents = []
    try:
        async with inproc_coordinator(
            os.path.join(base, "state"),
            host=ns.host_ip,
            heartbeat_timeout=HEARTBEAT,
            link_grace=1.0,
        ) as rc:
            client = AsyncClient(rc.endpoint, rc.account, rc.key)
            try:
                agents.append(start_agent(rc.agent_url, rc.join_token, base, "cut", ns.prefix))
                agents.append(start_agent(rc.agent_url, rc.join_token, base, "host"))
                await client.pools.add("p", target_dedicated=2, max_tasks_per_vm=2)

                async def idle() -> bool:
                    return sum(t.state == "idle" for t in await _tvms(client)) >= 2

                await wait_for(idle, 60, "both agents' TVMs idle")
                await client.workitems.add(WI, "p")
                out = []
                for i, case in enumerate(cases(full)):
                    out.append(
                        await _one_case(rc, client, ns, runlog, "cut", case, i, tasks, task_seconds)
                    )
                return out
            finally:
                await client.aclose()
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(stop_agents, agents)
    finally:
        ns.close()


def run(full: bool) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="tvm-rel-partition-") as base:
        results = trio.run(lambda: scenario(base, full=full))
    rows = []
    for r in results:
        params = {
            "action": r["action"],
            "direction": r["direction"],
            "cut_s": r["cut_s"],
            "heartbeat_timeout": HEARTBEAT,
        }
        say(
            f"partition {r['action']:6} {r['direction']:4} {r['length']:5} ({r['cut_s']:.1f} s): "
            f"lost {r['lost']}, recorded twice {r['completions_recorded_twice']}, unexplained "
            f"reruns {r['unexplained_reruns']}, requeues {r['requeues']}, TVM unknown "
            f"{'yes' if r['went_unknown'] else 'no'}"
        )
        rows += [
            row("partition_tasks_lost", params, r["lost"], "count"),
            row(
                "partition_completions_recorded_twice",
                params,
                r["completions_recorded_twice"],
                "count",
            ),
            row("partition_reruns_unexplained", params, r["unexplained_reruns"], "count"),
            row("partition_requeues", params, r["requeues"], "count"),
        ]
    return rows


if __name__ == "__main__":
    raise SystemExit(main_for(run))
