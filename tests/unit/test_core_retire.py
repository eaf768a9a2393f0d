"""Retiring a provisioned agent whose TVM was lost and left its pool, in the pure core: the core
asks the shell to stop it (`Retire`), forgets it and refuses it should it come back, while the
pool's replacement comes from the provisioner. A hand-started agent (no provisioner can stop it)
keeps the old behaviour: it stays, and is a free agent again when it comes back. Fake clock, no
sockets."""

from __future__ import annotations

from coordinator.common import models as m
from coordinator.core import CoordinatorState, Provision, Retire
from coordinator.core.records import Tvm
from protocol import messages as pm

GIB = 1024**3


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _core(agents: list[str], provisioned: list[str]) -> tuple[CoordinatorState, Clock]:
    clock = Clock()
    core = CoordinatorState("acct", clock=clock, heartbeat_timeout=10.0)
    core.provisioning_enabled = True
    core.link_grace = 1.0
    core.agents_started(provisioned)  # the shell tells what its provisioner started
    for a in agents:
        core.agent_hello(pm.Hello(agent_id=a, token="t", disk_bytes=10 * GIB))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=len(agents), unknown_tvm_timeout="PT5S"))
    for tvm in core.tvms.values():
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.take_effects()
    return core, clock


def _tvm_of(core: CoordinatorState, agent: str) -> Tvm:
    return next(t for t in core.tvms.values() if t.rec.agent_id == agent)


def _advance(core: CoordinatorState, clock: Clock, seconds: float, silent: str) -> None:
    """Let `seconds` pass in steps, every agent but `silent` heartbeating."""
    end = clock.now + seconds
    while clock.now < end:
        clock.now = min(end, clock.now + 0.5)
        for a in list(core.agents.values()):
            if a.agent_id != silent and a.connected:
                core.agent_message(a.agent_id, pm.Heartbeat())
        core.tick()


def _lose_and_expire(core: CoordinatorState, clock: Clock, agent: str) -> tuple[str, list[Retire]]:
    """The agent falls silent (SIGSTOP): its TVM goes `unknown`, then leaves the pool."""
    tvm = _tvm_of(core, agent).rec.name
    retired: list[Retire] = []
    provision: list[Provision] = []
    end = clock.now + 10.0 + 5.0 + 2.0  # heartbeat timeout + unknownTvmTimeout + a tick or two
    while clock.now < end:
        _advance(core, clock, 0.5, agent)
        fx = core.take_effects()
        retired += fx.retire
        provision += fx.provision
    assert tvm not in core.tvms
    assert provision == [Provision(count=1, vm_size="small", pool="p")]
    return tvm, retired


def test_a_provisioned_agent_whose_tvm_left_the_pool_is_retired() -> None:
    core, clock = _core(["local-0", "local-1"], ["local-0", "local-1"])
    tvm, retired = _lose_and_expire(core, clock, "local-0")
    (r,) = retired
    assert r.agent_id == "local-0"
    assert r.reason == (
        f"AgentRetired: its TVM {tvm} was lost (HeartbeatTimeout) and left pool p;"
        " a new agent takes its place"
    )
    assert "local-0" not in core.agents  # not counted as free, not given to a pool
    assert core.retired_reason("local-0") == r.reason
    assert core.retired_reason("local-1") == ""
    # The replacement the provisioner starts joins; the retired agent is not taken back.
    core.agents_started(["local-2"])
    core.agent_hello(pm.Hello(agent_id="local-2", token="t"))
    assert _tvm_of(core, "local-2").rec.pool == "p"
    assert len(core.pool_tvms("p")) == 2
    assert not core.take_effects().retire  # retired once


def test_an_agent_of_a_named_provisioner_is_retired_too() -> None:
    clock = Clock()
    core = CoordinatorState("acct", clock=clock, heartbeat_timeout=10.0)
    core.provisioning_enabled = True
    # Its agents are known by their names (`ssh-...`): the shell is told of no start.
    core.store.provisioner_names = frozenset({"ssh"})
    core.store.default_provisioner = "ssh"
    for a in ("ssh-0-aa", "ssh-1-bb"):
        core.agent_hello(pm.Hello(agent_id=a, token="t"))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=2, unknown_tvm_timeout="PT5S"))
    for tvm in core.tvms.values():
        core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
    core.take_effects()
    _, retired = _lose_and_expire(core, clock, "ssh-0-aa")
    assert [r.agent_id for r in retired] == ["ssh-0-aa"]


def test_a_hand_started_agent_is_not_retired_and_is_free_when_it_comes_back() -> None:
    core, clock = _core(["a0", "local-1"], ["local-1"])
    tvm, retired = _lose_and_expire(core, clock, "a0")
    assert retired == []
    assert core.retired_reason("a0") == ""
    assert "a0" in core.agents
    # It comes back (SIGCONT): told to wipe the TVM that no longer exists, then a free agent.
    core.agent_hello(pm.Hello(agent_id="a0", token="t", session_id="old", tvm_name=tvm))
    fx = core.take_effects()
    assert any(
        s.agent_id == "a0" and isinstance(s.msg, pm.LeavePool) and s.msg.tvm_name == tvm
        for s in fx.sends
    )
    agent = core.agents["a0"]
    assert agent.connected
    # The pool already asked the provisioner for its replacement; the returning agent fills the
    # gap meanwhile (today's behaviour for hand-started agents).
    assert agent.tvm is not None
    assert core.tvms[agent.tvm].rec.pool == "p"


def test_a_provisioned_agent_back_before_its_tvm_left_is_not_retired() -> None:
    core, clock = _core(["local-0", "local-1"], ["local-0", "local-1"])
    tvm = _tvm_of(core, "local-0")
    _advance(core, clock, 12.0, "local-0")
    assert tvm.rec.state == "unknown"
    core.agent_hello(pm.Hello(agent_id="local-0", token="t", session_id="s", tvm_name=tvm.rec.name))
    _advance(core, clock, 10.0, "")
    assert tvm.rec.name in core.tvms
    assert tvm.rec.state == "idle"
    assert not core.take_effects().retire
    assert core.retired_reason("local-0") == ""


def test_an_agent_killed_outright_is_not_retired() -> None:
    # Its process is gone already (the provisioner saw it exit): nothing to stop.
    core, clock = _core(["local-0", "local-1"], ["local-0", "local-1"])
    core.agent_exited("local-0", "its process 123 was killed by signal 9")
    _, retired = _lose_and_expire(core, clock, "local-0")
    assert retired == []
    assert core.retired_reason("local-0") == ""


def test_a_name_started_again_is_a_new_agent() -> None:
    core, clock = _core(["local-0", "local-1"], ["local-0", "local-1"])
    _lose_and_expire(core, clock, "local-0")
    assert core.retired_reason("local-0")
    core.agents_started(["local-0"])  # a provisioner that reuses names
    assert core.retired_reason("local-0") == ""
