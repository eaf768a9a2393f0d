"""Watching agent processes the coordinator started itself (the local provisioner): an agent whose
process ended is gone for good, so its TVM is lost at once (`core.agent_exited`), not after the
link grace or the heartbeat timeout. And the other way round: a provisioned agent the core retired
(its TVM lost and replaced: core/healing.py) is stopped through its provisioner."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from coordinator.core import Retire

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


def retire_agents(service: CoordinatorService, retires: list[Retire]) -> None:
    """Have the provisioner stop each retired agent (`retire(name, reason)` must not block: the
    local provisioner kills the process group, a per-pool plugin stops it from its own loop), and
    close its link should it be connected."""
    retire = getattr(service.provisioner, "retire", None)
    for r in retires:
        log.warning("agent %s retired: %s", r.agent_id, r.reason)
        link = service.links.get(r.agent_id)
        if link is not None and link.connected:
            link.close_request = (4003, r.reason)
            link.poke()
        if retire is None:
            continue
        try:
            retire(r.agent_id, r.reason)
        except Exception:  # a broken provisioner must not take the coordinator down
            log.exception("provisioner failed to stop retired agent %s", r.agent_id)
