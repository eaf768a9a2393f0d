"""The agent websocket endpoint: handshake, one reader, one batching writer per connection.

Every failure of one link (bad token, malformed frame, a bug) closes that link with a reason and
never reaches the server (python-ecosystem §1, rule 3).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import msgspec
import structlog
import trio

from coordinator.common.errors import ApiError
from coordinator.rest.limits import WS_AUTHENTICATED
from protocol import SUBPROTOCOL, ProtocolError, coordinator_codec
from protocol import messages as pm

from . import agentident, wsdirect, wsread
from .acktimer import AckTimer
from .agentauth import Verdict
from .service import AgentLink, CoordinatorService

log = logging.getLogger("tvm.links")
_codec = coordinator_codec()


class _Closed(Exception):
    pass


async def _receive_bytes(receive: Callable, direct: wsread.DirectReader | None = None) -> bytes:
    msg = await receive()
    if msg["type"] == "websocket.disconnect":
        raise _Closed()
    if direct is not None:
        direct.check(msg)  # what handling a frame in the reader task raised
    data = msg.get("bytes")
    if data is None:
        raise ProtocolError("text frames are not part of the protocol", close_code=1003)
    return data


async def serve_agent(
    svc: CoordinatorService, scope: dict, receive: Callable, send: Callable
) -> None:
    if scope.get("path") != "/agent":
        msg = await receive()
        await send({"type": "websocket.close", "code": 4004})
        return
    msg = await receive()
    if msg["type"] != "websocket.connect":
        return
    if SUBPROTOCOL not in scope.get("subprotocols", []):
        await send({"type": "websocket.close", "code": 4009})
        log.warning("agent refused: subprotocol %s not offered", SUBPROTOCOL)
        return
    await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
    link: AgentLink | None = None
    direct: wsread.DirectReader | None = None
    connection_id = 0
    handshaking = ""  # the agent id this connection holds in svc.handshaking
    try:
        with trio.fail_after(10):
            hello = _codec.decode_handshake(await _receive_bytes(receive))
        if not isinstance(hello, pm.Hello):
            raise ProtocolError("the first message must be hello")
        if hello.protocol_version != pm.PROTOCOL_VERSION:
            await _reject(
                send,
                "ProtocolVersionMismatch",
                f"coordinator speaks protocol {pm.PROTOCOL_VERSION}, agent {hello.protocol_version}",
                4009,
            )
            return
        if not hello.agent_id or len(hello.agent_id) > 128:
            await _reject(send, "InvalidAgentId", "agent_id must be 1..128 characters", 4002)
            return
        verdict = svc.auth.authenticate(
            hello.agent_id,
            hello.token,
            hello.proof,
            hello.proof_time,
            time.time(),
            hello.credential,
        )
        try:  # a new or confirmed credential is durable before we answer
            await svc.journal.barrier().wait()
        except ApiError as exc:  # the store failed: the agent tries again later
            await _reject(send, exc.code, exc.message, 1013)
            return
        if verdict.ok and svc.auth.revoked(
            hello.agent_id
        ):  # revoked while we waited for the commit
            verdict = Verdict(False, "AgentRevoked", f"agent {hello.agent_id!r} was revoked")
        if not verdict.ok:
            log.warning("agent %s refused: %s", hello.agent_id, verdict.code)
            agentident.count(svc, verdict.code)
            await _reject(send, verdict.code, verdict.message, 4003)
            return
        refused = agentident.retired(svc, hello.agent_id) or agentident.second_connection(
            svc, hello.agent_id, svc.core.clock()
        )
        if refused is None and hello.agent_id in svc.handshaking:
            refused = agentident.concurrent_handshake(svc, hello.agent_id)
        if refused is not None:
            await _reject(send, *refused, 4003)
            return
        svc.handshaking.add(hello.agent_id)  # no await since the checks: they and this are atomic
        handshaking = hello.agent_id
        await send({"type": WS_AUTHENTICATED})  # the full message limit from here on
        # This connection's task (and its log lines) carries the agent id from here on.
        structlog.contextvars.bind_contextvars(agent=hello.agent_id)
        link, welcome = svc.link_for(hello)
        if verdict.new_credential:  # an older agent that did not make up its own
            welcome = msgspec.structs.replace(welcome, credential=verdict.new_credential)
        connection_id = link.connection_id
        live = link

        async def on_frame(data: bytes) -> None:
            live.frames_in += 1
            received = live.session.receive_frame(data)
            await svc.agent_batch(live, received)

        # Hooked before the Welcome: the agent sends nothing else until it has it, so no frame can
        # be queued on the ASGI path ahead of the ones the hook reads.
        direct = wsread.install(send, receive)
        if direct is not None:  # its log lines carry the agent id too
            agent_id = hello.agent_id
            direct.enter = lambda: structlog.contextvars.bind_contextvars(agent=agent_id)
        await send({"type": "websocket.send", "bytes": _codec.encode(welcome)})
        # What the session still holds reaches the agent after this hello: resent RunTasks of a resumed
        # session, or ones placed while the Welcome was being sent.
        svc.agent_connected(link, hello, agentident.in_flight_runs(link.session))
        svc.handshaking.discard(handshaking)
        handshaking = ""
        log.info(
            "agent %s connected (%s)",
            hello.agent_id,
            "resumed" if welcome.resumed else "new session",
        )
        # This connection's direct writer, also used by the service's flusher (`send_now`).
        if link.connection_id == connection_id:  # not taken over by a newer one meanwhile
            link.direct = wsdirect.direct_writer(send)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    _writer, link, connection_id, send, nursery.cancel_scope, svc.acks
                )
                if direct is not None:
                    await direct.start(on_frame)  # frames handled in hypercorn's reader task
                while True:  # every frame when not hooked; what the hook hands back otherwise
                    await on_frame(await _receive_bytes(receive, direct))
        except BaseExceptionGroup as group:
            # The nursery wraps the reader's _Closed/ProtocolError: unwrap it for the handlers below
            # (otherwise every ordinary disconnect is logged as "agent link failed").
            if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                raise group.exceptions[0] from None
            raise
    except _Closed:
        pass
    except ProtocolError as exc:
        log.warning("closing agent link: %s", exc.message)
        await _close(send, exc.close_code, exc.message)
    except trio.TooSlowError:
        await _close(send, 4002, "no hello within 10 s")
    except Exception:
        log.exception("agent link failed")
        await _close(send, 1011, "internal error")
    finally:
        if direct is not None:
            direct.stop()
        svc.handshaking.discard(handshaking)
        if link is not None:
            if link.connection_id == connection_id:
                link.direct = None
            svc.agent_lost(link, connection_id)


async def _writer(
    link: AgentLink, connection_id: int, send: Callable, scope: trio.CancelScope, acks: AckTimer
) -> None:
    ack_waited = False
    direct = link.direct  # None: every frame as an ASGI event
    while link.connection_id == connection_id:
        session = link.session  # (a new session replaces it only with a new connection)
        if link.tail and direct is not None:  # what the flusher's write left: before anything else
            tail, link.tail = link.tail, b""
            await direct.raw(tail)
            continue
        if link.close_request is not None:
            code, reason = link.close_request
            link.close_request = None
            await _close(send, code, reason)
            scope.cancel()
            return
        if not session.has_messages():
            if not session.has_output():
                await link.wake.wait()
                link.wake = trio.Event()
                continue
            if not ack_waited:  # only an ack is due: give messages a moment to join it
                ack_waited = True
                acks.due(link)  # a poke within ACK_DELAY, if no message comes first
                await link.wake.wait()
                link.wake = trio.Event()
                continue
        ack_waited = False
        # Let the tasks woken with us (other REST adds, other frames' placements) queue their
        # messages first: under `spread` every add deals one task to each TVM, and one frame for
        # two adds costs half of two frames (placement K=100: frames out 13-16k -> 7-13k).
        await trio.lowlevel.cancel_shielded_checkpoint()
        if link.connection_id != connection_id:
            break  # a newer connection took the session over: its writer sends from here on
        frame = session.next_frame()
        if frame is None:
            continue
        link.frames_out += 1
        if direct is not None:
            await direct.frame(frame)
        else:
            await send({"type": "websocket.send", "bytes": frame})
    scope.cancel()


async def _reject(send: Callable, code: str, message: str, close_code: int) -> None:
    try:
        await send(
            {
                "type": "websocket.send",
                "bytes": _codec.encode(pm.Reject(code=code, message=message)),
            }
        )
    except Exception:  # noqa: BLE001 - the peer may already be gone
        pass
    await _close(send, close_code, message)


async def _close(send: Callable, code: int, reason: str) -> None:
    try:
        await send({"type": "websocket.close", "code": code, "reason": reason[:120]})
    except Exception:  # noqa: BLE001 - already closed
        pass
