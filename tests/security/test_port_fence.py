"""Attack: reach a TVM's pool ports from outside the pool (root, network namespaces the test creates).

A real agent (the `Agent` class, driven through its message handler as the websocket loop does)
runs inside a "node" namespace. It is moved through 100 new communicating pools in quick
succession, each with a burst of stale membership lists, and then given its final members.
Topology (addresses exist only inside the namespaces)::

    member 10.215.1.2 --veth-- 10.215.1.1 node 10.215.2.1 --veth-- 10.215.2.2 outsider

A "task" in the node namespace binds like a real one: 0.0.0.0 when it can, 127.0.0.1 when the
user-space gate holds the node's address. After the last update every member is admitted on every
port of the block and every outsider is refused. nftables is used where installed (the agent picks
it); without it the user-space gate must close the range, also when TVM_AGENT_IP is not set.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = str(Path(__file__).resolve().parents[2])
PY = sys.executable
NODE, MEMBER, NODE_OUT, OUTSIDER = "10.215.1.1", "10.215.1.2", "10.215.2.1", "10.215.2.2"
LOW, HIGH = 21300, 21303

# Runs inside the node namespace: one agent, 100 pools, stale lists, then the final one.
DRIVER = r"""
import json, os, socket, sys
import trio
from protocol import messages as pm
from tvmagent.agent import Agent, AgentOptions

root, low, high, member, node = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
has_pool = "pool" in pm.PoolMembers.__struct_fields__

def members(addresses, pool):
    return pm.PoolMembers(addresses=addresses, pool=pool) if has_pool else pm.PoolMembers(addresses=addresses)

async def main():
    agent = Agent(AgentOptions(coordinator="ws://127.0.0.1:9/agent", token="unused", root=root,
                               agent_id="fence-" + os.urandom(4).hex(), task_isolation="none"))
    async with trio.open_nursery() as nursery:
        agent._nursery = nursery
        for i in range(100):
            pool = f"pool-{i}"
            if i:
                agent._handle(pm.LeavePool(tvm_name=f"tvm-{i - 1}"))
            agent._handle(pm.JoinPool(pool=pool, tvm_name=f"tvm-{i}", account="acct",
                                      port_range_low=low, port_range_high=high))
            # Stale and partial lists first (an outsider in, the member out), the pool's real list last.
            for j in range(4):
                agent._handle(members([f"10.215.{2 + j % 2}.2"] if j % 2 else [], pool))
            agent._handle(members([member, node], pool))
            if i % 10 == 0:
                await trio.sleep(0)
        with trio.fail_after(120):
            while not (agent.tvm and agent.tvm.tvm_name == "tvm-99" and agent.lifecycle.setup_replies):
                await trio.sleep(0.05)
        await trio.sleep(0.5)  # nft updates still queued behind the lock
        socks = []
        for port in range(low, high + 1):  # the task: bound like a real one
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                s.bind(("127.0.0.1", port))
            s.listen(); socks.append(s)
        fence = type(agent.isolation.fence).__name__ if agent.isolation.fence is not None else "none"
        print(json.dumps({"ready": True, "fence": fence, "unfenced": getattr(agent.isolation, "ports_unfenced", None)}), flush=True)
        async def serve(s):
            s.setblocking(False)
            ts = trio.socket.from_stdlib_socket(s)
            while True:
                c, _ = await ts.accept()
                await c.send(b"hello from task")
                c.close()
        for s in socks:
            nursery.start_soon(serve, s)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the test closes our stdin
        nursery.cancel_scope.cancel()
    await agent.isolation.teardown()

trio.run(main)
"""

CLIENT = r"""
import socket, sys
for port in sys.argv[2:]:
    try:
        c = socket.create_connection((sys.argv[1], int(port)), timeout=5)
        data = c.recv(100)
        print("connected" if data == b"hello from task" else "reset")
    except OSError as e:
        print("failed:" + type(e).__name__)
"""


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "'ip' (iproute2) not installed"
    probe = f"tvmf-probe-{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "cannot create network namespaces here"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


_REASON = _skip_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _python_in(ns: str, script: str, *args: str) -> list[str]:
    """This interpreter running `script` with `args` inside network namespace `ns`."""
    return ["ip", "netns", "exec", ns, PY, "-c", script, *args]


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def netns() -> Iterator[dict[str, str]]:
    tag = f"{os.getpid() % 10000}{secrets.token_hex(1)}"
    names = {k: f"tvmf-{k}-{tag}" for k in ("node", "member", "outsider")}
    created: list[str] = []
    try:
        for ns in names.values():
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for end, peer, node_ip, peer_ip in (
            ("m", "member", NODE, MEMBER),
            ("o", "outsider", NODE_OUT, OUTSIDER),
        ):
            a, b = f"tf{tag}{end}0", f"tf{tag}{end}1"
            sh(
                "ip",
                "-n",
                names["node"],
                "link",
                "add",
                a,
                "type",
                "veth",
                "peer",
                "name",
                b,
                "netns",
                names[peer],
            )
            sh("ip", "-n", names["node"], "addr", "add", f"{node_ip}/24", "dev", a)
            sh("ip", "-n", names["node"], "link", "set", a, "up")
            sh("ip", "-n", names[peer], "addr", "add", f"{peer_ip}/24", "dev", b)
            sh("ip", "-n", names[peer], "link", "set", b, "up")
        # The node's primary address (what it reports to the coordinator) is the member-side one.
        sh("ip", "-n", names["node"], "route", "add", "default", "via", MEMBER)
        sh("ip", "-n", names["outsider"], "route", "add", "default", "via", NODE_OUT)
        yield names
    finally:
        for ns in created:  # deleting a namespace deletes its veth ends
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def _connect(ns: str, host: str) -> list[str]:
    done = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            PY,
            "-c",
            CLIENT,
            host,
            *(str(p) for p in range(LOW, HIGH + 1)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.split() or [done.stderr.strip()]


@pytest.mark.parametrize("agent_ip", ["env", "primary"])
def test_after_100_new_pools_every_member_is_admitted_and_every_outsider_refused(
    netns: dict[str, str], tmp_path: Path, agent_ip: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TVM_AGENT_IP"}
    env["PYTHONPATH"] = REPO
    if agent_ip == "env":
        env["TVM_AGENT_IP"] = NODE  # how tvm up and the README's agents are told their address
    log = open(tmp_path / "driver.log", "wb")  # noqa: SIM115 - closed in finally
    driver = subprocess.Popen(
        _python_in(
            netns["node"], DRIVER, str(tmp_path / "root"), str(LOW), str(HIGH), MEMBER, NODE
        ),
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        assert driver.stdout is not None
        assert driver.stdin is not None
        line = driver.stdout.readline()
        assert line, f"driver died: {(tmp_path / 'driver.log').read_text()[-3000:]}"
        assert '"ready": true' in line, line
        ports = HIGH - LOW + 1
        assert _connect(netns["member"], NODE) == ["connected"] * ports, line
        outsider = _connect(netns["outsider"], NODE) + _connect(netns["outsider"], NODE_OUT)
        assert all(r.startswith("failed") or r == "reset" for r in outsider), (line, outsider)
        assert '"unfenced": false' in line
    finally:
        if driver.stdin:
            driver.stdin.close()
        try:
            driver.wait(timeout=20)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()
        log.close()


# One agent joins one communicating pool with `members`, serves its ports and waits.
ONE_POOL = r"""
import json, socket, sys
import trio
from protocol import messages as pm
from tvmagent.agent import Agent, AgentOptions

root, agent_id, low, high = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
members = sys.argv[5].split(",")

async def main():
    agent = Agent(AgentOptions(coordinator="ws://127.0.0.1:9/agent", token="unused", root=root,
                               agent_id=agent_id, task_isolation="none"))
    async with trio.open_nursery() as nursery:
        agent._nursery = nursery
        agent._handle(pm.JoinPool(pool="p", tvm_name="tvm-0", account="acct",
                                  port_range_low=low, port_range_high=high))
        agent._handle(pm.PoolMembers(addresses=members, pool="p"))
        with trio.fail_after(60):
            while not agent.lifecycle.setup_replies:
                await trio.sleep(0.05)
        await trio.sleep(0.5)  # the nft update queued behind the lock
        async def serve(port):
            s = trio.socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await s.bind(("0.0.0.0", port)); s.listen()
            while True:
                c, _ = await s.accept()
                await c.send(b"hello from task")
                c.close()
        for port in range(low, high + 1):
            nursery.start_soon(serve, port)
        await trio.sleep(0.1)
        print(json.dumps({"ready": True, "fence": agent.isolation.fence}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the test closes our stdin
        nursery.cancel_scope.cancel()
    await agent.isolation.teardown()

trio.run(main)
"""


def _tables(ns: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "tables"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout


@pytest.mark.skipif(shutil.which("nft") is None, reason="nftables not installed")
def test_a_killed_agents_fence_does_not_shut_out_the_next_pool(
    netns: dict[str, str], tmp_path: Path
) -> None:
    """An agent killed outright cannot remove its table, which resets everyone but its old pool's
    members on its block of ports. A TVM given the same block next must still admit its own
    members: the next agent to fence ports removes the tables of agents that ended."""
    from tvmagent import nftowners

    env = {**os.environ, "PYTHONPATH": REPO, "TVM_AGENT_IP": NODE}
    tag = secrets.token_hex(4)

    def start(name: str, members: str) -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen(
            _python_in(
                netns["node"],
                ONE_POOL,
                str(tmp_path / name),
                f"fence-{name}-{tag}",
                str(LOW),
                str(HIGH),
                members,
            ),  # fmt: skip
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"{name}.log", "wb"),  # noqa: SIM115 - the child holds it
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert '"ready": true' in line, (tmp_path / f"{name}.log").read_text()[-3000:]
        return proc, line.split('"fence": "')[1].split('"')[0]

    old, old_table = start("old", "10.215.9.9")
    try:
        assert old_table in _tables(netns["node"])
        old.kill()  # no teardown: its table stays
        old.wait()
        assert old_table in _tables(netns["node"])
        new, new_table = start("new", f"{MEMBER},{NODE}")
        try:
            tables = _tables(netns["node"])
            assert old_table not in tables
            assert new_table in tables
            assert _connect(netns["member"], NODE) == ["connected"] * (HIGH - LOW + 1)
            assert "its agent ended without it" in (tmp_path / "new.log").read_text()
            assert nftowners.owner_alive(old_table) is None  # its record went with it
        finally:
            assert new.stdin is not None
            new.stdin.close()
            new.wait(timeout=30)
        assert new_table not in _tables(netns["node"])
        assert nftowners.owner_alive(new_table) is None
    finally:
        if old.poll() is None:
            old.kill()
            old.wait()
        nftowners.forget_owner(old_table)
