"""`tvm token create --single-use/--expires` tokens across a coordinator restart: a used single-use
token stays used, an expired one stays expired, a revoked one stays revoked, and the agent the
single-use token enrolled still gets in with its own credential. Real coordinator (restarted on the
same state) and hand-written agents (tests/security/rogue_agent.py)."""

from __future__ import annotations

import trio

from protocol import messages as pm
from tests.harness import cluster_ctx
from tests.security.rogue_agent import handshake, hello, new_credential


def _code(reply: pm.Msg) -> str:
    return reply.code if isinstance(reply, pm.Reject) else type(reply).__name__


async def test_single_use_expired_and_revoked_tokens_stay_so_after_a_restart(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=5) as c:
        once = await c.client.agents.create_token(single_use=True)
        short = await c.client.agents.create_token(expires_in="PT2S")
        revoked = await c.client.agents.create_token()
        await c.client.agents.revoke_token(revoked.id)
        cred = new_credential()
        reply = await handshake(c.rc.agent_url, hello("first", token=once.token, credential=cred))
        assert isinstance(reply, pm.Welcome), reply
    await trio.sleep(2.2)  # the short token's lifetime, while the coordinator is down
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=5) as c:
        url = c.rc.agent_url
        again = await handshake(url, hello("second", token=once.token, credential=new_credential()))
        assert _code(again) == "JoinTokenUsed"
        late = await handshake(url, hello("third", token=short.token, credential=new_credential()))
        assert _code(late) == "JoinTokenExpired"
        gone = await handshake(
            url, hello("fourth", token=revoked.token, credential=new_credential())
        )
        assert _code(gone) == "InvalidJoinToken"
        # The enrolled agent's own credential still opens its id; the token alone does not.
        back = await handshake(url, hello("first", token="", credential=cred))
        assert isinstance(back, pm.Welcome), back
        stolen = await handshake(url, hello("first", token=once.token, credential=""))
        assert _code(stolen) == "InvalidAgentCredential"
        assert not {"second", "third", "fourth"} & set(c.rc.service.core.agents)
