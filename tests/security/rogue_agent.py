"""A hand-written agent for attack tests: real websocket, real protocol codec and link session,
and only the behaviour a test asks for (answer JoinPool, take RunTasks and never report them)."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from coordinator.runtime.agentauth import agent_proof
from protocol import SUBPROTOCOL, LinkSession, agent_codec
from protocol import messages as pm


def hello(
    agent_id: str, *, token: str = "", credential: str = "", offer: bool = True, **kw: Any
) -> pm.Hello:
    """A Hello proving `credential` (and offering it, as an enrolling agent does, unless offer=False)."""
    fields: dict[str, Any] = {}
    if credential:
        t = int(time.time() * 1000)
        fields = {"proof": agent_proof(credential, agent_id, t), "proof_time": t}
        if offer:
            fields["credential"] = credential
    return pm.Hello(agent_id=agent_id, token=token, **fields, **kw)


def new_credential() -> str:
    return secrets.token_urlsafe(32)


class RogueLink:
    def __init__(self, ws: WebSocketConnection, welcome: pm.Welcome, session: LinkSession) -> None:
        self.ws = ws
        self.welcome = welcome
        self.session = session
        self.received: list[pm.Msg] = []

    async def pump(self, until: Any, timeout: float = 20.0) -> pm.Msg:
        """Read frames, acknowledge everything at once, answer JoinPool with TvmReady; return the
        first message for which `until(msg)` is true."""
        with trio.fail_after(timeout):
            while True:
                for r in self.session.receive_frame(await self.ws.get_message()):
                    self.session.confirm(r.seq)
                    self.received.append(r.msg)
                    if isinstance(r.msg, pm.JoinPool):
                        self.session.send(pm.TvmReady(tvm_name=r.msg.tvm_name))
                    if until(r.msg):
                        await self.flush()
                        return r.msg
                await self.flush()

    async def flush(self) -> None:
        frame = self.session.next_frame()
        if frame is not None:
            await self.ws.send_message(frame)


async def handshake(url: str, msg: pm.Hello) -> pm.Msg:
    """One Hello on a fresh connection; the reply (the connection is closed afterwards)."""
    async with open_websocket_url(url, subprotocols=[SUBPROTOCOL], disconnect_timeout=1) as ws:
        await ws.send_message(agent_codec().encode(msg))
        with trio.fail_after(15):
            return agent_codec().decode_handshake(await ws.get_message())


@asynccontextmanager
async def rogue_link(
    url: str, msg: pm.Hello, session: LinkSession | None = None
) -> AsyncIterator[RogueLink]:
    """A connection that must be welcomed (AssertionError with the Reject otherwise)."""
    session = session or LinkSession(agent_codec())
    async with open_websocket_url(url, subprotocols=[SUBPROTOCOL], disconnect_timeout=1) as ws:
        await ws.send_message(session.codec.encode(msg))
        with trio.fail_after(15):
            reply = session.codec.decode_handshake(await ws.get_message())
        assert isinstance(reply, pm.Welcome), reply
        if reply.resumed and reply.session_id == session.session_id:
            session.resume(reply.last_received)
        else:
            session.restart(reply.session_id)
        yield RogueLink(ws, reply, session)
