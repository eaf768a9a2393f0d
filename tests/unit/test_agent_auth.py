"""Pure agent-identity decisions: enrolment in one handshake with the agent's own credential, join
tokens that expire or enrol one agent, proofs (forged, replayed, stale, other purpose), revocation,
the one-live-connection rule, and the requeue of placed tasks an agent does not report."""

from __future__ import annotations

from types import SimpleNamespace

from coordinator.common import models as m
from coordinator.core import CoordinatorState
from coordinator.runtime import agentident
from coordinator.runtime.agentauth import AgentAuth, agent_proof, token_hash
from protocol import LinkSession, coordinator_codec
from protocol import messages as pm

CRED = "c" * 43
NOW = 1_000_000.0


def _auth() -> tuple[AgentAuth, dict[str, str]]:
    store: dict[str, str] = {}
    return AgentAuth(store.get, store.__setitem__, token_hash("jt"), items=store.items), store


def _enrol(
    auth: AgentAuth,
    agent: str,
    token: str = "jt",
    cred: str = CRED,
    now: float = NOW,
    dt_ms: int = 0,
):  # noqa: ANN202
    t = int(now * 1000) + dt_ms
    return auth.authenticate(agent, token, agent_proof(cred, agent, t), t, now, cred)


def _prove(auth: AgentAuth, agent: str, cred: str = CRED, now: float = NOW, dt_ms: int = 1):  # noqa: ANN202
    t = int(now * 1000) + dt_ms
    return auth.authenticate(agent, "", agent_proof(cred, agent, t), t, now)


def test_enrolment_stores_the_agents_own_credential_in_the_first_handshake():
    auth, store = _auth()
    v = _enrol(auth, "a1")
    assert (v.ok, v.enrolled) == (True, True)
    assert store["agentcred:a1"] == f"ok:{CRED}"  # no pending state
    assert _prove(auth, "a1").ok
    # From now on neither the join token alone nor another credential opens a1.
    assert auth.authenticate("a1", "jt", "", 0, NOW).code == "InvalidAgentCredential"
    assert _enrol(auth, "a1", cred="x" * 43, dt_ms=5).code == "InvalidAgentCredential"
    assert store["agentcred:a1"] == f"ok:{CRED}"


def test_enrolment_needs_a_valid_token_a_credential_and_a_matching_proof():
    auth, store = _auth()
    assert _enrol(auth, "a1", token="jt-wrong").code == "InvalidJoinToken"
    assert _enrol(auth, "a1", cred="short").code == "InvalidAgentCredential"
    t = int(NOW * 1000)
    wrong_proof = auth.authenticate("a1", "jt", agent_proof("y" * 43, "a1", t), t, NOW, CRED)
    assert wrong_proof.code == "InvalidAgentCredential"
    assert "agentcred:a1" not in store  # nothing registered by a refused hello


def test_an_older_agent_without_a_credential_gets_one_confirmed_at_once():
    auth, store = _auth()
    assert _enrol(auth, "a1", token="jt-wrong", cred="").code == "InvalidJoinToken"
    v = auth.authenticate("a1", "jt", "", 0, NOW)
    assert (v.ok, v.enrolled) == (True, True)
    assert store["agentcred:a1"] == f"ok:{v.new_credential}"  # not "pending"
    assert auth.authenticate("a1", "jt", "", 0, NOW).code == "InvalidAgentCredential"
    assert _prove(auth, "a1", cred=v.new_credential).ok


def test_a_pending_credential_of_the_old_scheme_opens_only_with_its_proof():
    auth, store = _auth()
    store["agentcred:a1"] = f"pending:{CRED}"
    assert auth.authenticate("a1", "jt", "", 0, NOW).code == "InvalidAgentCredential"
    assert _enrol(auth, "a1", cred="z" * 43).code == "InvalidAgentCredential"
    assert store["agentcred:a1"] == f"pending:{CRED}"
    assert _prove(auth, "a1").ok
    assert store["agentcred:a1"] == f"ok:{CRED}"


def test_proofs_forged_replayed_stale_or_for_another_purpose_are_refused():
    auth, _ = _auth()
    assert _enrol(auth, "a1").ok
    t = int(NOW * 1000) + 10
    assert auth.authenticate("a1", "", "f" * 64, t, NOW).code == "InvalidAgentCredential"
    assert (
        auth.authenticate("a1", "", agent_proof(CRED, "a2", t), t, NOW).code
        == "InvalidAgentCredential"
    )
    http = agent_proof(CRED, "a1", t, "http")
    assert auth.authenticate("a1", "", http, t, NOW).code == "InvalidAgentCredential"
    assert auth.check_http_proof("a1", http, t, NOW)
    assert not auth.check_http_proof(
        "a1", agent_proof(CRED, "a1", t), t, NOW
    )  # a hello proof is not one
    assert auth.authenticate("a1", "", agent_proof(CRED, "a1", t), t, NOW).ok
    assert "replay" in auth.authenticate("a1", "", agent_proof(CRED, "a1", t), t, NOW).message
    old = int((NOW - 600) * 1000)
    assert (
        auth.authenticate("a1", "", agent_proof(CRED, "a1", old), old, NOW).code
        == "InvalidAgentCredential"
    )
    assert not auth.check_http_proof("a1", agent_proof(CRED, "a1", old, "http"), old, NOW)


def test_agent_tokens_expire_enrol_one_agent_and_can_be_revoked():
    auth, store = _auth()
    rec, once = auth.create_token(NOW, single_use=True)
    _, hour = auth.create_token(NOW, expires_in_s=3600)
    revoked_rec, revoked = auth.create_token(NOW)
    assert once.startswith("tvmjt.")
    assert rec.sha256 not in once
    assert once.rpartition(".")[2] not in str(store)  # only the secret's hash is kept
    assert _enrol(auth, "a1", token=once).ok
    assert _enrol(auth, "a2", token=once).code == "JoinTokenUsed"
    assert [t.used_by for t in auth.tokens() if t.id == rec.id] == ["a1"]
    assert _enrol(auth, "a3", token=hour, now=NOW + 3599).ok
    assert _enrol(auth, "a4", token=hour, now=NOW + 3600).code == "JoinTokenExpired"
    assert auth.revoke_token(revoked_rec.id)
    assert not auth.revoke_token(revoked_rec.id)
    assert _enrol(auth, "a5", token=revoked).code == "InvalidJoinToken"
    forged = once.rpartition(".")[0] + ".not-the-secret"
    assert _enrol(auth, "a6", token=forged).code == "InvalidJoinToken"
    assert {t.id for t in auth.tokens()} == {rec.id, _token_id(hour)}


def _token_id(token: str) -> str:
    return token.split(".")[1]


def test_revoked_agents_are_refused_even_with_token_and_proof():
    auth, _ = _auth()
    assert _enrol(auth, "a1").ok
    auth.revoke("a1")
    assert _prove(auth, "a1").code == "AgentRevoked"
    assert _enrol(auth, "a1", dt_ms=7).code == "AgentRevoked"
    t = int(NOW * 1000)
    assert not auth.check_http_proof("a1", agent_proof(CRED, "a1", t, "http"), t, NOW)
    assert not auth.known("a1")
    assert auth.revoked("a1")


# ------------------------------------------------------------------ one live connection per agent


def _svc(connected: bool, last_seen: float) -> SimpleNamespace:
    agent = SimpleNamespace(connected=connected, last_seen=last_seen)
    core = SimpleNamespace(agents={"a1": agent}, heartbeat_timeout=10.0)
    return SimpleNamespace(
        links={"a1": SimpleNamespace(connected=connected)}, core=core, agent_link_events={}
    )


def test_a_second_connection_is_refused_while_the_first_answers():
    svc = _svc(True, NOW - 1)
    assert agentident.second_connection(svc, "a1", NOW)[0] == "AgentAlreadyConnected"
    assert svc.agent_link_events == {"AgentAlreadyConnected": 1}
    # Silent for half a heartbeat timeout: presumed dead, the newcomer takes over (counted).
    svc = _svc(True, NOW - 6)
    assert agentident.second_connection(svc, "a1", NOW) is None
    assert svc.agent_link_events == {"ReplacedSilentLink": 1}
    assert agentident.second_connection(_svc(False, NOW), "a1", NOW) is None
    assert agentident.second_connection(_svc(True, NOW), "other", NOW) is None


def test_in_flight_runs_are_the_run_tasks_not_yet_acknowledged():
    session = LinkSession(coordinator_codec(), "s")
    spec = pm.TaskSpec(
        key="wi/j/t1", attempt=1, command_line="x", workitem="wi", job="j", task="t1"
    )
    session.send(pm.Ping())
    session.send(pm.RunTask(spec=spec))
    assert agentident.in_flight_runs(session) == {"wi/j/t1"}
    session.resume(2)  # the agent received both
    assert agentident.in_flight_runs(session) == set()


# ------------------------------------------------------------------ unreported placed tasks


class _Clock:
    def __call__(self) -> float:
        return NOW


def _core_with_task() -> tuple[CoordinatorState, str, pm.TaskSpec]:
    core = CoordinatorState("acct", clock=_Clock(), heartbeat_timeout=10.0)
    core.agent_hello(pm.Hello(agent_id="a0", token="t"))
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1))
    (tvm,) = core.tvms.values()
    core.agent_message("a0", pm.TvmReady(tvm_name=tvm.rec.name))
    core.add_workitem(
        m.WorkitemAdd(name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name="p"))
    )
    core.add_task("wi", "job-0000000001", m.TaskAdd(name="t1", command_line="run"))
    core.schedule()
    (spec,) = [s.msg.spec for s in core.take_effects().sends if isinstance(s.msg, pm.RunTask)]
    return core, tvm.rec.name, spec


def test_a_placed_task_the_agent_does_not_report_is_requeued_at_its_hello():
    core, tvm_name, spec = _core_with_task()
    core.agent_disconnected("a0")
    # The same session and TVM, but the task is neither running nor finished there: a ghost (the
    # connection that received it was not the real agent, or the run was lost).
    core.agent_hello(pm.Hello(agent_id="a0", token="t", session_id="s1", tvm_name=tvm_name))
    _, t = core.get_task("wi", "job-0000000001", "t1")
    assert (t.state, t.requeue_count, t.retry_count) == ("active", 1, 0)
    assert core.tvms[tvm_name].running == {}
    assert core.tvms[tvm_name].rec.state == "idle"


def test_reported_or_in_flight_tasks_stay_running():
    core, tvm_name, spec = _core_with_task()
    core.agent_hello(
        pm.Hello(agent_id="a0", token="t", session_id="s1", tvm_name=tvm_name), {spec.key}
    )
    assert core.get_task("wi", "job-0000000001", "t1")[1].state == "running"
    core.agent_hello(
        pm.Hello(
            agent_id="a0",
            token="t",
            session_id="s1",
            tvm_name=tvm_name,
            finished=[pm.RunningTask(key=spec.key, attempt=spec.attempt)],
        )
    )
    _, t = core.get_task("wi", "job-0000000001", "t1")
    assert (t.state, t.requeue_count) == ("running", 0)
