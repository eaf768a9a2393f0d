"""Coordinator crash: tasks run on real agents while the coordinator process is SIGKILLed again and
again and restarted on the same state directory and port.

The kill moments, in turn:
- `addtaskcollection`: while a collection request is in flight (the submitter marks each request
  it has sent and not yet had answered; the kill lands 0-4 ms into one and counts only if the
  request was still unanswered);
- `group-commit`: the instant the journal's WAL file is written (its mtime polled), i.e. while or
  right after completions are committed and before their acks leave;
- `random`: a random moment;
- `recovery` (the full run): within 0.3 s of a restart, while agents reconnect and resend what
  finished meanwhile.

The submitter retries every collection not answered until it is (an existing task answers
TaskExists, which counts as acknowledged). At the end: acknowledged tasks lost, completions
recorded twice (a completion visible before a kill that changed afterwards), real executions beyond
the first that no requeue explains, requeues.

    python -m benchmarks.reliability.crash [--quick]
"""

from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from typing import Any

from coordinator.client import BatchError, Client, task_spec

from . import main_for, row, say
from ._cluster import (
    Agent,
    CoordinatorProcess,
    RunLog,
    changed_completions,
    completion_of,
    start_agent,
    stop_agents,
    tally,
    wait_sync,
)

WI, JOB = "wi", "job-0000000001"
# The first kills land while tasks are still being added, the later ones while they complete.
# `recovery`: right after a restart, while agents reconnect and resend what finished meanwhile.
MOMENTS = (
    "addtaskcollection",
    "group-commit",
    "addtaskcollection",
    "group-commit",
    "random",
    "recovery",
    "random",
)


class Submitter(threading.Thread):
    """Adds the tasks in collections; a collection not answered (coordinator killed) is sent again."""

    def __init__(self, client: Client, specs: list[Any], batch: int, pause: float) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.specs = specs
        self.batch = batch
        self.pause = pause
        self.acked: set[str] = set()
        self.in_flight = threading.Event()
        self.retried = 0  # requests cut by a kill or refused while the coordinator was down
        self.errors: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        try:
            for i in range(0, len(self.specs), self.batch):
                part = self.specs[i : i + self.batch]
                while not self._send(part):
                    time.sleep(0.1)
                time.sleep(self.pause)
        finally:
            self.done.set()

    def _send(self, part: list[Any]) -> bool:
        self.in_flight.set()
        try:
            results = self.client.tasks.add_collection(WI, JOB, part)
        except BatchError as e:
            if e.status == 0 or e.status >= 500:
                self.retried += 1
                return False
            self.errors.append(str(e))
            return True
        except Exception:  # noqa: BLE001 - the connection cut by the kill
            self.retried += 1
            return False
        finally:
            self.in_flight.clear()
        for r in results:
            code = (r.error or {}).get("code")
            if r.status == "success" or code == "TaskExists":
                self.acked.add(r.name)
            elif r.status == "servererror":
                return False  # not written: the whole collection goes again
            else:
                self.errors.append(f"{r.name}: {r.error}")
        return True


def _wait_moment(kind: str, coord: CoordinatorProcess, sub: Submitter, rng: random.Random) -> str:
    """Block until the moment of `kind` comes; returns what was actually hit."""
    if kind == "addtaskcollection":
        while not sub.done.is_set():
            if sub.in_flight.wait(0.05):
                time.sleep(rng.uniform(0.0, 0.002))
                if sub.in_flight.is_set():
                    return kind
                # Answered first (a quick commit): aim at the next request instead.
        kind = "group-commit"  # submission over: no collection left to interrupt
    if kind == "group-commit":
        try:
            seen = os.stat(coord.wal).st_mtime_ns
        except FileNotFoundError:
            seen = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                now = os.stat(coord.wal).st_mtime_ns
            except FileNotFoundError:
                now = seen
            if now != seen:
                return kind
            time.sleep(0.0005)
        return "random"  # nothing committed for 10 s
    if kind == "recovery":
        time.sleep(rng.uniform(0.0, 0.3))
        return kind
    time.sleep(rng.uniform(0.05, 1.5))
    return "random"


def scenario(
    base: str,
    *,
    tasks: int,
    kills: int,
    agents: int = 2,
    slots: int = 4,
    batch: int = 100,
    pause: float = 0.0,
    task_seconds: float = 0.0,
    seed: int | None = None,
) -> dict[str, Any]:
    rng = random.Random(seed)
    runlog = RunLog(os.path.join(base, "runs.log"))
    coord = CoordinatorProcess(
        os.path.join(base, "state"),
        base,
        args=("--heartbeat-timeout", "20", "--log-level", "warning"),
    )
    env = coord.start()
    procs: list[Agent] = []
    restarts: list[float] = []
    hits: list[str] = []
    seen_done: dict[str, tuple[Any, ...]] = {}
    client: Client | None = None
    try:
        for i in range(agents):
            procs.append(start_agent(env["TVM_ENDPOINT"], env["TVM_JOIN_TOKEN"], base, f"a{i}"))
        client = Client(env["TVM_ENDPOINT"], env["TVM_ACCOUNT"], env["TVM_KEY"])
        client.pools.add("p", target_dedicated=agents, max_tasks_per_vm=slots, vm_size="medium")
        wait_sync(
            lambda: sum(t.state == "idle" for t in client.tvms.list("p")) == agents,
            60,
            "the agents' TVMs idle",
        )
        client.workitems.add(WI, "p")
        cmd = runlog.command(task_seconds)
        specs = [task_spec(f"t{i:06d}", cmd) for i in range(tasks)]
        sub = Submitter(client, specs, batch, pause)
        started = time.monotonic()
        sub.start()
        for k in range(kills):
            moment = MOMENTS[k % len(MOMENTS)]
            if moment != "recovery":
                time.sleep(rng.uniform(0.2, 0.8))  # let the run go on between kills
                for t in _list_or_empty(client):
                    if t.state == "completed":
                        seen_done[t.name] = completion_of(t)
            hit = _wait_moment(moment, coord, sub, rng)
            if hit == "addtaskcollection" and not sub.in_flight.is_set():
                hit = "random"  # the answer came first: not a kill mid-request after all
            coord.kill()
            t0 = time.monotonic()
            hits.append(hit)
            coord.start()
            wait_sync(lambda: client.pools.get("p"), 60, "the restarted coordinator answering")
            restarts.append(time.monotonic() - t0)
        sub.join(timeout=600)
        assert sub.done.is_set(), "submitter did not finish"
        final_wait = max(120.0, tasks * 0.05)
        wait_sync(
            lambda: _all_done(client, tasks),
            final_wait,
            f"all {tasks} tasks completed",
            poll=0.5,
        )
        elapsed = time.monotonic() - started
        final = client.tasks.list(WI, JOB)
        counts = client.jobs.task_counts(WI, JOB)
        figures = tally(sub.acked, final, runlog.counts())
        figures["completions_recorded_twice"] = changed_completions(seen_done, final) + max(
            0, counts.completed - len({t.name for t in final if t.state == "completed"})
        )
        figures["submit_errors"] = len(sub.errors)
        return {
            **figures,
            "tasks": tasks,
            "kills": len(hits),
            "kills_mid_addtaskcollection": hits.count("addtaskcollection"),
            "kills_at_group_commit": hits.count("group-commit"),
            "kills_random": hits.count("random"),
            "kills_in_recovery": hits.count("recovery"),
            "requests_retried": sub.retried,
            "restart_s_max": max(restarts) if restarts else 0.0,
            "restart_s_mean": sum(restarts) / len(restarts) if restarts else 0.0,
            "elapsed_s": elapsed,
            "errors": sub.errors[:5],
        }
    finally:
        if client is not None:
            client.close()  # its kept connections, not to the garbage collector
        coord.kill()
        stop_agents(procs)


def _list_or_empty(client: Client) -> list[Any]:
    try:
        return list(client.tasks.list(WI, JOB))
    except Exception:  # noqa: BLE001 - the job may not exist yet
        return []


def _all_done(client: Client, n: int) -> bool:
    c = client.jobs.task_counts(WI, JOB)
    return bool(c.completed >= n and c.active == 0 and c.running == 0)


def run(full: bool) -> list[dict[str, Any]]:
    size: dict[str, Any] = (
        {"tasks": 10_000, "kills": 7, "pause": 0.05, "task_seconds": 0.05}
        if full
        else {"tasks": 200, "kills": 5, "batch": 10, "pause": 0.05, "task_seconds": 0.2}
    )
    with tempfile.TemporaryDirectory(prefix="tvm-rel-crash-") as base:
        f = scenario(base, **size)
    params = {"tasks": f["tasks"], "kills": f["kills"], "agents": 2}
    say(
        f"crash: {f['tasks']} tasks, {f['kills']} SIGKILLs ({f['kills_mid_addtaskcollection']} "
        f"mid-addtaskcollection, {f['kills_at_group_commit']} at a group commit, "
        f"{f['kills_in_recovery']} right after a restart, {f['kills_random']} random; "
        f"{f['requests_retried']} requests retried): lost {f['lost']}, "
        f"recorded twice {f['completions_recorded_twice']}, reruns {f['reruns']} "
        f"(unexplained {f['unexplained_reruns']}), requeues {f['requeues']}, "
        f"restart max {f['restart_s_max']:.2f} s"
    )
    return [
        row("crash_tasks_lost", params, f["lost"], "count"),
        row("crash_completions_recorded_twice", params, f["completions_recorded_twice"], "count"),
        row("crash_reruns_unexplained", params, f["unexplained_reruns"], "count"),
        row("crash_reruns", params, f["reruns"], "count"),
        row("crash_requeues", params, f["requeues"], "count"),
        row("crash_kills_mid_addtaskcollection", params, f["kills_mid_addtaskcollection"], "count"),
        row("crash_kills_at_group_commit", params, f["kills_at_group_commit"], "count"),
        row("crash_kills_in_recovery", params, f["kills_in_recovery"], "count"),
        row("crash_requests_retried", params, f["requests_retried"], "count"),
        row("crash_restart_max", params, f["restart_s_max"], "s"),
        row("crash_run_time", params, f["elapsed_s"], "s"),
    ]


if __name__ == "__main__":
    raise SystemExit(main_for(run))
