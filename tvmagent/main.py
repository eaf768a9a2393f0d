"""`tvm agent`: run one agent in the foreground until SIGTERM/SIGINT, then drain and exit 0."""

from __future__ import annotations

import logging
import signal

import trio

from .agent import Agent, AgentOptions, AgentRejected
from .sdnotify import WatchdogPolicy, notify, watchdog_loop

log = logging.getLogger("tvm.agent")


async def run_agent(opts: AgentOptions) -> int:
    agent = Agent(opts)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def _main() -> None:
                try:
                    await agent.run()
                except* AgentRejected as group:
                    log.error("giving up: %s", group.exceptions[0])
                    result.append(2)
                    nursery.cancel_scope.cancel()

            result: list[int] = []
            nursery.start_soon(_main)
            nursery.start_soon(watchdog_loop, WatchdogPolicy.from_env())

            async def _ready() -> None:
                await agent.connected.wait()
                notify("READY=1", f"STATUS=connected to {opts.coordinator} as {agent.agent_id}")

            nursery.start_soon(_ready)
            async for signum in signals:
                log.info("signal %s: draining (grace %.0f s)", signal.Signals(signum).name, opts.drain_grace)
                notify("STOPPING=1")
                await agent.drain(opts.drain_grace)
                nursery.cancel_scope.cancel()
                break
    return result[0] if result else 0
