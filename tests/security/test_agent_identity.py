"""Agent identity under attack, with a real coordinator, real agent processes and hand-written
rogue clients (tests/security/rogue_agent.py): enrolment tokens, taking over an agent id, a stolen
credential's ghost tasks, revocation, and a second connection for a live agent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx2
import pytest
import trio
from trio_websocket import ConnectionClosed

from coordinator.client import BatchError, task_spec
from coordinator.runtime.agentauth import agent_proof
from protocol import LinkSession, agent_codec
from protocol import messages as pm
from tests.harness import agent_env, cluster_ctx
from tests.security.rogue_agent import handshake, hello, new_credential, rogue_link

PY = sys.executable
JOB = "job-0000000001"


async def _task(c, wi: str, name: str):  # noqa: ANN001, ANN202 - harness cluster, client model
    return await c.client.tasks.get(wi, JOB, name)


def _assert_rejected(reply: pm.Msg, code: str) -> None:
    assert isinstance(reply, pm.Reject), reply
    assert reply.code == code, reply


def _credential(agent) -> str:  # noqa: ANN001 - harness AgentProc
    with open(
        os.path.join(agent.root + ".private", "agent-credential")
    ) as f:  # the agent's private dir
        return f.read().strip()


async def test_rogue_enrolment_with_an_expired_used_or_revoked_token_fails(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=5) as c:
        url = c.rc.agent_url
        once = await c.client.agents.create_token(single_use=True)
        short = await c.client.agents.create_token(expires_in="PT1S")
        revoked = await c.client.agents.create_token()
        assert once.token
        assert once.single_use
        assert not short.single_use
        assert short.expiry_time
        with pytest.raises(BatchError) as ei:
            await c.client.agents.create_token(expires_in="PT0S")
        assert (ei.value.status, ei.value.code) == (400, "InvalidPropertyValue")
        # The single-use token enrols one agent (a real agent process, which then runs a task
        # whose resource file comes from the file store with its own credential)...
        real = c.start_agent("real", token=once.token)
        await c.pool_with_tvms("p", 1)
        blob = await c.client.files.upload(b"payload")
        await c.client.workitems.add("wi", "p")
        rf = [pm_resource(blob["blobSource"])]
        await c.client.tasks.add_many(
            "wi",
            JOB,
            [task_spec("t", f"{PY} -c \"print(open('data').read())\"", resource_files=rf)],
        )
        assert (await c.client.tasks.wait("wi", JOB, timeout=30)).failed == 0
        # ... and no other.
        reply = await handshake(
            url, hello("rogue-1", token=once.token, credential=new_credential())
        )
        _assert_rejected(reply, "JoinTokenUsed")
        tokens = {t.id: t for t in await c.client.agents.list_tokens()}
        assert tokens[once.id].used_by == "real"
        assert not tokens[once.id].token  # no secret in lists
        await trio.sleep(1.2)  # the short token's lifetime
        reply = await handshake(
            url, hello("rogue-2", token=short.token, credential=new_credential())
        )
        _assert_rejected(reply, "JoinTokenExpired")
        await c.client.agents.revoke_token(revoked.id)
        reply = await handshake(
            url, hello("rogue-3", token=revoked.token, credential=new_credential())
        )
        _assert_rejected(reply, "InvalidJoinToken")
        with pytest.raises(BatchError) as ei:
            await c.client.agents.revoke_token(revoked.id)
        assert (ei.value.status, ei.value.code) == (404, "AgentTokenNotFound")
        # None of the rogues got in; the real agent still works.
        assert {a for a in c.rc.service.core.agents} == {"real"}
        assert real.proc.poll() is None


def pm_resource(blob_source: str):  # noqa: ANN201 - REST model
    from coordinator.common import models as m

    return m.ResourceFile(blob_source=blob_source, file_path="data")


async def test_an_agent_cannot_be_taken_over_with_the_join_token_alone(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=5) as c:
        await c.pool_with_tvms("p", 1)
        agent = c.agents[0]
        url, token = c.rc.agent_url, c.rc.join_token
        # The agent connected once and never again: under a two-step enrolment its credential is
        # still "pending" here. Neither the join token alone nor a credential of the attacker's opens it.
        for attempt in (
            hello(agent.name, token=token),
            hello(agent.name, token=token, credential=new_credential()),
        ):
            reply = await handshake(url, attempt)
            _assert_rejected(reply, "InvalidAgentCredential")
        # The real agent keeps its TVM and keeps working.
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add_many("wi", JOB, [task_spec("t", f"{PY} -c pass")])
        assert (await c.client.tasks.wait("wi", JOB, timeout=30)).failed == 0
        assert agent.proc.poll() is None
        assert "giving up" not in agent.log_text()
        assert [t.agent_id for t in await c.client.tvms.list("p")] == [agent.name]


async def test_a_stolen_credentials_ghost_task_is_requeued_and_completes_on_the_real_agent(
    nursery, tmp_path
):
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=20) as c:
        await c.pool_with_tvms("p", 1)
        agent = c.agents[0]
        stolen = _credential(agent)
        tvm_name = (await c.client.tvms.list("p"))[0].name
        agent.kill(signal.SIGKILL)  # the real agent is down (a reboot); its TVM waits for it
        agent.proc.wait()
        await c.wait_for(
            lambda: not c.rc.service.links[agent.name].connected, what="the agent's link closed"
        )
        session = LinkSession(agent_codec())
        async with rogue_link(
            c.rc.agent_url, hello(agent.name, credential=stolen, offer=False), session
        ) as imp:
            await imp.pump(lambda m: isinstance(m, pm.JoinPool))
            await c.client.workitems.add("wi", "p")
            await c.client.tasks.add_many("wi", JOB, [task_spec("t", f"{PY} -c print(42)")])
            run = await imp.pump(lambda m: isinstance(m, pm.RunTask))
            assert (
                run.spec.task == "t"
            )  # the impostor got it, acknowledged it, and will never report it
        assert (await _task(c, "wi", "t")).state == "running"
        # The impostor comes back on the same session as the TVM's agent, reporting nothing.
        back = hello(
            agent.name,
            credential=stolen,
            offer=False,
            session_id=session.session_id,
            last_received=session.received,
            tvm_name=tvm_name,
        )
        async with rogue_link(c.rc.agent_url, back, session) as imp:
            assert imp.welcome.resumed
            await c.wait_for(lambda: _requeued(c, "t"), what="the ghost task requeued")
        # The real agent comes back and runs it.
        c.start_agent(agent.name, root=agent.root)
        assert (await c.client.tasks.wait("wi", JOB, timeout=30)).failed == 0
        t = await _task(c, "wi", "t")
        assert t.execution_info.exit_code == 0
        assert t.execution_info.requeue_count >= 1
        assert t.execution_info.retry_count == 0


async def _requeued(c, name: str) -> bool:  # noqa: ANN001 - harness cluster
    return (await _task(c, "wi", name)).execution_info.requeue_count >= 1


async def _fetch(c, sha256: str, agent_id: str, cred: str) -> int:  # noqa: ANN001 - harness cluster
    t = int(time.time() * 1000)
    headers = {
        "X-TVM-Agent-Id": agent_id,
        "X-TVM-Agent-Proof-Time": str(t),
        "X-TVM-Agent-Proof": agent_proof(cred, agent_id, t, "http"),
    }
    async with httpx2.AsyncClient() as h:
        return (await h.get(f"{c.rc.endpoint}/files/sha256/{sha256}", headers=headers)).status_code


async def test_revocation_closes_the_link_at_once_and_requeues_its_tasks(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=20) as c:
        cred = new_credential()
        async with rogue_link(
            c.rc.agent_url, hello("rogue", token=c.rc.join_token, credential=cred)
        ) as rogue:
            await c.client.pools.add("p", target_dedicated=1)
            await rogue.pump(lambda m: isinstance(m, pm.JoinPool))
            await c.client.workitems.add("wi", "p")
            await c.client.tasks.add_many("wi", JOB, [task_spec("t", f"{PY} -c pass")])
            await rogue.pump(lambda m: isinstance(m, pm.RunTask))
            blob = await c.client.files.upload(b"secret input")
            assert (
                await _fetch(c, blob["sha256"], "rogue", cred) == 200
            )  # an agent's own credential
            await c.client.agents.revoke("rogue")
            # Closed by the coordinator (not by a heartbeat timeout, which is 20 s here).
            with pytest.raises(ConnectionClosed) as ei, trio.fail_after(5):
                await rogue.pump(lambda m: False)
            assert ei.value.reason.code == 4003
        assert (
            await _fetch(c, blob["sha256"], "rogue", cred) == 401
        )  # nor the file store (no SharedKey either)
        t = await _task(c, "wi", "t")
        assert t.state == "active"
        assert t.execution_info.requeue_count == 1
        reply = await handshake(c.rc.agent_url, hello("rogue", credential=cred, offer=False))
        _assert_rejected(reply, "AgentRevoked")
        c.start_agent("real")
        assert (await c.client.tasks.wait("wi", JOB, timeout=30)).failed == 0
        assert (await _task(c, "wi", "t")).execution_info.retry_count == 0


async def test_a_second_connection_is_refused_while_the_first_is_alive(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=5) as c:
        await c.pool_with_tvms("p", 1)
        agent = c.agents[0]
        stolen = _credential(agent)
        reply = await handshake(c.rc.agent_url, hello(agent.name, credential=stolen, offer=False))
        _assert_rejected(reply, "AgentAlreadyConnected")
        # The real agent's link was not displaced: it still runs tasks; the refusal is counted.
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add_many("wi", JOB, [task_spec("t", f"{PY} -c pass")])
        assert (await c.client.tasks.wait("wi", JOB, timeout=30)).failed == 0
        assert c.rc.service.links[agent.name].connection_id == 1
        metrics = await c.client.ops.metrics()
        assert 'tvm_agent_link_events_total{event="AgentAlreadyConnected"} 1' in metrics


async def test_two_simultaneous_hellos_for_one_agent_id_are_not_both_welcomed(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=0, heartbeat_timeout=5) as c:
        url = c.rc.agent_url
        cred = new_credential()
        first = await handshake(url, hello("twin", token=c.rc.join_token, credential=cred))
        assert isinstance(first, pm.Welcome), first
        await c.wait_for(
            lambda: "twin" not in c.rc.service.handshaking, what="first handshake done"
        )
        await c.wait_for(
            lambda: "twin" not in c.rc.service.links or not c.rc.service.links["twin"].connected,
            what="first link closed",
        )
        # Two hellos for the disconnected id at the same moment, each with a valid proof of its own
        # (distinct times: proofs are never reused). Both pass authentication and wait for the same
        # commit; without a marker for the handshake in progress both would be welcomed.
        t = int(time.time() * 1000)
        replies: list[pm.Msg] = []

        async def one(dt: int) -> None:
            proof = agent_proof(cred, "twin", t + dt)
            replies.append(
                await handshake(
                    url, pm.Hello(agent_id="twin", token="", proof=proof, proof_time=t + dt)
                )
            )

        async with trio.open_nursery() as both:
            both.start_soon(one, 1)
            both.start_soon(one, 2)
        welcomed = [r for r in replies if isinstance(r, pm.Welcome)]
        refused = [r for r in replies if isinstance(r, pm.Reject)]
        assert len(welcomed) == 1, replies
        # Which one loses depends on arrival order: the later proof time first makes the other a
        # replay; otherwise the handshake in progress refuses it.
        assert [r.code for r in refused] in (["AgentAlreadyConnected"], ["InvalidAgentCredential"])
        # The rule itself, deterministically: a hello while one of the same id is being set up.
        await c.wait_for(lambda: "twin" not in c.rc.service.handshaking, what="handshake done")
        c.rc.service.handshaking.add("twin")
        try:
            reply = await handshake(url, hello("twin", credential=cred, offer=False))
        finally:
            c.rc.service.handshaking.discard("twin")
        _assert_rejected(reply, "AgentAlreadyConnected")


def _tvm_cli(c, *args: str) -> subprocess.CompletedProcess[str]:  # noqa: ANN001 - harness cluster
    env = agent_env(
        {"TVM_ENDPOINT": c.rc.endpoint, "TVM_ACCOUNT": c.rc.account, "TVM_KEY": c.rc.key}
    )
    return subprocess.run(
        [PY, "-m", "coordinator.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


async def test_token_cli_creates_lists_and_revokes(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path) as c:

        def work() -> None:
            made = _tvm_cli(c, "token", "create", "--expires", "PT1H", "--single-use", "-o", "json")
            assert made.returncode == 0, made.stderr
            tok = json.loads(made.stdout)
            assert tok["token"].startswith("tvmjt.")
            assert tok["singleUse"] is True
            listed = _tvm_cli(c, "token", "list", "-o", "json")
            assert [t["id"] for t in json.loads(listed.stdout)] == [tok["id"]]
            assert tok["token"] not in listed.stdout
            bad = _tvm_cli(c, "token", "create", "--expires", "one hour")
            assert bad.returncode != 0
            assert "expiresIn" in bad.stderr
            assert _tvm_cli(c, "token", "revoke", tok["id"]).returncode == 0
            assert json.loads(_tvm_cli(c, "token", "list", "-o", "json").stdout) == []

        await trio.to_thread.run_sync(work)
