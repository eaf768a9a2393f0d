"""Watching agent processes the coordinator started itself (the local provisioner): an agent whose
process ended is gone for good, so its TVM is lost at once (`core.agent_exited`), not after the
link grace or the heartbeat timeout."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from .service import CoordinatorService

log = logging.getLogger("tvm.coordinator")

POLL_INTERVAL = 0.5  # a waitpid(WNOHANG) per agent: cheap, and well inside the 10 s promise


async def watch_agent_processes(service: CoordinatorService) -> None:
    while True:
        await trio.sleep(POLL_INTERVAL)
        exited = getattr(service.provisioner, "exited", None)
        if exited is None:
            continue
        gone: list[tuple[str, str]] = exited()
        if not gone:
            continue
        for agent_id, why in gone:
            agent = service.core.agents.get(agent_id)
            tvm = agent.tvm if agent is not None else None
            log.warning(
                "agent %s: %s%s",
                agent_id,
                why,
                f"; {tvm} is lost (tasks requeued)" if tvm else "",
                extra={"tvm": tvm} if tvm else None,
            )
            service.core.agent_exited(agent_id, why)
        service.core.schedule()
        service._dispatch(service.core.take_effects())
