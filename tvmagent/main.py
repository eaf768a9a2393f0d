"""`tvm agent`: run one agent in the foreground until SIGTERM/SIGINT, then drain and exit 0.

systemd protocol (Type=notify): READY=1 once the first coordinator handshake succeeded (or after
READY_AFTER seconds of trying, so an unreachable coordinator at boot does not trip the start timeout
into a restart loop: the agent *is* up and retrying), STATUS= whenever the link or the task count
changes, STOPPING=1 on the first signal, WATCHDOG=1 from the same nursery as the main loops.
"""

from __future__ import annotations

import logging
import signal

import trio

from protocol.sdnotify import WatchdogPolicy, notify, watchdog_loop

from .agent import Agent, AgentOptions, AgentRejected

log = logging.getLogger("tvm.agent")

READY_AFTER = 30.0
STATUS_POLL = 0.5


def status_line(agent: Agent, url: str) -> str:
    """The one-line STATUS= text systemctl shows for this agent."""
    if agent.draining:
        return f"draining: {len(agent.running)} task(s) still running"
    if not agent.connected.is_set():
        return f"connecting to {url} (retrying with backoff)"
    tvm = f"backing {agent.tvm.tvm_name} of pool {agent.tvm.pool}" if agent.tvm else "free"
    return f"connected to {url} as {agent.agent_id}; {tvm}; {len(agent.running)} task(s) running"


async def _report_status(agent: Agent, url: str) -> None:
    """STATUS= on every change, READY=1 once (polled: cheap, and no hooks in the agent)."""
    ready = False
    last = ""
    deadline = trio.current_time() + READY_AFTER
    while True:
        line = status_line(agent, url)
        if not ready and (agent.connected.is_set() or trio.current_time() >= deadline):
            notify("READY=1", f"STATUS={line}")
            ready = True
            last = line
        elif line != last:
            notify(f"STATUS={line}")
            last = line
        await trio.sleep(STATUS_POLL)


async def run_agent(opts: AgentOptions) -> int:
    try:
        watchdog = WatchdogPolicy.from_env()
    except ValueError as exc:  # systemd (or a person) set WATCHDOG_USEC/WATCHDOG_PID to garbage
        log.error("cannot start: %s", exc)
        return 2
    agent = Agent(opts)
    result: list[int] = []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def _main() -> None:
                try:
                    await agent.run()
                except* AgentRejected as group:
                    log.error("giving up: %s", group.exceptions[0])
                    notify(f"STATUS=refused by the coordinator: {group.exceptions[0]}")
                    result.append(2)
                    nursery.cancel_scope.cancel()

            nursery.start_soon(_main)
            nursery.start_soon(watchdog_loop, watchdog)
            nursery.start_soon(_report_status, agent, opts.coordinator)
            async for signum in signals:
                log.info(
                    "signal %s: draining (grace %.0f s)",
                    signal.Signals(signum).name,
                    opts.drain_grace,
                )
                notify("STOPPING=1", f"STATUS=draining: {len(agent.running)} task(s) running")
                await agent.drain(opts.drain_grace)
                log.info("drained; exiting")
                nursery.cancel_scope.cancel()
                break
    return result[0] if result else 0
