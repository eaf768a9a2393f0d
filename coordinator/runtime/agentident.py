"""Agent identity decisions of the link endpoint: one live connection per agent id, none for a
retired agent, and which placed tasks are still on their way to an agent (the rest of what it
does not report is requeued).

Kept apart from `links.py`/`service.py` so the rules read in one place and are unit-testable.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import msgspec

from protocol import LinkSession
from protocol import messages as pm

if TYPE_CHECKING:
    from .service import CoordinatorService

log = logging.getLogger("tvm.links")
_run_task = msgspec.msgpack.Decoder(pm.RunTask)


def live_link_silence(svc: CoordinatorService, agent_id: str, now: float) -> float | None:
    """Seconds since the agent's current link was last heard from, or None if it has no link."""
    link = svc.links.get(agent_id)
    agent = svc.core.agents.get(agent_id)
    if link is None or not link.connected or agent is None or not agent.connected:
        return None
    return max(0.0, now - agent.last_seen)


def retired(svc: CoordinatorService, agent_id: str) -> tuple[str, str] | None:
    """An agent retired after its TVM was lost and replaced (core/healing.py) is refused for good:
    it exits with the reason in its log instead of staying on as a free agent nobody asked for."""
    why = svc.core.retired_reason(agent_id)
    if not why:
        return None
    count(svc, "AgentRetired")
    log.warning("agent %s refused: retired (%s)", agent_id, why)
    return ("AgentRetired", why.partition(": ")[2] or why)


def second_connection(svc: CoordinatorService, agent_id: str, now: float) -> tuple[str, str] | None:
    """A new, authenticated hello for `agent_id`: None to accept it, else (code, message) to refuse.

    While the agent's current link is answering (heard from within half the heartbeat timeout;
    agents heartbeat four times per timeout and the coordinator pings) the newcomer is refused, so
    a stolen credential cannot silently take a working agent's TVM. A link silent for longer is
    presumed dead (a half-open TCP connection after a network break) and the newcomer takes over;
    the old connection ends because the session moves to the new one."""
    silent = live_link_silence(svc, agent_id, now)
    if silent is None:
        return None
    if silent < svc.core.heartbeat_timeout / 2:
        count(svc, "AgentAlreadyConnected")
        log.error(
            "SECOND CONNECTION refused for agent %s: its current link is alive (heard %.1f s ago); "
            "if this agent did not restart, someone else holds its credential (revoke it)",
            agent_id,
            silent,
        )
        return (
            "AgentAlreadyConnected",
            f"agent {agent_id!r} is already connected and answering; try again once that link is closed",
        )
    count(svc, "ReplacedSilentLink")
    log.warning("agent %s: a new connection replaces its link, silent for %.1f s", agent_id, silent)
    return None


def count(svc: CoordinatorService, code: str) -> None:
    svc.agent_link_events[code] = svc.agent_link_events.get(code, 0) + 1


def in_flight_runs(session: LinkSession) -> set[str]:
    """Keys of RunTask messages the agent has not received yet (they are resent on this session)."""
    keys = set()
    for data in session.pending():
        try:
            keys.add(_run_task.decode(data).spec.key)
        except msgspec.DecodeError:
            continue  # another message type
    return keys


def concurrent_handshake(svc: CoordinatorService, agent_id: str) -> tuple[str, str]:
    """Refusal of a hello that arrives while another accepted hello of the same agent id is still
    being set up: whichever came second loses, as a second connection would."""
    count(svc, "AgentAlreadyConnected")
    log.error(
        "SECOND CONNECTION refused for agent %s: another connection of it is being set up; "
        "if this agent did not restart twice, someone else holds its credential (revoke it)",
        agent_id,
    )
    return (
        "AgentAlreadyConnected",
        f"another connection of agent {agent_id!r} is being set up; try again once it is done",
    )
