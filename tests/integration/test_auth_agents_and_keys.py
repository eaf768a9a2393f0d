"""Client keys (rotation, stale requests) and agent authentication (hashed join token, per-agent
HMAC credential, replay, revocation, TLS, oversized frames)."""

from __future__ import annotations

import os
import sqlite3
import ssl
import stat
import time
from email.utils import formatdate

import httpx2
import pytest
import trio
import trustme
from trio_websocket import ConnectionClosed, open_websocket_url

from coordinator.client import AsyncClient, BatchError, task_spec
from coordinator.common.sharedkey import sign_request
from coordinator.daemon.server import run_coordinator
from coordinator.runtime.agentauth import agent_proof
from protocol import SUBPROTOCOL, coordinator_codec
from protocol import messages as pm
from tests.harness import cluster_ctx

PY = "/usr/bin/python3"
_codec = coordinator_codec()


def _meta(state_dir: str, key: str) -> str | None:
    db = sqlite3.connect(os.path.join(state_dir, "coordinator.db"))
    try:
        row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None
    finally:
        db.close()


# ------------------------------------------------------------------ client keys


async def test_key_rotation_keeps_the_other_key_working(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path) as c:
        ep, acct = c.rc.endpoint, c.rc.account
        old_primary = c.rc.key
        keys = await c.client.account_keys.regenerate("secondary")
        assert keys.primary == old_primary
        assert keys.secondary
        async with AsyncClient(ep, acct, keys.secondary) as second:
            assert await second.pools.list() == []
        keys2 = await c.client.account_keys.regenerate("primary")  # signed with the old primary
        assert keys2.primary != old_primary
        assert keys2.secondary == keys.secondary
        with pytest.raises(BatchError) as ei:
            await c.client.pools.list()  # the old primary is gone
        assert (ei.value.status, ei.value.code) == (403, "AuthenticationFailed")
        async with AsyncClient(ep, acct, keys2.primary) as first:
            with pytest.raises(BatchError) as ei:
                await first.account_keys.regenerate("tertiary")
            assert (ei.value.status, ei.value.code) == (400, "InvalidPropertyValue")
    async with cluster_ctx(nursery, tmp_path) as c:  # rotated keys are durable
        assert c.rc.service.keys == [keys2.primary, keys2.secondary]


async def _signed_get(ep: str, acct: str, key: str, age_s: float) -> httpx2.Response:
    headers = {"ocp-date": formatdate(time.time() - age_s, usegmt=True)}
    sign_request("GET", "/pools", "", headers, acct, key)
    async with httpx2.AsyncClient() as h:
        return await h.get(ep + "/pools", headers=headers)


async def test_requests_older_or_newer_than_15_minutes_are_refused(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path) as c:
        ep, acct, key = c.rc.endpoint, c.rc.account, c.rc.key
        assert (await _signed_get(ep, acct, key, 14 * 60)).status_code == 200
        for age in (16 * 60, -16 * 60):
            r = await _signed_get(ep, acct, key, age)
            assert r.status_code == 403
            assert r.json()["code"] == "RequestTooOld"


# ------------------------------------------------------------------ agent credential


async def _hello(url: str, hello: pm.Hello) -> pm.Msg:
    async with open_websocket_url(url, subprotocols=[SUBPROTOCOL]) as ws:
        await ws.send_message(_codec.encode(hello))
        return _codec.decode_handshake(await ws.get_message())


async def test_join_token_is_stored_hashed_and_agents_get_a_credential(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=3) as c:
        state = os.path.join(str(tmp_path), "state")
        token = c.rc.join_token
        assert _meta(state, "join_token_plain") in (None, "")
        with open(os.path.join(state, "coordinator.db"), "rb") as f:  # noqa: ASYNC230 - small local file
            assert token.encode() not in f.read()
        assert stat.S_IMODE(os.stat(os.path.join(state, "join-token")).st_mode) == 0o600
        agent = c.agents[0]
        cred_file = os.path.join(
            agent.root + ".private", "agent-credential"
        )  # outside the TVM root
        await c.wait_for(lambda: os.path.exists(cred_file), what="agent credential")
        assert stat.S_IMODE(os.stat(cred_file).st_mode) == 0o600
        agent_id = agent.name  # the harness passes --name
        # The agent's own credential is registered by its first handshake (no pending state).
        await c.wait_for(
            lambda: (_meta(state, f"agentcred:{agent_id}") or "").startswith("ok:"),
            what="credential registered",
        )
        cred = open(cred_file).read().strip()  # noqa: ASYNC230, SIM115 - small local file
        assert _meta(state, f"agentcred:{agent_id}") == f"ok:{cred}"
        # One connection per agent: the real agent stops so the proofs below can open links. The
        # credential is durable before the link is registered: wait for the link before killing.
        await c.wait_for(
            lambda: agent_id in c.rc.service.links and c.rc.service.links[agent_id].connected,
            what="the agent's link",
        )
        agent.kill()
        agent.proc.wait()
        await c.wait_for(
            lambda: not c.rc.service.links[agent_id].connected, what="the agent's link closed"
        )
        url = c.rc.agent_url
        # The join token alone no longer opens this agent id (a stolen token cannot take it over).
        reply = await _hello(url, pm.Hello(agent_id=agent_id, token=token))
        assert isinstance(reply, pm.Reject)
        assert reply.code == "InvalidAgentCredential"
        # A forged proof is refused; so is a replay of an accepted one.
        t = int(time.time() * 1000)
        reply = await _hello(
            url, pm.Hello(agent_id=agent_id, token="", proof="0" * 64, proof_time=t)
        )
        assert isinstance(reply, pm.Reject)
        assert reply.code == "InvalidAgentCredential"
        good = pm.Hello(
            agent_id=agent_id, token="", proof=agent_proof(cred, agent_id, t), proof_time=t
        )
        assert isinstance(await _hello(url, good), pm.Welcome)
        replay = await _hello(url, good)
        assert isinstance(replay, pm.Reject)
        assert "replay" in replay.message
        stale_t = int((time.time() - 600) * 1000)
        stale = await _hello(
            url,
            pm.Hello(
                agent_id=agent_id,
                token="",
                proof_time=stale_t,
                proof=agent_proof(cred, agent_id, stale_t),
            ),
        )
        assert isinstance(stale, pm.Reject)
        assert stale.code == "InvalidAgentCredential"
        # A forged join token for a new agent id.
        reply = await _hello(url, pm.Hello(agent_id="intruder", token=token + "x"))
        assert isinstance(reply, pm.Reject)
        assert reply.code == "InvalidJoinToken"
        assert (await c.client.pools.list()) == []  # the server keeps serving


async def test_revoked_agent_is_disconnected_and_refused(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, agents=1, heartbeat_timeout=2) as c:
        await c.pool_with_tvms("p", 1)
        agent = c.agents[0]
        agent_id = agent.name
        with pytest.raises(BatchError) as ei:
            await c.client.agents.revoke("no-such-agent")
        assert (ei.value.status, ei.value.code) == (404, "AgentNotFound")
        await c.client.agents.revoke(agent_id)
        await c.wait_for(lambda: agent.proc.poll() is not None, what="revoked agent exits")
        assert "AgentRevoked" in agent.log_text()
        reply = await _hello(c.rc.agent_url, pm.Hello(agent_id=agent_id, token=c.rc.join_token))
        assert isinstance(reply, pm.Reject)
        assert reply.code == "AgentRevoked"
        # Its TVM left the pool at once; a fresh agent takes its place.
        assert [t.agent_id for t in await c.client.tvms.list("p")] == []
        c.start_agent("replacement")
        await c.wait_for(lambda: _tvm_agents(c, "p", ["replacement"]), what="a replacement TVM")


async def _tvm_agents(c, pool: str, agents: list[str]) -> bool:
    tvms = await c.client.tvms.list(pool)
    return [t.agent_id for t in tvms] == agents and all(t.state == "idle" for t in tvms)


# ------------------------------------------------------------------ TLS and frames


async def test_tls_agent_link_and_rest(nursery, tmp_path):
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = (str(tmp_path / n) for n in ("server.pem", "server.key", "ca.pem"))
    server.cert_chain_pems[0].write_to_path(cert)
    server.private_key_pem.write_to_path(key)
    ca.cert_pem.write_to_path(ca_file)
    async with cluster_ctx(nursery, tmp_path, tls_cert=cert, tls_key=key, heartbeat_timeout=3) as c:
        assert c.rc.endpoint.startswith("https://")
        assert c.rc.agent_url.startswith("wss://")
        await c.client.aclose()
        c.client = AsyncClient(
            c.rc.endpoint, c.rc.account, c.rc.key, verify=ssl.create_default_context(cafile=ca_file)
        )
        untrusting = c.start_agent("untrusting")
        c.start_agent("trusting", extra_args=["--ca-file", ca_file])
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add_many("wi", "job-0000000001", [task_spec("t", f"{PY} -c pass")])
        assert (await c.client.tasks.wait("wi", "job-0000000001", timeout=30)).failed == 0
        await c.wait_for(
            lambda: "CERTIFICATE_VERIFY_FAILED" in untrusting.log_text(),
            what="the agent without the CA refuses the server",
        )
        assert len(await c.client.tvms.list("p")) == 1
        async with AsyncClient(c.rc.endpoint, c.rc.account, c.rc.key) as plain:
            with pytest.raises(BatchError) as ei:
                await plain.pools.list()
            assert ei.value.code == "ConnectionFailed"


async def test_oversized_agent_frame_closes_only_that_link(nursery, tmp_path):
    async def run(task_status=trio.TASK_STATUS_IGNORED):
        await run_coordinator(
            str(tmp_path / "state"), max_agent_frame=64 * 1024, task_status=task_status
        )

    cancel = trio.CancelScope()

    async def guarded(task_status=trio.TASK_STATUS_IGNORED):
        with cancel:
            await run(task_status=task_status)

    rc = await nursery.start(guarded)
    try:
        # disconnect_timeout: trio-websocket otherwise waits 10 s on a link the server already closed
        async with open_websocket_url(
            rc.agent_url, subprotocols=[SUBPROTOCOL], disconnect_timeout=0.5
        ) as ws:
            await ws.send_message(b"\x00" * (256 * 1024))
            with pytest.raises(ConnectionClosed) as ei, trio.fail_after(10):
                await ws.get_message()
            assert ei.value.reason.code == 1009  # MESSAGE_TOO_BIG
        async with AsyncClient(rc.endpoint, rc.account, rc.key) as cl:
            assert await cl.pools.list() == []
    finally:
        cancel.cancel()
