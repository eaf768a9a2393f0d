"""System test (root): the nftables "pool members only" fence in network namespaces the
test creates. Topology (addresses only exist inside the namespaces)::

    member  10.213.1.2 --veth-- 10.213.1.1  node  10.213.2.1 --veth-- 10.213.2.2  outsider

A listener in the node namespace stands in for a task on a port of the TVM's block.
Needs root, iproute2 and nftables (Debian packages `iproute2`, `nftables`).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from protocol.ports import PortRangeConfig, allocate_tvm_range
from tvmagent.ports import (
    apply_nft,
    nft_available,
    remove_nft,
    render_nft_ruleset,
)

TABLE = "tvm_test"
NODE_FOR_MEMBER, MEMBER = "10.213.1.1", "10.213.1.2"
NODE_FOR_OUTSIDER, OUTSIDER = "10.213.2.1", "10.213.2.2"

LISTENER = r"""
import socket, sys
socks = []
for port in map(int, sys.argv[1:]):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(); socks.append(s)
print("ready", flush=True)
import selectors
sel = selectors.DefaultSelector()
for s in socks: sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        c, _ = key.fileobj.accept(); c.sendall(b"hello from task"); c.close()
"""

CLIENT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print("connected:" + c.recv(100).decode())
except OSError as e:
    print("failed:" + type(e).__name__)
"""


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return f"'{tool}' not installed (Debian package {package})"
    probe = f"tvmt-probe-{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create network namespaces here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Topology:
    node: str
    member: str
    outsider: str

    def connect(self, ns: str, host: str, port: int) -> str:
        done = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, host, str(port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return done.stdout.strip() or done.stderr.strip()


@pytest.fixture
def topology() -> Iterator[Topology]:
    tag = secrets.token_hex(3)
    topo = Topology(f"tvmt-node-{tag}", f"tvmt-mem-{tag}", f"tvmt-out-{tag}")
    created: list[str] = []
    try:
        for ns in (topo.node, topo.member, topo.outsider):
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for peer, node_ip, peer_ip, end in (
            (topo.member, NODE_FOR_MEMBER, MEMBER, "m"),
            (topo.outsider, NODE_FOR_OUTSIDER, OUTSIDER, "o"),
        ):
            outer, inner = f"tv{tag}{end}0", f"tv{tag}{end}1"  # <= 15 chars
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", outer, "netns", peer)
            sh("ip", "link", "set", inner, "netns", topo.node)
            sh("ip", "-n", topo.node, "addr", "add", f"{node_ip}/24", "dev", inner)
            sh("ip", "-n", topo.node, "link", "set", inner, "up")
            sh("ip", "-n", peer, "addr", "add", f"{peer_ip}/24", "dev", outer)
            sh("ip", "-n", peer, "link", "set", outer, "up")
        yield topo
    finally:
        for ns in created:  # deleting a namespace also deletes its veth ends
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@pytest.fixture
def listener(topology: Topology) -> Iterator[tuple[int, int]]:
    """A task listening on a port inside its TVM block and on one outside the range."""
    cfg = PortRangeConfig(20000, 20999, 100)
    low, high = allocate_tvm_range(cfg, 3)
    inside, outside = low + 5, 21500
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            topology.node,
            sys.executable,
            "-c",
            LISTENER,
            str(inside),
            str(outside),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield inside, outside
    finally:
        proc.kill()
        proc.wait()


def test_members_connect_outsiders_are_refused(topology: Topology, listener) -> None:
    inside, outside = listener
    cfg = PortRangeConfig(20000, 20999, 100)
    low, high = allocate_tvm_range(cfg, 3)
    assert nft_available(netns=topology.node)

    # before the fence everybody gets in
    assert (
        topology.connect(topology.outsider, NODE_FOR_OUTSIDER, inside)
        == "connected:hello from task"
    )

    apply_nft(render_nft_ruleset(TABLE, low, high, [MEMBER], []), netns=topology.node)
    assert topology.connect(topology.member, NODE_FOR_MEMBER, inside) == "connected:hello from task"
    assert (
        topology.connect(topology.outsider, NODE_FOR_OUTSIDER, inside)
        == "failed:ConnectionRefusedError"
    )
    # the fence covers only the block: other ports are untouched
    assert (
        topology.connect(topology.outsider, NODE_FOR_OUTSIDER, outside)
        == "connected:hello from task"
    )
    # the node's own loopback is allowed
    assert topology.connect(topology.node, "127.0.0.1", inside) == "connected:hello from task"

    # membership change: re-render and re-apply (one transaction replacing the table)
    apply_nft(render_nft_ruleset(TABLE, low, high, [MEMBER, OUTSIDER], []), netns=topology.node)
    assert (
        topology.connect(topology.outsider, NODE_FOR_OUTSIDER, inside)
        == "connected:hello from task"
    )

    # and a member that leaves is shut out again
    apply_nft(render_nft_ruleset(TABLE, low, high, [OUTSIDER], []), netns=topology.node)
    assert (
        topology.connect(topology.member, NODE_FOR_MEMBER, inside)
        == "failed:ConnectionRefusedError"
    )

    remove_nft(TABLE, netns=topology.node)
    remove_nft(TABLE, netns=topology.node)  # idempotent
    tables = subprocess.run(
        ["ip", "netns", "exec", topology.node, "nft", "list", "tables"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert TABLE not in tables
    assert topology.connect(topology.member, NODE_FOR_MEMBER, inside) == "connected:hello from task"


def test_member_networks_and_loopback_off(topology: Topology, listener) -> None:
    inside, _ = listener
    ruleset = render_nft_ruleset(
        TABLE, inside, inside, ["10.213.1.0/24"], ["fd00::/8"], allow_loopback=False
    )
    apply_nft(ruleset, netns=topology.node)
    assert topology.connect(topology.member, NODE_FOR_MEMBER, inside) == "connected:hello from task"
    assert (
        topology.connect(topology.outsider, NODE_FOR_OUTSIDER, inside)
        == "failed:ConnectionRefusedError"
    )
    assert topology.connect(topology.node, "127.0.0.1", inside) == "failed:ConnectionRefusedError"


def test_the_tables_of_ended_agents_are_swept_and_no_other(tmp_path) -> None:
    """An agent killed outright leaves its table; the next agent's sweep removes it, and only
    tables of ours (`tvm_*`) whose recorded owner ended: not a live agent's, not one without a
    record, not anyone else's."""
    from tvmagent import nftowners

    ns = f"tvmt-sweep-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", ns)
    try:
        owners = str(tmp_path / "owners")
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        dead = f"{child.pid} {nftowners.start_time(child.pid)}"
        child.wait()
        os.makedirs(owners)
        for table in ("tvm_dead", "other_dead"):
            apply_nft(render_nft_ruleset(table, 1100, 1149, ["10.0.0.1"], []), netns=ns)
            with open(os.path.join(owners, table), "w") as f:
                f.write(dead + "\n")
        apply_nft(render_nft_ruleset("tvm_live", 1150, 1199, [], []), netns=ns)
        nftowners.record_owner("tvm_live", owners)
        apply_nft(render_nft_ruleset("tvm_unrecorded", 1200, 1249, [], []), netns=ns)

        assert nftowners.sweep(owners, netns=ns) == ["tvm_dead"]
        assert sorted(nftowners.list_tables(ns)) == ["other_dead", "tvm_live", "tvm_unrecorded"]
        assert sorted(os.listdir(owners)) == ["other_dead", "tvm_live"]
        assert nftowners.sweep(owners, netns=ns) == []
    finally:
        sh("ip", "netns", "del", ns)
