"""Submitter process for the throughput benchmarks: adds N tasks with add-task-collection
(100 per request; key in TVM_KEY) over C concurrent HTTP connections, then prints {"first", "last", "failures", "cpu"} (unix times
of the first request sent and the last answer received; CPU seconds this process used from the first
request on, its interpreter start left out) as JSON on stdout.

Request bodies are built before the clock starts so the measurement is the service's cost.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import trio

from coordinator.client import AsyncClient
from coordinator.common import models as m


async def main(a: argparse.Namespace) -> None:
    names = [f"t{i:07d}" for i in range(a.n)]
    parts = [
        [m.TaskAdd(name=n, command_line=a.command) for n in names[i : i + 100]]
        for i in range(0, a.n, 100)
    ]
    client = AsyncClient(a.endpoint, a.account, os.environ["TVM_KEY"], timeout=300)
    times: dict[str, float] = {}
    failures = 0
    it = iter(parts)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru.ru_utime + ru.ru_stime

    async def worker() -> None:
        nonlocal failures
        for part in it:
            times.setdefault("first", time.time())
            res = await client.tasks.add_collection(a.workitem, a.job, part)
            failures += sum(1 for r in res if r.status != "success")
            times["last"] = time.time()

    async with trio.open_nursery() as nursery:
        for _ in range(a.concurrency):
            nursery.start_soon(worker)
    await client.aclose()
    ru = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru.ru_utime + ru.ru_stime - cpu0
    print(json.dumps({**times, "failures": failures, "cpu": cpu}), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    for k in ("endpoint", "account", "workitem", "job"):
        p.add_argument(f"--{k}", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--command", default="/bin/true")
    trio.run(main, p.parse_args())
