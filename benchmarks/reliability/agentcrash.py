"""Agent crash: a pool of TVMs started by the local provisioner runs recorded tasks; one agent is
SIGKILLed mid-run, another SIGSTOPped past the heartbeat timeout and then SIGCONTed once its tasks'
own processes (which live on, in their own sessions) have finished.

Shown: every task that was running on a victim is requeued and completed on another TVM, once; the
stopped agent's runs are not recorded (its tasks are recorded as completed elsewhere, though they
really ran to their end on it); the victims' TVMs leave the pool and the provisioner brings new
ones to keep its target, killing the stopped agent (it is retired) once its TVM has left. Figures: tasks lost, completions recorded twice (the coordinator's own
count of recorded completions against the tasks), executions no requeue explains, requeues, and
the time from the signal to the TVM `unknown` (detect), to its tasks running or done elsewhere
(requeue) and to a new TVM idle in its place (replace), and the stopped agents still running at
the end (the provisioner kills them once their TVMs left the pool) or agents beyond the target.

    python -m benchmarks.reliability.agentcrash [--quick]
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from typing import Any

import trio

from coordinator.client import AsyncClient, task_spec

from . import main_for, row, say
from ._cluster import RunLog, inproc_coordinator, remove_agent_cgroups, tally, wait_for

WI, JOB = "wi", "job-0000000001"


async def _tvms(client: AsyncClient) -> list[Any]:
    return list(await client.tvms.list("p"))


async def _running_on(client: AsyncClient, tvm: str) -> list[str]:
    return [
        t.name
        for t in await client.tasks.list(WI, JOB, state="running")
        if t.tvm_info is not None and t.tvm_info.tvm_name == tvm
    ]


async def _victim(client: AsyncClient, rc: Any, runlog: RunLog) -> tuple[Any, Any, list[str]]:
    """A provisioned agent (its process, its TVM) with tasks running on it now: started there
    for real (in the run log), not only placed, so a stopped agent's tasks do run to their end."""

    async def pick() -> Any:
        started = set(runlog.runs())
        for t in await _tvms(client):
            if t.state != "running":
                continue
            names = await _running_on(client, t.name)
            if names and all((n, t.name) in started for n in names):
                return t, names
        return None

    tvm, names = await wait_for(pick, 60, "a TVM with running tasks")
    index = int(str(tvm.agent_id).rpartition("-")[2])
    return rc.service.provisioner.procs[index], tvm, names


async def _measure(
    client: AsyncClient, tvm: Any, names: list[str], t0: float, target: int
) -> dict[str, Any]:
    """Seconds from `t0` until the TVM is unknown, its tasks left it, a new TVM took its place."""

    async def unknown() -> Any:
        for t in await _tvms(client):
            if t.name == tvm.name and t.state == "unknown":
                return t
        return None

    lost = await wait_for(unknown, 120, f"{tvm.name} unknown", poll=0.02)
    detect = trio.current_time() - t0

    async def moved() -> bool:
        for n in names:
            t = await client.tasks.get(WI, JOB, n)
            if t.state == "running" and t.tvm_info and t.tvm_info.tvm_name == tvm.name:
                return False
        return True

    await wait_for(moved, 120, f"{tvm.name}'s tasks requeued", poll=0.02)
    requeue = trio.current_time() - t0

    async def replaced() -> bool:
        ts = await _tvms(client)
        ok = [t for t in ts if t.state in ("idle", "running") and t.name != tvm.name]
        return len(ok) >= target and all(t.name != tvm.name for t in ts)

    await wait_for(replaced, 180, f"{tvm.name} replaced", poll=0.05)
    return {
        "detect": detect,
        "requeue": requeue,
        "replace": trio.current_time() - t0,
        "reason": lost.state_reason or "",
    }


async def _add_wave(
    client: AsyncClient, runlog: RunLog, prefix: str, n: int, seconds: float
) -> set[str]:
    specs = [task_spec(f"{prefix}{i:04d}", runlog.command(seconds)) for i in range(n)]
    return {r.name for r in await client.tasks.add_many(WI, JOB, specs) if r.status == "success"}


def _summary(measures: list[dict[str, Any]]) -> dict[str, Any]:
    """The worst of several rounds (times) and the reasons given."""
    out: dict[str, Any] = {k: max(m[k] for m in measures) for k in ("detect", "requeue", "replace")}
    out["reason"] = measures[0]["reason"]
    out["reasons"] = sorted({m["reason"].split(":")[0] for m in measures})
    return out


async def scenario(
    base: str,
    *,
    tasks: int,
    rounds: int = 1,
    target: int = 3,
    slots: int = 2,
    task_seconds: float = 1.5,
) -> dict[str, Any]:
    """`rounds` times: a wave of tasks, one agent SIGKILLed; a wave, one SIGSTOPped."""
    heartbeat = 2.0
    runlog = RunLog(os.path.join(base, "runs.log"))
    tvm_root = os.path.join(base, "tvms")
    async with inproc_coordinator(
        os.path.join(base, "state"),
        heartbeat_timeout=heartbeat,
        link_grace=1.0,
        provisioner="local",
        tvm_root_dir=tvm_root,
    ) as rc:
        client = AsyncClient(rc.endpoint, rc.account, rc.key)
        core = rc.service.core
        try:
            await client.pools.add(
                "p", target_dedicated=target, max_tasks_per_vm=slots, unknown_tvm_timeout="PT2S"
            )

            async def all_idle() -> bool:
                return sum(t.state == "idle" for t in await _tvms(client)) >= target

            await wait_for(all_idle, 120, f"{target} provisioned TVMs idle")
            await client.workitems.add(WI, "p")
            acked: set[str] = set()
            kills: list[dict[str, Any]] = []
            stops: list[dict[str, Any]] = []
            victim_tvms: set[str] = set()
            stopped_on: dict[str, str] = {}  # task -> the stopped TVM it was cut off on
            stopped_procs: list[Any] = []  # the stopped agents' processes
            cut_on: dict[str, str] = {}  # task -> the TVM it was cut off on
            wave = max(1, tasks // (2 * rounds))
            for r in range(rounds):
                # Each signal lands on a TVM busy with a fresh wave of tasks.
                acked |= await _add_wave(client, runlog, f"r{r}k", wave, task_seconds)
                # SIGKILL: the provisioner sees the process end.
                proc, killed, names = await _victim(client, rc, runlog)
                t0 = trio.current_time()
                proc.send_signal(signal.SIGKILL)  # a process this coordinator started, by its PID
                kills.append(await _measure(client, killed, names, t0, target))
                victim_tvms.add(killed.name)
                cut_on.update(dict.fromkeys(names, killed.name))

                # SIGSTOP past the heartbeat timeout, SIGCONT once its tasks' processes finished.
                acked |= await _add_wave(client, runlog, f"r{r}s", wave, task_seconds)
                proc, stopped, names = await _victim(client, rc, runlog)
                t0 = trio.current_time()
                stopped_procs.append(proc)
                os.killpg(proc.pid, signal.SIGSTOP)
                try:
                    stops.append(await _measure(client, stopped, names, t0, target))
                    await trio.sleep(max(0.0, task_seconds + 0.5 - (trio.current_time() - t0)))
                finally:
                    # Its TVM left the pool: the provisioner has killed it (even stopped) already,
                    # so it cannot come back as an agent nobody asked for.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGCONT)
                victim_tvms.add(stopped.name)
                cut_on.update(dict.fromkeys(names, stopped.name))
                stopped_on.update(dict.fromkeys(names, stopped.name))
            rest = tasks - 2 * rounds * wave
            if rest > 0:
                acked |= await _add_wave(client, runlog, "end", rest, task_seconds)
            await client.tasks.wait(WI, JOB, timeout=max(120, tasks * task_seconds))
            final = list(await client.tasks.list(WI, JOB))
            figures = tally(acked, final, runlog.counts())
            by_name = {t.name: t for t in final}
            figures["victim_tasks"] = len(cut_on)
            # Completed somewhere other than where it was cut off (once: see the tally).
            figures["victim_tasks_not_completed_elsewhere"] = sum(
                1
                for n, tvm in cut_on.items()
                if by_name[n].tvm_info is None or by_name[n].tvm_info.tvm_name == tvm
            )
            figures["victim_tasks_not_requeued"] = sum(
                1 for n in cut_on if by_name[n].execution_info.requeue_count < 1
            )
            # The stopped agents' tasks ran to their end there (their processes live in their own
            # sessions): results their agents, killed while stopped, never sent; recorded nowhere.
            figures["late_results"] = sum(1 for n, tvm in runlog.ends() if stopped_on.get(n) == tvm)
            figures["completions_recorded_twice"] = max(
                0, core.completions - sum(t.state == "completed" for t in final)
            )
            # Their TVMs left the pool while they were stopped: the provisioner kills them then
            # (core/healing.py retires them), so none came back as an extra free agent.
            figures["stopped_agents_left_running"] = sum(p.poll() is None for p in stopped_procs)
            figures["agents_beyond_target"] = max(0, len(core.agents) - target)
            tvms = await _tvms(client)
            figures["tvms_in_pool"] = sum(t.state in ("idle", "running") for t in tvms)
            figures["victim_tvms_left_in_pool"] = sum(1 for t in tvms if t.name in victim_tvms)
            kill, stop = _summary(kills), _summary(stops)
            return {
                **figures,
                "tasks": tasks,
                "rounds": rounds,
                "target": target,
                "heartbeat_timeout": heartbeat,
                "kill": kill,
                "stop": stop,
            }
        finally:
            await client.aclose()
            with trio.CancelScope(shield=True):
                for p in rc.service.provisioner.procs:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGCONT)
                await trio.to_thread.run_sync(rc.service.provisioner.stop_all)
                for i in range(len(rc.service.provisioner.procs)):
                    remove_agent_cgroups(f"local-{i}", os.path.join(tvm_root, f"agent-{i}"))


def run(full: bool) -> list[dict[str, Any]]:
    size = {"tasks": 200, "rounds": 3} if full else {"tasks": 24, "rounds": 1}
    old = os.environ.get("TVM_AGENT_TASK_ISOLATION")
    # The provisioned agents inherit this: recorded tasks write beside the suite's files.
    os.environ["TVM_AGENT_TASK_ISOLATION"] = "none"
    try:
        with tempfile.TemporaryDirectory(prefix="tvm-rel-agentcrash-") as base:
            f = trio.run(lambda: scenario(base, **size))
    finally:
        if old is None:
            os.environ.pop("TVM_AGENT_TASK_ISOLATION", None)
        else:
            os.environ["TVM_AGENT_TASK_ISOLATION"] = old
    return figures_rows(f)


def figures_rows(f: dict[str, Any]) -> list[dict[str, Any]]:
    params = {
        "tasks": f["tasks"],
        "target": f["target"],
        "kills": f["rounds"],
        "stops": f["rounds"],
        "heartbeat_timeout": f["heartbeat_timeout"],
    }
    k, s = f["kill"], f["stop"]
    say(
        f"agentcrash: {f['tasks']} tasks on {f['target']} TVMs, {f['rounds']} SIGKILL(s) and "
        f"{f['rounds']} SIGSTOP(s); {f['victim_tasks']} tasks cut off: lost "
        f"{f['lost']}, recorded twice {f['completions_recorded_twice']}, not completed elsewhere "
        f"{f['victim_tasks_not_completed_elsewhere']}, late results ignored {f['late_results']}, "
        f"unexplained reruns {f['unexplained_reruns']}, requeues {f['requeues']}; TVMs in the pool "
        f"{f['tvms_in_pool']}/{f['target']}, victims left in it {f['victim_tvms_left_in_pool']},"
        f" stopped agents left running {f['stopped_agents_left_running']}, agents beyond the"
        f" target {f['agents_beyond_target']}\n"
        f"  SIGKILL ({', '.join(k['reasons'])}), worst: detect {k['detect']:.2f} s, requeue "
        f"{k['requeue']:.2f} s, replace {k['replace']:.2f} s\n"
        f"  SIGSTOP ({', '.join(s['reasons'])}), worst: detect {s['detect']:.2f} s, requeue "
        f"{s['requeue']:.2f} s, replace {s['replace']:.2f} s"
    )
    rows = [
        row("agentcrash_tasks_lost", params, f["lost"], "count"),
        row(
            "agentcrash_completions_recorded_twice",
            params,
            f["completions_recorded_twice"],
            "count",
        ),
        row(
            "agentcrash_cut_tasks_not_completed_elsewhere",
            params,
            f["victim_tasks_not_completed_elsewhere"],
            "count",
        ),
        row("agentcrash_reruns_unexplained", params, f["unexplained_reruns"], "count"),
        row("agentcrash_requeues", params, f["requeues"], "count"),
        row("agentcrash_late_results_ignored", params, f["late_results"], "count"),
        row("agentcrash_tvms_in_pool_at_end", params, f["tvms_in_pool"], "count"),
        row("agentcrash_victim_tvms_left_in_pool", params, f["victim_tvms_left_in_pool"], "count"),
        row(
            "agentcrash_stopped_agents_left_running",
            params,
            f["stopped_agents_left_running"],
            "count",
        ),
        row("agentcrash_agents_beyond_target", params, f["agents_beyond_target"], "count"),
    ]
    for kind, m in (("sigkill", k), ("sigstop", s)):
        for what in ("detect", "requeue", "replace"):
            rows.append(row(f"agentcrash_{kind}_time_to_{what}", params, m[what], "s"))
    return rows


if __name__ == "__main__":
    raise SystemExit(main_for(run))
