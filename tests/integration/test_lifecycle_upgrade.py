"""Issue 9 §5 against a real coordinator: a faked agent one minor version older (raw trio-websocket,
its own codec without `Ping`, a minor-0 Hello without the newer fields) joins a pool and runs a task;
the Pings it does not know are answered with Unsupported and still measure the link; a message type
the coordinator does not know is answered with Unsupported; neither side drops the link. A newer
agent's Hello (higher minor, unknown fields) is welcomed; another major version is refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import trio
from trio_websocket import open_websocket_url

from protocol import SUBPROTOCOL, LinkSession
from protocol import messages as pm
from protocol.codec import MessageCodec
from tests.harness import cluster_ctx

# The coordinator->agent messages a minor-0 agent knows (it predates Ping, say).
OLD_UNION = (
    pm.JoinPool
    | pm.LeavePool
    | pm.RunTask
    | pm.CancelTask
    | pm.DeleteTaskFiles
    | pm.PoolMembers
    | pm.FileRequest
    | pm.Unsupported
)


class FutureMsg(pm.Msg, tag="tvm.future", kw_only=True):
    detail: str = ""


class FakeAgent:
    def __init__(
        self, url: str, hello: dict[str, Any], on_msg: Callable[[pm.Msg, LinkSession], None]
    ) -> None:
        self.url = url
        self.hello = hello
        self.on_msg = on_msg
        self.session = LinkSession(MessageCodec(OLD_UNION))
        self.received: list[pm.Msg] = []
        self.welcome: pm.Msg | None = None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_websocket_url(self.url, subprotocols=[SUBPROTOCOL]) as ws:
            await ws.send_message(msgspec.msgpack.encode(self.hello))
            self.welcome = self.session.codec.decode_handshake(await ws.get_message())
            assert isinstance(self.welcome, pm.Welcome), self.welcome
            self.session.restart(self.welcome.session_id)
            task_status.started()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, ws)
                while True:
                    for r in self.session.receive_frame(await ws.get_message()):
                        self.received.append(r.msg)
                        self.on_msg(r.msg, self.session)
                    self.session.confirm(self.session.received)

    async def _writer(self, ws: Any) -> None:
        beat = 0
        while True:
            beat += 1
            if beat % 10 == 0:
                self.session.send(pm.Heartbeat())
            while (frame := self.session.next_frame()) is not None:
                await ws.send_message(frame)
            await trio.sleep(0.02)


def _old_hello(token: str) -> dict[str, Any]:
    # Only what a minor-0 agent sends: no resume, proof or newer fields.
    return {
        "t": "hello",
        "protocol_version": pm.PROTOCOL_VERSION,
        "protocol_minor": 0,
        "agent_id": "old-agent",
        "token": token,
        "hostname": "old",
        "cores": 1,
    }


def _old_agent_behaviour(msg: pm.Msg, session: LinkSession) -> None:
    if isinstance(msg, pm.JoinPool):
        session.send(pm.TvmReady(tvm_name=msg.tvm_name))
    elif isinstance(msg, pm.RunTask):
        s = msg.spec
        session.send(pm.TaskStarted(key=s.key, attempt=s.attempt, start_time=1.0))
        session.send(
            pm.TaskCompleted(
                key=s.key, attempt=s.attempt, exit_code=0, start_time=1.0, end_time=2.0
            )
        )


async def test_agent_one_minor_version_older_still_works(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=2) as c:
        svc = c.rc.service
        fake = FakeAgent(c.rc.agent_url, _old_hello(c.rc.join_token), _old_agent_behaviour)
        await nursery.start(fake.run)
        await c.pool_with_tvms("p", 1)
        await c.client.workitems.add("wi", "p")
        await c.client.tasks.add("wi", "job-0000000001", "t", "anything")
        done = await c.wait_for(lambda: _completed(c), what="task run by the old agent")
        assert done.execution_info.exit_code == 0
        # Pings are unknown to it: answered with Unsupported, acked, and the round trip measured.
        await c.wait_for(
            lambda: "old-agent" in svc.monitor.latency.last_rtt, what="RTT of the old agent"
        )
        assert not any(isinstance(m, pm.Ping) for m in fake.received)
        # A message type the coordinator does not know: answered, not fatal.
        fake.session.send(FutureMsg(detail="from the future"))
        await c.wait_for(
            lambda: pm.Unsupported(type="tvm.future") in fake.received, what="Unsupported answer"
        )
        assert svc.links["old-agent"].connected
        assert svc.core.agents["old-agent"].connected
        (tvm,) = await c.client.tvms.list("p")
        assert tvm.state == "idle"


async def _completed(c):  # noqa: ANN001, ANN202
    t = await c.client.tasks.get("wi", "job-0000000001", "t")
    return t if t.state == "completed" else None


async def test_newer_minor_hello_is_welcomed_other_major_is_refused(nursery, tmp_path):
    async with cluster_ctx(nursery, tmp_path, heartbeat_timeout=2) as c:
        newer = {
            "t": "hello",
            "protocol_version": pm.PROTOCOL_VERSION,
            "protocol_minor": pm.PROTOCOL_MINOR + 1,
            "agent_id": "new-agent",
            "token": c.rc.join_token,
            "quantum_cores": 64,
        }
        fake = FakeAgent(c.rc.agent_url, newer, lambda m, s: None)
        await nursery.start(fake.run)
        assert isinstance(fake.welcome, pm.Welcome)
        await c.wait_for(
            lambda: "new-agent" in c.rc.service.monitor.latency.last_rtt, what="link working"
        )

        other_major = dict(newer, agent_id="alien", protocol_version=pm.PROTOCOL_VERSION + 1)
        async with open_websocket_url(c.rc.agent_url, subprotocols=[SUBPROTOCOL]) as ws:
            await ws.send_message(msgspec.msgpack.encode(other_major))
            reply = MessageCodec(OLD_UNION).decode_handshake(await ws.get_message())
        assert isinstance(reply, pm.Reject)
        assert reply.code == "ProtocolVersionMismatch"
        assert "alien" not in c.rc.service.core.agents
