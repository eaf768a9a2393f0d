"""`tvm up`, `tvm quickstart` and `tvm coordinator`: the Trio main functions behind the CLI."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

from coordinator.runtime.journal import StoreFenced
from coordinator.runtime.pgstore import StoreUnreachable
from coordinator.runtime.provisioner import LocalProvisioner

from .joining import default_public_url, join_lines
from .journalout import print_exports
from .server import RunningCoordinator, run_coordinator

log = logging.getLogger("tvm.up")


def _export_lines(endpoint: str, account: str, key: str, join_token: str) -> str:
    return (
        f"export TVM_ENDPOINT={endpoint}\n"
        f"export TVM_ACCOUNT={account}\n"
        f"export TVM_KEY={key}\n"
        f"export TVM_JOIN_TOKEN={join_token}\n"
    )


def _exports(rc: RunningCoordinator) -> str:
    return (
        f"export TVM_ENDPOINT={rc.endpoint}\n"
        f"export TVM_ACCOUNT={rc.account}\n"
        f"export TVM_KEY={rc.key}\n"
    )


async def _first_signal(signals: AsyncIterator[int]) -> str:
    """The name of the first signal `signals` delivers (logged)."""
    async for signum in signals:
        name = signal.Signals(signum).name
        log.info("received %s, stopping", name)
        return name
    return ""


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        await _first_signal(signals)


async def warn_degraded(
    rc: RunningCoordinator, out: Any = None, interval: float = 0.5, who: str = "tvm up"
) -> None:
    """Say on `tvm up`'s own stderr, once per agent and finding, what an agent's host cannot enforce
    (the same lines are on the TVM's record and in `tvm status`)."""
    said: set[tuple[str, str]] = set()
    while True:
        for agent in list(rc.service.core.agents.values()):
            for mode in agent.degraded:
                if (agent.agent_id, mode) not in said:
                    said.add((agent.agent_id, mode))
                    hint = " (--accept-degraded silences this)" if who == "tvm up" else ""
                    print(
                        f"{who}: WARNING: agent {agent.agent_id} is degraded: {mode}{hint}",
                        file=out or sys.stderr,
                        flush=True,
                    )
        await trio.sleep(interval)


async def run_up(
    state_dir: str,
    host: str,
    port: int,
    agents: int,
    heartbeat_timeout: float,
    provision: bool = True,
    tvm_root_dir: str | None = None,
    accept_degraded: bool = False,
    public_url: str = "",
) -> int:
    """`provision`: pools short of free agents get more local agents started on demand (issue 5).
    `accept_degraded` only silences the warnings about degraded hosts; it changes nothing that runs.
    SIGINT and SIGTERM are taken from the start: one that comes while agents are being started
    stops them once they are (the default action would end this process and leave them running)."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                rc: RunningCoordinator = await nursery.start(
                    lambda task_status: run_coordinator(
                        state_dir,
                        host=host,
                        port=port,
                        heartbeat_timeout=heartbeat_timeout,
                        provisioner="local" if provision else None,
                        tvm_root_dir=tvm_root_dir,
                        public_url=public_url,
                        task_status=task_status,
                    )
                )
            except OSError as exc:
                print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
                return 1
            public = public_url or default_public_url(rc.endpoint, host)
            # The endpoint accepts requests now: the three lines come first on stdout.
            print_exports(rc.service.state_dir, _exports(rc))
            prov: Any = rc.service.provisioner or LocalProvisioner(
                state_dir, rc.agent_url, rc.join_token, tvm_root_dir=tvm_root_dir
            )
            try:
                if rc.service.provisioner is not None:
                    rc.service.start_agents(agents)
                else:
                    prov.start(agents)
                print(
                    f"tvm up: coordinator on {rc.endpoint}, {agents} local agent(s); Ctrl-C to stop",
                    file=sys.stderr,
                )
                if public_url or host != "127.0.0.1":
                    token_at = os.path.join(rc.service.state_dir, "join-token")
                    for line in join_lines("tvm up", public, f"this one is in {token_at}"):
                        print(line, file=sys.stderr)
                print(
                    f"tvm up: dashboard at {rc.endpoint.rstrip('/')}/ui/ "
                    "(`tvm ui` prints a login link)",
                    file=sys.stderr,
                    flush=True,
                )
                if not accept_degraded:
                    nursery.start_soon(warn_degraded, rc)
                await _first_signal(signals)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(prov.stop_all)
                nursery.cancel_scope.cancel()
    return 0


def coordinator_status(rc: RunningCoordinator) -> str:
    """The STATUS= line systemctl shows for the coordinator."""
    core = rc.service.core
    agents = sum(1 for a in core.agents.values() if a.connected)
    running = sum(len(t.running) for t in core.tvms.values())
    queued = sum(len(j.queue) for j in core.jobs.values())
    recovering = (
        "; recovering: waiting for agents to report" if core.recovering_until is not None else ""
    )
    return (
        f"serving on {rc.endpoint}; {agents} agent(s) connected, {len(core.tvms)} TVM(s), "
        f"{running} task(s) running, {queued} queued{recovering}"
    )


async def _report_status(rc: RunningCoordinator, interval: float = 2.0) -> None:
    from protocol.sdnotify import notify

    last = ""
    while True:
        line = coordinator_status(rc)
        if line != last:
            notify(f"STATUS={line}")
            last = line
        await trio.sleep(interval)


async def run_coordinator_main(cfg: Any, provisioners: Any = None) -> int:
    from protocol.sdnotify import WatchdogPolicy, notify, watchdog_loop

    try:
        watchdog = WatchdogPolicy.from_env()
    except ValueError as exc:  # systemd (or a person) set WATCHDOG_USEC/WATCHDOG_PID to garbage
        print(f"error: {exc}", file=sys.stderr)
        return 2
    printed = False

    def exports(endpoint: str, account: str, key: str, join_token: str) -> None:
        # A standby prints them too (the account is the store's): whichever is active serves.
        nonlocal printed
        if not printed:
            printed = True
            print_exports(cfg.state_dir, _export_lines(endpoint, account, key, join_token))

    def standby(endpoint: str, account: str, key: str, join_token: str) -> None:
        exports(endpoint, account, key, join_token)
        notify("READY=1", f"STATUS=standby on {endpoint}: waiting for the store's lease")

    failure: BaseException | None = None
    code = 0
    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(watchdog_loop, watchdog)
            code = await _serve_coordinator(cfg, exports, standby, provisioners)
            outer.cancel_scope.cancel()
    except* (StoreFenced, StoreUnreachable) as group:
        failure = group
        while isinstance(failure, BaseExceptionGroup):  # nested nurseries nest their groups
            failure = failure.exceptions[0]
    if failure is not None:
        print(f"error: {failure}", file=sys.stderr)
        return 3
    return code


async def _serve_coordinator(cfg: Any, exports: Any, standby: Any, provisioners: Any = None) -> int:
    from protocol.config import parse_port_range
    from protocol.sdnotify import notify

    async with trio.open_nursery() as nursery:
        try:
            rc: RunningCoordinator = await nursery.start(
                lambda task_status: run_coordinator(
                    cfg.state_dir,
                    host=cfg.host,
                    port=cfg.port,
                    account=cfg.account,
                    heartbeat_timeout=cfg.heartbeat_timeout,
                    join_token=cfg.join_token or None,
                    tls_cert=cfg.tls_cert or None,
                    tls_key=cfg.tls_key or None,
                    port_range=parse_port_range(cfg.port_range, cfg.ports_per_tvm),
                    max_pool_size=cfg.max_pool_size,
                    max_tasks_per_job=cfg.max_tasks_per_job,
                    max_tasks=cfg.max_tasks,
                    max_pools=cfg.max_pools,
                    max_active_jobs=cfg.max_active_jobs,
                    max_upload_size=cfg.max_upload_size,
                    link_grace=cfg.link_grace,
                    unknown_tvm_timeout=cfg.unknown_tvm_timeout,
                    unusable_after_failures=cfg.unusable_after_failures,
                    store=cfg.store or None,
                    lease_ttl=cfg.lease_ttl,
                    on_standby=standby,
                    provisioners=provisioners,
                    public_url=cfg.public_url,
                    task_status=task_status,
                )
            )
        except OSError as exc:
            print(
                f"error: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}",
                file=sys.stderr,
            )
            return 1
        log.info("coordinator ready on %s (account %s)", rc.endpoint, rc.account)
        exports(rc.endpoint, rc.account, rc.key, rc.join_token)
        public = cfg.public_url or default_public_url(rc.endpoint, cfg.host)
        hint = join_lines("tvm coordinator", public, "the TVM_JOIN_TOKEN above")
        if cfg.log_format == "json":  # stderr is the log: one JSON object per line, nothing else
            log.info("%s %s", hint[0].split(": ", 1)[1], hint[1].strip())
        else:
            for line in hint:
                print(line, file=sys.stderr, flush=True)
        notify("READY=1", f"STATUS={coordinator_status(rc)}")
        nursery.start_soon(_report_status, rc)
        await _until_signal()
        notify("STOPPING=1", "STATUS=stopping")
        nursery.cancel_scope.cancel()
    return 0


# /bin/sh and coreutils: reachable by the unprivileged task users (this interpreter may not be).
SAMPLE_SCRIPT = (
    'h=$(printf %s "$1" | sha256sum | cut -c1-16); '
    'echo "task $WATASK_TASK_NAME on $WATASK_TVM_NAME: sha256($1) = $h"'
)


async def _cancel_on_sigterm(scope: trio.CancelScope, stopped: list[str]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        stopped.append(await _first_signal(signals))
        scope.cancel()


async def run_quickstart(n_tasks: int, agents: int, state_dir: str | None) -> int:
    """The main job: embedded coordinator + local agents + a real workload, end to end."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from coordinator.client import AsyncClient, task_spec

    console = Console(stderr=True)
    tmp = None
    if state_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="tvm-quickstart-")
        state_dir = tmp.name
    prov: LocalProvisioner | None = None
    stopped: list[str] = []  # the signal that stopped the run, if one did
    try:
        async with trio.open_nursery() as nursery:
            # SIGTERM ends the run through the clean-up below (its default action would end this
            # process at once and leave the agents running); Ctrl-C does so as KeyboardInterrupt.
            nursery.start_soon(_cancel_on_sigterm, nursery.cancel_scope, stopped)
            rc: RunningCoordinator = await nursery.start(
                lambda task_status: run_coordinator(state_dir, port=0, task_status=task_status)
            )
            console.print(f"[bold]coordinator[/] {rc.endpoint}  (state in {state_dir})")
            prov = LocalProvisioner(state_dir, rc.agent_url, rc.join_token)
            prov.start(agents)
            nursery.start_soon(warn_degraded, rc, None, 0.5, "tvm quickstart")
            async with AsyncClient(rc.endpoint, rc.account, rc.key) as client:
                await client.pools.add(
                    "quickstart", target_dedicated=agents, max_tasks_per_vm=2, vm_size="medium"
                )
                await client.workitems.add("sample", "quickstart")
                job = "job-0000000001"
                tasks = [
                    task_spec(f"t{i:04d}", f"/bin/sh -c {shlex.quote(SAMPLE_SCRIPT)} sample {i}")
                    for i in range(n_tasks)
                ]
                started = time.monotonic()
                await client.tasks.add_many("sample", job, tasks)
                with Progress(
                    TextColumn("tasks"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    console=console,
                ) as bar:
                    tid = bar.add_task("tasks", total=n_tasks)
                    counts = await client.tasks.wait(
                        "sample",
                        job,
                        timeout=600,
                        progress=lambda c: bar.update(tid, completed=c.completed),
                    )
                elapsed = time.monotonic() - started
                first = await client.files.get_from_task("sample", job, "t0000", "stdout.txt")
                tvms = await client.tvms.list("quickstart")
            console.print(
                f"[green]{counts.succeeded} succeeded[/], {counts.failed} failed, "
                f"{n_tasks / elapsed:.0f} tasks/s on {len(tvms)} TVMs"
            )
            console.print(f"stdout of t0000: {first.decode().strip()}")
            nursery.cancel_scope.cancel()
        if stopped:
            console.print(f"stopped by {stopped[0]}: the agents and the coordinator are stopped")
            return 128 + signal.SIGTERM
        return 0 if counts.failed == 0 else 1
    finally:
        if prov is not None:
            prov.stop_all()
        if tmp is not None:
            tmp.cleanup()
            if prov is not None:  # the TVM roots of a throw-away state directory go with it
                shutil.rmtree(prov.tvm_root_dir, ignore_errors=True)
        elif state_dir:
            os.makedirs(state_dir, exist_ok=True)
