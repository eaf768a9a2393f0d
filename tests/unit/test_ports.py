"""tvmagent.ports: range checks, block allocation, nft ruleset rendering (pure), and the
user-space PortGate over real loopback sockets (127.0.0.0/8 gives distinct peer addresses)."""

from __future__ import annotations

import errno
import socket

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from protocol.ports import (
    PortRangeConfig,
    allocate_tvm_range,
    first_free_index,
    read_ephemeral_range,
)
from tvmagent.ports import PortGate, parse_members, render_nft_ruleset

EPH = (32768, 60999)

# ----------------------------------------------------------------------------- config


def test_valid_config_and_capacity() -> None:
    cfg = PortRangeConfig(20000, 29999, 100, ephemeral=EPH)
    assert cfg.capacity == 100
    assert PortRangeConfig(61000, 65535, 4536, ephemeral=EPH).capacity == 1
    assert PortRangeConfig(1100, 1100, 1, ephemeral=EPH).capacity == 1


@pytest.mark.parametrize(
    ("low", "high", "per", "message"),
    [
        (1099, 2000, 10, "below the minimum 1100"),
        (20000, 65536, 10, "above the maximum 65535"),
        (21000, 20000, 10, "low 21000 is greater than high 20000"),
        (20000, 20099, 0, "between 1 and the range size 100"),
        (20000, 20099, 101, "between 1 and the range size 100"),
        (20000, 20099.5, 10, "high must be an integer"),
        (True, 20099, 10, "low must be an integer"),
    ],
)
def test_bad_config(low, high, per, message) -> None:
    with pytest.raises(ValueError, match=message):
        PortRangeConfig(low, high, per, ephemeral=EPH)


@pytest.mark.parametrize(
    ("low", "high"), [(30000, 32768), (60999, 61010), (40000, 41000), (1100, 65535)]
)
def test_overlap_with_ephemeral_range_names_both_ranges(low, high) -> None:
    with pytest.raises(ValueError) as e:
        PortRangeConfig(low, high, 1, ephemeral=EPH)
    assert f"port range {low}-{high} overlaps" in str(e.value)
    assert "32768-60999" in str(e.value)


def test_config_reads_this_hosts_ephemeral_range() -> None:
    eph = read_ephemeral_range()
    assert 1 <= eph[0] <= eph[1] <= 65535
    assert PortRangeConfig(eph[0] - 100, eph[0] - 1, 10).ephemeral == eph
    with pytest.raises(ValueError, match="ephemeral"):
        PortRangeConfig(eph[0], eph[0] + 10, 1)


def test_read_ephemeral_range_file(tmp_path) -> None:
    good = tmp_path / "range"
    good.write_text("10000\t20000\n")
    assert read_ephemeral_range(str(good)) == (10000, 20000)
    bad = tmp_path / "bad"
    bad.write_text("garbage\n")
    with pytest.raises(ValueError, match="cannot parse the ephemeral port range"):
        read_ephemeral_range(str(bad))
    assert read_ephemeral_range(str(tmp_path / "missing")) == (32768, 60999)


# ----------------------------------------------------------------------------- allocation


def test_blocks_are_contiguous_and_distinct() -> None:
    cfg = PortRangeConfig(20000, 20999, 100, ephemeral=EPH)
    assert allocate_tvm_range(cfg, 0) == (20000, 20099)
    assert allocate_tvm_range(cfg, 9) == (20900, 20999)
    for bad in (-1, 10, "1", None):
        with pytest.raises(ValueError, match="out of range: 20000-20999 holds 10 blocks of 100"):
            allocate_tvm_range(cfg, bad)


@given(
    low=st.integers(1100, 30000),
    size=st.integers(1, 2000),
    per=st.integers(1, 300),
)
def test_blocks_never_overlap_and_stay_inside(low, size, per) -> None:
    high = low + size - 1
    if per > size or high >= EPH[0]:
        return
    cfg = PortRangeConfig(low, high, per, ephemeral=EPH)
    seen: set[int] = set()
    for i in range(cfg.capacity):
        a, b = allocate_tvm_range(cfg, i)
        assert low <= a <= b <= high
        assert b - a + 1 == per
        block = set(range(a, b + 1))
        assert not block & seen
        seen |= block


def test_first_free_index() -> None:
    cfg = PortRangeConfig(20000, 20029, 10, ephemeral=EPH)
    assert first_free_index(cfg, []) == 0
    assert first_free_index(cfg, [0, 2]) == 1
    assert first_free_index(cfg, {1, 0}) == 2
    with pytest.raises(ValueError, match="no free port block: all 3 blocks"):
        first_free_index(cfg, [0, 1, 2])


# ----------------------------------------------------------------------------- members + nft


def test_parse_members_collapses_and_checks_family() -> None:
    nets = parse_members(["10.0.0.1", "10.0.0.0/24", " 10.0.1.0/24 ", "fd00::1", "10.9.9.9"])
    assert [str(n) for n in nets] == ["10.0.0.0/23", "10.9.9.9/32", "fd00::1/128"]
    with pytest.raises(ValueError, match="'fd00::1' is not an IPv4 address"):
        parse_members(["fd00::1"], 4)
    for bad in (["10.0.0.300"], ["10.0.0.1/24"], ["host.example"], [None]):
        with pytest.raises(ValueError, match="is not an IP address or network"):
            parse_members(bad)
    with pytest.raises(ValueError, match="not a single string"):
        parse_members("10.0.0.1")


def test_render_nft_ruleset() -> None:
    text = render_nft_ruleset("tvm_p1", 20000, 20099, ["10.1.0.2", "10.1.0.9"], ["fd00::2"])
    lines = [line.strip() for line in text.splitlines()]
    # replace-whole-table idiom, in this order, as one file
    assert lines[:3] == ["table inet tvm_p1", "delete table inet tvm_p1", "table inet tvm_p1 {"]
    assert "elements = { 10.1.0.2, 10.1.0.9 }" in lines
    assert "elements = { fd00::2 }" in lines
    assert 'iifname "lo" accept' in lines
    assert "tcp dport 20000-20099 ip saddr != @members_v4 counter reject with tcp reset" in lines
    assert "tcp dport 20000-20099 ip6 saddr != @members_v6 counter reject with tcp reset" in lines
    assert "udp dport 20000-20099 ip saddr != @members_v4 counter drop" in lines
    # the loopback rule must come before the rejects to matter
    assert lines.index('iifname "lo" accept') < lines.index(
        "tcp dport 20000-20099 ip saddr != @members_v4 counter reject with tcp reset"
    )


def test_render_empty_members_single_port_no_loopback() -> None:
    text = render_nft_ruleset("t", 20000, 20000, [], [], allow_loopback=False)
    assert "elements" not in text  # "elements = { }" is a syntax error in nft
    # neighbours merge into one interval (nft refuses overlapping interval elements)
    assert "elements = { 10.1.0.2/31 }" in render_nft_ruleset(
        "t", 1, 2, ["10.1.0.2", "10.1.0.3"], []
    )
    assert "tcp dport 20000 ip saddr" in text
    assert "lo" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("bad-name", 20000, 20001, [], []), "table name 'bad-name'"),
        (("1abc", 20000, 20001, [], []), "table name '1abc'"),
        (("t; flush ruleset", 20000, 20001, [], []), "table name"),
        (("t", 0, 20001, [], []), "port_low must be a port number"),
        (("t", 20000, 70000, [], []), "port_high must be a port number"),
        (("t", 20001, 20000, [], []), "port_low 20001 is greater than port_high 20000"),
        (("t", 20000, 20001, ["fd00::1"], []), "is not an IPv4 address"),
        (("t", 20000, 20001, [], ["10.0.0.1"]), "is not an IPv6 address"),
        (("t", 20000, 20001, ["10.0.0.1 }; flush ruleset"], []), "not an IP address"),
    ],
)
def test_render_bad_input(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        render_nft_ruleset(*args)


# ----------------------------------------------------------------------------- PortGate

GATE = "127.0.0.2"  # stands in for the node's address
MEMBER = "127.0.0.3"
OUTSIDER = "127.0.0.4"


async def start_task_server(nursery: trio.Nursery, host: str = "127.0.0.1", port: int = 0) -> int:
    """A stand-in task: greets, then echoes; answers 'bye' after the client's EOF."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await sock.bind((host, port))
    sock.listen()
    listener = trio.SocketListener(sock)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(b"hello from task\n")
            async for chunk in stream:
                await stream.send_all(chunk)
            await stream.send_all(b"bye")

    await nursery.start(trio.serve_listeners, handle, [listener])
    return sock.getsockname()[1]


async def connect_from(source: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((GATE, port))
    return trio.SocketStream(sock)


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.receive_some(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


async def read_until_closed(stream: trio.SocketStream) -> tuple[bytes, str]:
    """Everything the peer sends, and how it ended: "eof" or "reset" (the gate's refusal)."""
    data = bytearray()
    try:
        with trio.fail_after(10):  # a gate that wrongly lets us in must fail, not hang
            async for chunk in stream:
                data += chunk
    except trio.BrokenResourceError as e:
        return bytes(data), type(e.__cause__).__name__
    return bytes(data), "eof"


REFUSED = (b"", "ConnectionResetError")


async def test_gate_lets_members_in_and_resets_outsiders(nursery) -> None:
    port = await start_task_server(nursery)
    gate = PortGate([port], [MEMBER], listen_host=GATE)
    assert await nursery.start(gate.serve) == [port]

    member = await connect_from(MEMBER, port)
    assert await receive_exactly(member, 16) == b"hello from task\n"
    payload = bytes(range(256)) * 4096  # 1 MiB through both pumps
    async with trio.open_nursery() as n:
        n.start_soon(member.send_all, payload)
        assert await receive_exactly(member, len(payload)) == payload
    await member.send_eof()  # the half-close reaches the task, which answers
    assert await receive_exactly(member, 3) == b"bye"
    assert await member.receive_some(10) == b""
    await member.aclose()

    outsider = await connect_from(OUTSIDER, port)
    assert await read_until_closed(outsider) == REFUSED
    await outsider.aclose()
    assert (gate.accepted, gate.refused) == (1, 1)

    gate.update_members([MEMBER, OUTSIDER])
    outsider = await connect_from(OUTSIDER, port)
    assert await receive_exactly(outsider, 16) == b"hello from task\n"
    await outsider.aclose()
    nursery.cancel_scope.cancel()


async def test_removed_member_is_cut_off(nursery) -> None:
    port = await start_task_server(nursery)
    gate = PortGate([port], ["127.0.0.0/29"], listen_host=GATE)
    await nursery.start(gate.serve)
    conn = await connect_from(MEMBER, port)
    assert await receive_exactly(conn, 16) == b"hello from task\n"
    gate.update_members(["127.0.0.4"])
    assert await read_until_closed(conn) == REFUSED
    with pytest.raises(ValueError, match="not an IP address"):
        gate.update_members(["127.0.0.3", "nonsense"])
    assert gate.members == ["127.0.0.4/32"]  # a bad update changes nothing
    await conn.aclose()
    nursery.cancel_scope.cancel()


async def test_task_binding_the_wildcard_cannot_bypass_the_gate(nursery) -> None:
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    gate = PortGate([port], [MEMBER], listen_host=GATE)
    await nursery.start(gate.serve)
    rogue = trio.socket.socket()
    rogue.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with pytest.raises(OSError) as e:
        await rogue.bind(("0.0.0.0", port))
    assert e.value.errno == errno.EADDRINUSE
    rogue.close()
    nursery.cancel_scope.cancel()


async def test_gate_with_port_offset(nursery) -> None:
    upstream = await start_task_server(nursery)
    offset = 1000
    gate = PortGate([upstream - offset], [MEMBER], listen_host=GATE, port_offset=offset)
    await nursery.start(gate.serve)
    conn = await connect_from(MEMBER, upstream - offset)
    assert await receive_exactly(conn, 16) == b"hello from task\n"
    await conn.aclose()
    nursery.cancel_scope.cancel()


async def test_member_gets_reset_when_task_not_listening(nursery) -> None:
    probe = trio.socket.socket()
    await probe.bind(("127.0.0.1", 0))  # reserve a port nobody listens on
    port = probe.getsockname()[1]
    gate = PortGate([port], [MEMBER], listen_host=GATE)
    await nursery.start(gate.serve)
    conn = await connect_from(MEMBER, port)
    assert await read_until_closed(conn) == REFUSED
    assert gate.upstream_failures == 1
    await conn.aclose()
    probe.close()
    nursery.cancel_scope.cancel()


async def test_gate_bind_failure_names_the_port(nursery) -> None:
    taken = trio.socket.socket()
    await taken.bind((GATE, 0))
    taken.listen()
    port = taken.getsockname()[1]
    gate = PortGate([port], [MEMBER], listen_host=GATE)
    with pytest.raises(OSError, match=f"port gate cannot listen on {GATE}:{port}") as e:
        await gate.serve()
    assert e.value.errno == errno.EADDRINUSE
    taken.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ports": [], "listen_host": GATE}, "at least one port"),
        ({"ports": [0], "listen_host": GATE}, "not a port number"),
        ({"ports": [20000, None], "listen_host": GATE}, "gate port None is not a port number"),
        ({"ports": [65535], "listen_host": GATE, "port_offset": 1}, "not a valid port"),
        ({"ports": [20000], "listen_host": "0.0.0.0"}, "would take the ports the task"),
        ({"ports": [20000], "listen_host": "127.0.0.1"}, "would take the ports the task"),
        ({"ports": [20000], "listen_host": "node.example"}, "must be a literal IP address"),
        ({"ports": [20000], "listen_host": GATE, "upstream_host": "::"}, "concrete address"),
        ({"ports": [20000], "listen_host": GATE, "members": ["x"]}, "not an IP address"),
    ],
)
def test_gate_bad_config(kwargs, message) -> None:
    args = {"members": [MEMBER], **kwargs}
    ports = args.pop("ports")
    members = args.pop("members")
    with pytest.raises(ValueError, match=message):
        PortGate(ports, members, **args)
