"""Issue 9 §5, sans-IO: peers one minor version apart interoperate.

An older peer is faked with a codec whose union lacks a message type the newer side sends; a newer
peer with a message type (and fields) the older side does not know. Unknown types are answered with
`Unsupported` and acknowledged, never fatal; unknown fields are ignored; the major version is what
the coordinator's handshake checks (coordinator/runtime/links.py).
"""

from __future__ import annotations

import msgspec
import pytest

from protocol import LinkSession, agent_codec, coordinator_codec
from protocol import messages as pm
from protocol.codec import MessageCodec


class FutureMsg(pm.Msg, tag="tvm.future", kw_only=True):
    """A message type added in a later minor version."""

    detail: str = ""


# What an agent of minor version 0 would decode: everything except Ping (pretend Ping came in 1).
OLD_COORDINATOR_MSGS = (
    pm.JoinPool
    | pm.LeavePool
    | pm.RunTask
    | pm.CancelTask
    | pm.DeleteTaskFiles
    | pm.PoolMembers
    | pm.FileRequest
    | pm.Unsupported
)


def _pipe(src: LinkSession, dst: LinkSession) -> list:
    out = []
    while (frame := src.next_frame()) is not None:
        out.extend(r.msg for r in dst.receive_frame(frame))
    return out


def test_older_agent_answers_unknown_type_with_unsupported_and_keeps_going():
    coord = LinkSession(coordinator_codec(), "s1")
    old_agent = LinkSession(MessageCodec(OLD_COORDINATOR_MSGS), "s1")
    coord.send(pm.Ping())
    join = pm.JoinPool(pool="p", tvm_name="tvm-1", account="a")
    coord.send(join)
    got = _pipe(coord, old_agent)
    assert got == [join]  # the ping was skipped, the message after it arrived
    assert old_agent.received == 2
    old_agent.confirm(old_agent.received)
    back = _pipe(old_agent, coord)
    assert back == [pm.Unsupported(type="ping")]
    # The Unsupported answer carries the ack of both messages: nothing is resent to the old agent.
    assert coord.peer_acked == 2
    assert coord.unacked_count == 0


def test_older_coordinator_answers_a_newer_agents_message_type():
    agent = LinkSession(MessageCodec(FutureMsg | pm.Heartbeat), "s1")
    coord = LinkSession(coordinator_codec(), "s1")
    agent.codec = agent_codec()
    agent.send(FutureMsg(detail="x"))
    agent.send(pm.Heartbeat(running=1))
    got = _pipe(agent, coord)
    assert got == [pm.Heartbeat(running=1)]
    coord.confirm(coord.received)
    assert _pipe(coord, agent) == [pm.Unsupported(type="tvm.future")]
    assert agent.unacked_count == 0


def test_unknown_fields_of_known_messages_are_ignored():
    # A newer agent adds a field to TaskCompleted (fields are only ever appended with defaults).
    raw = msgspec.msgpack.encode(
        {
            "t": "task.completed",
            "key": "w/j/t",
            "attempt": 3,
            "exit_code": 0,
            "start_time": 1.0,
            "end_time": 2.0,
            "gpu_seconds": 12.5,
        }
    )
    msg = coordinator_codec().decode_message(raw)
    assert msg == pm.TaskCompleted(
        key="w/j/t", attempt=3, exit_code=0, start_time=1.0, end_time=2.0
    )


@pytest.mark.parametrize("minor", [pm.PROTOCOL_MINOR - 1, pm.PROTOCOL_MINOR + 1])
def test_hello_of_a_neighbouring_minor_version_decodes(minor: int):
    raw = msgspec.msgpack.encode(
        {
            "t": "hello",
            "protocol_version": pm.PROTOCOL_VERSION,
            "protocol_minor": minor,
            "agent_id": "a",
            "token": "t",
            "some_future_field": [1, 2],
        }
    )
    hello = coordinator_codec().decode_handshake(raw)
    assert isinstance(hello, pm.Hello)
    assert (hello.protocol_version, hello.protocol_minor, hello.agent_id) == (
        pm.PROTOCOL_VERSION,
        minor,
        "a",
    )


def test_malformed_known_type_is_still_an_error():
    from protocol import ProtocolError

    raw = msgspec.msgpack.encode({"t": "task.completed", "key": 5})
    with pytest.raises(ProtocolError, match="malformed 'task.completed'"):
        coordinator_codec().decode_message(raw)
