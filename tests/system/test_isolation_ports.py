"""System test (root, network namespaces the test creates, nftables): intra-pool ports end to end.

A communicating pool of two TVMs, each backed by a real agent running inside its own namespace;
the coordinator runs in the host namespace. Topology::

    host 10.214.10.1 --veth-- 10.214.10.2 node   (agent A; its TVM's tasks listen here)
    host 10.214.11.1 --veth-- 10.214.11.2 member (agent B, the other pool member)
    node 10.214.1.1  --veth-- 10.214.1.2  member
    node 10.214.2.1  --veth-- 10.214.2.2  outsider (no agent: not in the pool)

Agents report 10.214.1.x as their address (TVM_AGENT_IP), so the pool's member set is
{10.214.1.1, 10.214.1.2}. A task on A listens on WATASK_PORTRANGE_LOW; the member namespace gets
through, the outsider is reset by A's nftables table.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys

import pytest

from coordinator.client import task_spec
from tests.harness import REPO, agent_env, cluster_ctx, stop_process_groups

PY = "/usr/bin/python3"
JOB = "job-0000000001"

LISTENER = r"""
import os, socket
port = int(os.environ['WATASK_PORTRANGE_LOW'])
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', port)); s.listen()
print('listening', port, os.environ['WATASK_PORTRANGE_HIGH'], flush=True)
while True:
    c, _ = s.accept()
    data = c.recv(10)
    c.sendall(b'hello from task')
    c.close()
    if data == b'quit':
        break
"""

CLIENT = r"""
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    c.sendall(sys.argv[3].encode())
    print('connected:' + c.recv(100).decode())
except OSError as e:
    print('failed:' + type(e).__name__)
"""


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces and nftables)"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"'{tool}' not installed"
    if not os.path.exists(PY):
        return "needs /usr/bin/python3"
    probe = f"tvmi-probe-{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create network namespaces here"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def netns():
    tag = secrets.token_hex(2)
    names = {k: f"tvmi-{k}-{tag}" for k in ("node", "member", "outsider")}
    created: list[str] = []
    host_links: list[str] = []
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")

        def link(a: str | None, a_ip: str, b: str, b_ip: str, end: str) -> None:
            outer, inner = f"ti{tag}{end}0", f"ti{tag}{end}1"
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
            sh("ip", "link", "set", inner, "netns", b)
            if a is None:
                host_links.append(outer)
                sh("ip", "addr", "add", f"{a_ip}/24", "dev", outer)
                sh("ip", "link", "set", outer, "up")
            else:
                sh("ip", "link", "set", outer, "netns", a)
                sh("ip", "-n", a, "addr", "add", f"{a_ip}/24", "dev", outer)
                sh("ip", "-n", a, "link", "set", outer, "up")
            sh("ip", "-n", b, "addr", "add", f"{b_ip}/24", "dev", inner)
            sh("ip", "-n", b, "link", "set", inner, "up")

        link(None, "10.214.10.1", names["node"], "10.214.10.2", "h")
        link(None, "10.214.11.1", names["member"], "10.214.11.2", "i")
        link(names["node"], "10.214.1.1", names["member"], "10.214.1.2", "m")
        link(names["node"], "10.214.2.1", names["outsider"], "10.214.2.2", "o")
        yield names
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        for dev in host_links:
            subprocess.run(["ip", "link", "del", dev], check=False, capture_output=True)


def _connect(ns: str, host: str, port: int, payload: str = "hi") -> str:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, PY, "-c", CLIENT, host, str(port), payload],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.stdout.strip() or done.stderr.strip()


async def test_member_connects_into_a_tvms_port_range_outsider_is_refused(nursery, tmp_path, netns):
    procs: list[subprocess.Popen] = []
    os.makedirs(tmp_path / "agents", exist_ok=True)
    async with cluster_ctx(nursery, tmp_path, host="0.0.0.0", heartbeat_timeout=5) as c:
        port = int(c.rc.endpoint.rsplit(":", 1)[1])
        try:
            for name, ns, coord_ip, own_ip in (
                ("A", netns["node"], "10.214.10.1", "10.214.1.1"),
                ("B", netns["member"], "10.214.11.1", "10.214.1.2"),
            ):
                root = tmp_path / "agents" / name
                root.mkdir()
                log = open(tmp_path / "agents" / f"{name}.log", "ab")  # noqa: SIM115, ASYNC230
                procs.append(
                    subprocess.Popen(  # noqa: ASYNC220 - started once, killed by pid
                        [
                            "ip",
                            "netns",
                            "exec",
                            ns,
                            sys.executable,
                            "-m",
                            "tvmagent",
                            "--coordinator",
                            f"ws://{coord_ip}:{port}/agent",
                            "--root",
                            str(root),
                            "--name",
                            f"ports-{name}",
                        ],
                        cwd=REPO,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        start_new_session=True,
                        env=agent_env({"TVM_AGENT_TOKEN": c.rc.join_token, "TVM_AGENT_IP": own_ip}),
                    )
                )
                log.close()
            await c.client.pools.add("plain", target_dedicated=0)
            await c.pool_with_tvms("comm", 2, communication=True)
            tvms = {t.agent_id: t for t in await c.client.tvms.list("comm")}
            a, b = tvms["ports-A"], tvms["ports-B"]
            assert a.port_range_low >= 1100
            assert b.port_range_low >= 1100
            assert a.port_range_high < 32768  # below the ephemeral range
            assert (
                a.port_range_high < b.port_range_low or b.port_range_high < a.port_range_low
            )  # disjoint
            assert (a.ip_address, b.ip_address) == ("10.214.1.1", "10.214.1.2")
            await c.client.workitems.add("wi", "comm")
            await c.client.tasks.add_many(
                "wi", JOB, [task_spec(f"l{i}", f'{PY} -c "{LISTENER}"') for i in range(2)]
            )
            low = a.port_range_low
            await c.wait_for(
                lambda: _connect(netns["node"], "127.0.0.1", low).startswith("connected"),
                what="the task on A listening on its first port",
            )
            assert _connect(netns["member"], "10.214.1.1", low) == "connected:hello from task"
            assert _connect(netns["outsider"], "10.214.2.1", low) == "failed:ConnectionRefusedError"
            nft = ["ip", "netns", "exec", netns["node"], "nft", "list", "ruleset"]
            tables = subprocess.run(nft, capture_output=True, text=True, timeout=30).stdout  # noqa: ASYNC221
            assert "10.214.1.2" in tables
            assert f"{low}-{a.port_range_high}" in tables
            # The task saw its range in the environment.
            for name in ("l0", "l1"):
                out = (await c.client.files.get_from_task("wi", JOB, name, "stdout.txt")).decode()
                assert out.split()[1:3] in (
                    [str(a.port_range_low), str(a.port_range_high)],
                    [str(b.port_range_low), str(b.port_range_high)],
                )
            assert _connect(netns["node"], "127.0.0.1", low, "quit").startswith("connected")
            assert _connect(netns["member"], "10.214.1.2", b.port_range_low, "quit").startswith(
                "connected"
            )
            await c.client.tasks.wait("wi", JOB, timeout=30)
        finally:
            stop_process_groups(procs)
    # A stopped agent takes its table with it: a TVM given the block next admits its own members.
    for ns in (netns["node"], netns["member"]):
        listed = subprocess.run(  # noqa: ASYNC221
            ["ip", "netns", "exec", ns, "nft", "list", "tables"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        assert "tvm_" not in listed, (ns, listed)
