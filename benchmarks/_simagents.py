"""Simulated agents for the placement benchmark: K real websocket links in one process.

Each one does the real handshake and speaks the real protocol (LinkSession: sequence numbers,
acks, batching); it answers JoinPool with TvmReady and every RunTask at once with TaskCompleted
(exit code 0) without spawning anything. All messages handled from one frame are answered in one
frame, the way the real agent batches. `--queue`: they say they keep a task queue, as real agents do
(the coordinator may then place short tasks beyond their slots; tasks that take no time never wait).

    python -m benchmarks._simagents --url ws://127.0.0.1:PORT/agent --count K [--queue]
    (token in TVM_AGENT_TOKEN)
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time

import trio
from trio_websocket import ConnectionClosed

from coordinator.runtime.agentauth import agent_proof
from protocol import SUBPROTOCOL, LinkSession, agent_codec
from protocol import messages as pm
from tvmagent.wsclient import open_websocket


async def sim_agent(
    url: str,
    token: str,
    agent_id: str,
    ready: trio.Semaphore | None = None,
    queue: bool = False,
) -> None:
    session = LinkSession(agent_codec())
    codec = session.codec
    wake = trio.Event()
    # The real agent's websocket client: the harness costs what an agent's link costs.
    async with open_websocket(
        url, SUBPROTOCOL, connect_timeout=60, max_message_size=64 * 1024 * 1024
    ) as ws:
        # Enrol with a credential of its own (the benchmarks start every run on a fresh state).
        cred = secrets.token_urlsafe(32)
        t = int(time.time() * 1000)
        await ws.send_message(
            codec.encode(
                pm.Hello(
                    agent_id=agent_id,
                    token=token,
                    hostname="sim",
                    cores=8,
                    credential=cred,
                    proof=agent_proof(cred, agent_id, t),
                    proof_time=t,
                    capabilities=[pm.TASK_QUEUE] if queue else [],
                )
            )
        )
        welcome = codec.decode_handshake(await ws.get_message())
        if not isinstance(welcome, pm.Welcome):
            raise SystemExit(f"{agent_id}: refused: {welcome}")
        session.restart(welcome.session_id)

        async def writer() -> None:
            nonlocal wake
            while True:
                frame = session.next_frame()
                if frame is None:
                    await wake.wait()
                    wake = trio.Event()
                    continue
                if not ws.can_send_now():
                    await ws.send_message(frame)
                elif not ws.send_now(frame):
                    await ws.flush()

        async def heartbeat() -> None:
            while True:
                await trio.sleep(welcome.heartbeat_interval)
                session.send(pm.Heartbeat())
                wake.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(heartbeat)
            while True:
                data = await ws.get_message()
                now = time.time()
                for r in session.receive_frame(data):
                    session.confirm(r.seq)
                    msg = r.msg
                    if isinstance(msg, pm.RunTask):
                        session.send(
                            pm.TaskCompleted(
                                key=msg.spec.key,
                                attempt=msg.spec.attempt,
                                exit_code=0,
                                start_time=now,
                                end_time=now,
                            )
                        )
                    elif isinstance(msg, pm.JoinPool):
                        session.send(pm.TvmReady(tvm_name=msg.tvm_name))
                    elif isinstance(msg, pm.CancelTask):
                        pass  # nothing runs
                wake.set()


async def main(url: str, count: int, prefix: str, queue: bool) -> None:
    token = os.environ["TVM_AGENT_TOKEN"]

    async def one(i: int) -> None:
        try:
            await sim_agent(url, token, f"{prefix}-{i:04d}", queue=queue)
        except ConnectionClosed:
            pass  # the coordinator went away: the benchmark is over

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
            if i % 50 == 49:
                await trio.sleep(0.01)  # do not flood the accept queue


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--prefix", default="sim")
    p.add_argument("--queue", action="store_true", help="say they keep a task queue")
    a = p.parse_args()
    try:
        trio.run(main, a.url, a.count, a.prefix, a.queue)
    except KeyboardInterrupt:
        sys.exit(0)
