"""The sans-IO link session, driven back to back without sockets (h11's ConnectionPair style)."""

import msgspec
import pytest

from protocol import LinkSession, ProtocolError, agent_codec, coordinator_codec
from protocol.messages import CancelTask, Frame, Heartbeat, Ping, TaskCompleted, Unsupported


def pair() -> tuple[LinkSession, LinkSession]:
    return LinkSession(agent_codec(), "s1"), LinkSession(coordinator_codec(), "s1")


def flush(src: LinkSession, dst: LinkSession) -> list:
    out = []
    while (frame := src.next_frame()) is not None:
        for r in dst.receive_frame(frame):
            dst.confirm(r.seq)
            out.append(r.msg)
    return out


def completed(i: int) -> TaskCompleted:
    return TaskCompleted(key=f"w/j/t{i}", attempt=1, exit_code=0, start_time=1.0, end_time=2.0)


def test_many_messages_batched_into_few_frames() -> None:
    agent, coord = pair()
    for i in range(1000):
        agent.send(completed(i))
    frames = []
    while (f := agent.next_frame()) is not None:
        frames.append(f)
    assert 1 <= len(frames) < 10
    got = [m for f in frames for m in (r.msg for r in coord.receive_frame(f))]
    assert [m.key for m in got] == [f"w/j/t{i}" for i in range(1000)]


def test_ack_releases_and_reconnect_resends_only_unacked() -> None:
    agent, coord = pair()
    for i in range(5):
        agent.send(completed(i))
    frame = agent.next_frame()
    assert frame is not None
    received = coord.receive_frame(frame)
    coord.confirm(received[2].seq)  # only three were durably handled
    assert flush(coord, agent) == []
    assert agent.unacked_count == 2
    agent.connection_lost()
    coord.connection_lost()
    # Peer says it received all five; the agent must not resend them.
    agent.resume(coord.received)
    assert agent.next_frame() is None or flush(agent, coord) == []
    # Now lose two messages in flight and resend them.
    agent.send(completed(5))
    agent.send(completed(6))
    assert agent.next_frame() is not None  # written, never arrived
    agent.connection_lost()
    agent.resume(coord.received)
    assert [m.key for m in flush(agent, coord)] == ["w/j/t5", "w/j/t6"]


def test_duplicates_are_dropped() -> None:
    agent, coord = pair()
    agent.send(Heartbeat(running=1))
    frame = agent.next_frame()
    assert frame is not None
    assert len(coord.receive_frame(frame)) == 1
    assert coord.receive_frame(frame) == []


def test_restart_renumbers_unacked_for_a_new_peer_session() -> None:
    agent, coord = pair()
    agent.send(completed(1))
    agent.send(completed(2))
    agent.next_frame()  # lost with the coordinator
    fresh = LinkSession(coordinator_codec(), "s2")
    agent.restart("s2")
    assert [m.key for m in flush(agent, fresh)] == ["w/j/t1", "w/j/t2"]


def test_unknown_message_type_is_answered_not_fatal() -> None:
    agent, coord = pair()

    class FutureMsg(msgspec.Struct, tag_field="t", tag="future.thing"):
        x: int = 1

    enc = msgspec.msgpack.Encoder()
    frame = enc.encode(
        Frame(first=1, msgs=[msgspec.Raw(enc.encode(FutureMsg())), msgspec.Raw(enc.encode(Ping()))])
    )
    got = agent.receive_frame(frame)
    assert [type(r.msg) for r in got] == [Ping]
    out = agent.next_frame()
    assert out is not None
    reply = msgspec.msgpack.decode(out, type=Frame)
    assert reply.ack == 1  # the Ping was not confirmed by the application yet
    assert [coord.codec.decode_message(m) for m in reply.msgs] == [Unsupported(type="future.thing")]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\xc1", "malformed frame"),
        (msgspec.msgpack.encode({"first": 1, "msgs": [b"\xc1"]}), "malformed"),
        (
            msgspec.msgpack.encode({"first": 1, "msgs": [{"t": "task.cancel", "key": 5}]}),
            "task.cancel",
        ),
        (msgspec.msgpack.encode({"first": 0, "msgs": [{"t": "ping"}]}), "sequence"),
        (msgspec.msgpack.encode({"first": 7, "msgs": [{"t": "ping"}]}), "gap"),
        (msgspec.msgpack.encode({"ack": 99}), "never sent"),
    ],
)
def test_malformed_input_raises_protocol_error(data: bytes, fragment: str) -> None:
    agent, _ = pair()
    # raw Frame dicts need Raw members: re-encode msgs as embedded msgpack
    with pytest.raises(ProtocolError, match=fragment):
        agent.receive_frame(_fix(data))


def _fix(data: bytes) -> bytes:
    try:
        obj = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return data
    if isinstance(obj, dict) and "msgs" in obj:
        obj["msgs"] = [
            msgspec.Raw(m if isinstance(m, bytes) else msgspec.msgpack.encode(m))
            for m in obj["msgs"]
        ]
    return msgspec.msgpack.encode(obj)


def test_cancel_round_trip_types() -> None:
    agent, coord = pair()
    coord.send(CancelTask(key="a/b/c", attempt=3))
    assert flush(coord, agent) == [CancelTask(key="a/b/c", attempt=3)]
