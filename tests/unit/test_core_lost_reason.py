"""The reason a lost TVM gives says how long its agent was really away: the link grace when its
link closed in a running coordinator, the whole recovery window after a restart."""

from __future__ import annotations

from coordinator.common import models as m
from coordinator.core import CoordinatorState
from protocol import messages as pm


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _core() -> tuple[CoordinatorState, Clock]:
    clock = Clock()
    core = CoordinatorState("acct", clock=clock, heartbeat_timeout=30.0)
    for i in range(2):
        core.agent_hello(pm.Hello(agent_id=f"a{i}", token="t"))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=2))
    for tvm in core.tvms.values():
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.link_grace = 3.0
    core.take_effects()
    return core, clock


def _reason(core: CoordinatorState, agent: str) -> str:
    (tvm,) = [t for t in core.tvms.values() if t.rec.agent_id == agent]
    assert tvm.rec.state == "unknown"
    return tvm.rec.state_reason or ""


def test_a_link_closed_while_running_names_the_grace() -> None:
    core, clock = _core()
    core.agent_disconnected("a0")
    clock.now += 3.0
    core.agent_message("a1", pm.Heartbeat())
    core.tick()
    assert _reason(core, "a0") == (
        "AgentLinkLost: the agent's link closed and was not back within 3 s"
    )


def test_an_agent_missing_after_a_restart_names_the_time_it_had() -> None:
    core, clock = _core()
    core.recovering_until = clock.now + 30.0  # as Store.restore leaves it
    for a in core.agents.values():
        a.connected = False
        a.disconnected_at = clock.now
    core.agent_hello(pm.Hello(agent_id="a1", token="t"))
    clock.now += 29.9
    core.agent_message("a1", pm.Heartbeat())
    core.tick()
    (tvm,) = [t for t in core.tvms.values() if t.rec.agent_id == "a0"]
    assert tvm.rec.state == "idle"  # still inside the recovery window
    clock.now += 0.5  # the next tick ends the window and finds a0 still away
    core.agent_message("a1", pm.Heartbeat())
    core.tick()
    assert _reason(core, "a0") == (
        "AgentLinkLost: the agent's link closed and was not back within 30.4 s"
    )
