"""The coordinator's Trio shell: runs commands on the pure core and carries out their effects.

Order of effects for one command: journal writes are submitted (group commit), messages to agents
are queued on their link sessions at once, and the caller awaits the commit before answering — so a
2xx means durable, and an agent's completion is acknowledged only after it is durable.
"""

from __future__ import annotations

import base64
import itertools
import logging
import os
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from coordinator.core import (
    MAX_ACTIVE_JOBS,
    MAX_POOLS,
    MAX_TASKS,
    MAX_TASKS_PER_JOB,
    CoordinatorState,
    Effects,
)
from protocol import LinkSession, coordinator_codec
from protocol import messages as pm

from .acktimer import AckTimer
from .agentauth import AgentAuth, token_hash
from .agentwatch import retire_agents, watch_agent_processes
from .clock import SteadyClock
from .journal import Journal, SqliteStore, Ticket, server_busy, store_unavailable
from .metrics import PING_INTERVAL, LinkMonitor
from .statedir import secure_state_dir
from .waiters import DoneWaiters
from .wsdirect import DirectWriter

log = logging.getLogger("tvm.coordinator")


MAX_PENDING_ACKS = 64  # frames a link's reader may apply ahead of their commit
# Commands are refused (503 ServerBusy) while this many writes wait for the disk: memory stays
# bounded and clients back off instead of every answer waiting longer and longer.
MAX_JOURNAL_BACKLOG = 200_000


class AgentLink:
    """One agent's session plus, while connected, the means to write frames to it."""

    def __init__(self, agent_id: str, session: LinkSession) -> None:
        self.agent_id = agent_id
        self.session = session
        self.wake = trio.Event()
        self.connected = False
        self.close_request: tuple[int, str] | None = None
        self.connection_id = 0
        # (journal barrier, seq): frames applied but not yet durable, acknowledged in this order.
        self.pending_acks: deque[tuple[Ticket, int]] = deque()
        # A commit of what this link delivered failed: its next hello starts a new session, so the
        # agent sends again all it was not told is durable (a resumed one would count as received
        # what was only applied, and the failed acknowledgements would fail every connection).
        self.commit_failed = False
        self.frames_in = 0  # websocket frames received and sent (benchmarks read them)
        self.frames_out = 0
        # The connection's direct writer (links.py), and the bytes of a frame it could not write at
        # once, which the link's writer task writes before anything else.
        self.direct: DirectWriter | None = None
        self.tail = b""

    def poke(self) -> None:
        self.wake.set()

    def send_now(self, ack: bool = False) -> bool:
        """Write the session's waiting messages in one frame now, from the caller's task; False
        when the link's writer task must (no direct writer, something left to write first, a close
        asked for). `ack`: an acknowledgement alone is written too (else it is left to the writer,
        which holds it back a moment for messages to ride along)."""
        d = self.direct
        if (
            d is None
            or self.tail
            or self.close_request is not None
            or not (self.session.has_output() if ack else self.session.has_messages())
            or not d.open()
        ):
            return False
        frame = self.session.next_frame()
        if frame is None:
            return True
        self.frames_out += 1
        self.tail = d.now(frame)
        return not self.tail


class CoordinatorService:
    def __init__(
        self,
        state_dir: str,
        *,
        account: str = "tvm",
        heartbeat_timeout: float = 30.0,
        join_token: str | None = None,
        clock: Callable[[], float] | None = None,
        max_pool_size: int = 1000,
        max_tasks_per_job: int = MAX_TASKS_PER_JOB,
        max_tasks: int = MAX_TASKS,
        max_pools: int = MAX_POOLS,
        max_active_jobs: int = MAX_ACTIVE_JOBS,
        store: Any = None,
    ) -> None:
        """`store`: an open store to use instead of STATE_DIR/coordinator.db (a `PostgresStore`
        whose lease this process holds: see coordinator/daemon/standby.py)."""
        state_dir = secure_state_dir(
            state_dir
        )  # 0700 dir, 0600 db/WAL/token: tasks must not read keys
        self.state_dir = state_dir
        self.store = store or SqliteStore(os.path.join(state_dir, "coordinator.db"))
        # Several coordinators share a PostgreSQL store: what they must agree on lives in it.
        self.shared_store = store is not None
        self.account = self.store.get_meta("account") or account
        self.keys = [self.store.get_meta("key1") or "", self.store.get_meta("key2") or ""]
        if not self.keys[0]:
            self.keys = [base64.b64encode(secrets.token_bytes(64)).decode() for _ in range(2)]
            self.store.set_meta("key1", self.keys[0])
            self.store.set_meta("key2", self.keys[1])
            self.store.set_meta("account", self.account)
        self.join_token = self._load_join_token(join_token)
        # Agent credentials: read from memory, written through the group commit (an fsync per
        # agent connection on the event loop stalled everything while 1,000 agents connected).
        # Whoever acts on a put awaits `journal.barrier()` first (links: before Welcome).
        self._auth_meta = self.store.all_meta()
        self.auth = AgentAuth(
            self._auth_meta.get,
            self._auth_put,
            self.store.get_meta("join_token_sha256") or "",
            items=self._auth_meta.items,
        )
        self.agent_link_events: dict[
            str, int
        ] = {}  # refused hellos by Reject code, replaced links (/metrics)
        # Agent ids whose accepted hello is being turned into a link: a second hello for the same id
        # meanwhile is refused like a second connection (the two must not both be welcomed).
        self.handshaking: set[str] = set()
        epoch = int(self.store.get_meta("epoch") or "0") + 1
        self.store.set_meta("epoch", str(epoch))
        self.core = CoordinatorState(
            self.account,
            epoch=epoch,
            clock=clock or SteadyClock(),  # a step of the host's clock is not elapsed time
            heartbeat_timeout=heartbeat_timeout,
            max_pool_size=max_pool_size,
            max_tasks_per_job=max_tasks_per_job,
            max_tasks=max_tasks,
            max_pools=max_pools,
            max_active_jobs=max_active_jobs,
        )
        started = time.monotonic()
        self.core.restore(self.store.load())
        self.restore_seconds = time.monotonic() - started
        self.journal = Journal(self.store)
        self.done_waiters = DoneWaiters()  # clients waiting for a task to complete
        self.links: dict[str, AgentLink] = {}
        self.acks = AckTimer()  # pokes links whose lone ack waited ACK_DELAY (links._writer)
        # Links with frames applied but not yet acknowledged (their `pending_acks`), in order.
        self._acking: dict[AgentLink, None] = {}
        self._ack_wake = trio.Event()
        self.journal.on_settled = self._wake_acker
        # Links with messages to write, written by one task (`flush_loop`), not a task each.
        self._flushing: dict[AgentLink, None] = {}
        self._flush_wake = trio.Event()
        self.tick_interval = max(0.05, min(1.0, heartbeat_timeout / 5))
        self._file_waiters: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._req_ids = itertools.count(1)
        self.endpoint = ""
        # Link round trips and placement rate for /metrics; ping at least as often as agents heartbeat.
        self.monitor = LinkMonitor(interval=min(PING_INTERVAL, heartbeat_timeout / 4))
        self.provisioner: Any = None  # issue 5: see set_provisioner
        # Raises StoreFenced once this coordinator may no longer be the active one of a shared
        # store (daemon/standby.py): nothing is sent to agents after that.
        self.fence: Callable[[], None] | None = None

    def agent_frames(self) -> tuple[int, int]:
        """Websocket frames received from and sent to agents, over every link kept (/metrics)."""
        links = self.links.values()
        return sum(x.frames_in for x in links), sum(x.frames_out for x in links)

    def _auth_put(self, key: str, value: str) -> None:
        self._auth_meta[key] = value
        self.journal.put_meta(key, value)

    def set_provisioner(self, provisioner: Any) -> None:
        """Let the core ask `provisioner.start(n, size)` for agents when pools lack free ones."""
        self.provisioner = provisioner
        self.core.provisioning_enabled = provisioner is not None

    def start_agents(self, n: int, size: str = "small") -> list[str]:
        """Start `n` agents through the provisioner now (e.g. `tvm up --agents N`); pools created before
        they register do not ask for them a second time."""
        started = self.provisioner.start(n, size)
        self.core.expect_agents(len(started))
        self.core.agents_started(started)
        return started

    # ------------------------------------------------------------------ running

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.journal.run)
            nursery.start_soon(self.acks.run)
            nursery.start_soon(self.ack_loop)
            nursery.start_soon(self.flush_loop)
            nursery.start_soon(self._ticker)
            nursery.start_soon(self.monitor.run, self)
            nursery.start_soon(watch_agent_processes, self)
            task_status.started()

    async def _ticker(self) -> None:
        while True:
            await trio.sleep(self.tick_interval)
            self.core.tick()
            self.core.schedule()
            self._dispatch(self.core.take_effects())

    def check_token(self, token: str) -> bool:
        return self.auth.check_token(token)

    def _load_join_token(self, given: str | None) -> str:
        """The database keeps only the token's SHA-256. The plain token is kept in a 0600 file next
        to it (STATE_DIR/join-token) so the embedded provisioner can hand it to local agents."""
        path = os.path.join(self.state_dir, "join-token")
        token = given or ""
        if self.shared_store:
            # Every coordinator of the store prints (and hands its agents) the same token; the
            # account keys sit in the same table, so it is no less protected than they are.
            token = token or self.store.get_meta("join_token_plain") or ""
        if not token and os.path.exists(path):
            with open(path) as f:
                token = f.read().strip()
        token = token or self.store.get_meta("join_token_plain") or secrets.token_urlsafe(32)
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        os.replace(path + ".tmp", path)
        self.store.set_meta("join_token_sha256", token_hash(token))
        # Older SQLite databases kept it in clear; the state dir's 0600 file holds it now.
        self.store.set_meta("join_token_plain", token if self.shared_store else "")
        return token

    def regenerate_key(self, which: str) -> str:
        """Replace the primary or secondary account key; the other one keeps working (rotation)."""
        index = 0 if which == "primary" else 1
        key = base64.b64encode(secrets.token_bytes(64)).decode()
        try:
            self.store.set_meta(f"key{index + 1}", key)
        except sqlite3.Error as exc:  # the old key stays valid: nothing changed
            raise store_unavailable(f"{type(exc).__name__}: {exc}") from None
        self.keys[index] = key
        return key

    def revoke_agent(self, agent_id: str) -> bool:
        if agent_id not in self.core.agents and not self.auth.known(agent_id):
            return False
        self.auth.revoke(agent_id)
        link = self.links.get(agent_id)
        if link is not None:
            link.close_request = (4003, "agent revoked")
            link.poke()
        log.warning("agent %s revoked", agent_id)
        return True

    # ------------------------------------------------------------------ commands

    async def execute(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a command on the core; answer once its writes are durable."""
        if self.journal.unavailable is not None:  # refused before it changes anything
            raise store_unavailable(self.journal.unavailable)
        if self.journal.backlog > MAX_JOURNAL_BACKLOG:
            raise server_busy(f"{self.journal.backlog} writes wait for the disk")
        error: Exception | None = None
        result = None
        try:
            result = fn(*args)
        except Exception as exc:  # validation refused it: nothing was mutated
            error = exc
        self.core.schedule()
        ticket = self._dispatch(self.core.take_effects())
        await ticket.wait()
        if error is not None:
            raise error
        return result

    def _dispatch(self, fx: Effects, urgent: bool = True) -> Ticket:
        """`urgent=False`: no client waits for these writes (Journal.submit)."""
        if self.fence is not None:
            self.fence()
        ticket = self.journal.submit(fx.writes, urgent)
        for p in fx.provision:
            if self.provisioner is None:
                break
            try:
                start_pool = getattr(self.provisioner, "start_pool", None)  # per-pool plugins
                started = (
                    start_pool(p.pool, p.count, p.vm_size)
                    if start_pool is not None
                    else self.provisioner.start(p.count, p.vm_size)
                )
                self.core.agents_started(started)
                log.info(
                    "provisioner started %d agent(s) of size %s (%d asked for): %s",
                    len(started),
                    p.vm_size,
                    p.count,
                    ", ".join(started),
                )
            except Exception:  # a broken provisioner must not take the coordinator down
                log.exception(
                    "provisioner failed to start %d agent(s) of size %s", p.count, p.vm_size
                )
        if fx.retire:
            retire_agents(self, fx.retire)
        for send in fx.sends:
            link = self.links.get(send.agent_id)
            if link is None:
                continue  # never connected in this run: it will re-register and reconcile
            link.session.send(send.msg)
            if link.direct is None:
                link.poke()
            else:
                self._flushing[link] = None
                self._flush_wake.set()
        for close in fx.closes:
            link = self.links.get(close.agent_id)
            if link is not None:
                link.close_request = (close.code, close.reason)
                link.poke()
        if self.done_waiters:
            self.done_waiters.poke(self._task_done)
        return ticket

    def _task_done(self, key: str) -> bool:
        """Completed, or gone (its waiter's GET then answers 404)."""
        _job, task = self.core.store.lookup(key)
        return task is None or task.state == "completed"

    # ------------------------------------------------------------------ agent links

    def link_for(self, hello: pm.Hello) -> tuple[AgentLink, pm.Welcome]:
        link = self.links.get(hello.agent_id)
        resumed = bool(
            link
            and hello.session_id
            and hello.session_id == link.session.session_id
            and not link.commit_failed
        )
        if link is None or not resumed:
            session = LinkSession(coordinator_codec(), secrets.token_hex(8))
            if link is None:
                link = AgentLink(hello.agent_id, session)
                self.links[hello.agent_id] = link
            else:
                link.session = session
                link.pending_acks.clear()  # sequence numbers of the old session
                link.commit_failed = False
        else:
            link.session.resume(hello.last_received)
        link.connection_id += 1
        # The old connection's writer must not take the new one's frames (it may not know yet that
        # its socket is dead): the new connection installs its own once its writer runs.
        link.direct = None
        link.tail = b""
        welcome = pm.Welcome(
            session_id=link.session.session_id,
            resumed=resumed,
            # What is durable, not what was applied: the agent forgets all up to here, and sends
            # the rest again (duplicates of what was applied, dropped, acknowledged once committed).
            last_received=link.session.confirmed,
            heartbeat_interval=max(0.05, self.core.heartbeat_timeout / 4),
        )
        return link, welcome

    def agent_connected(
        self, link: AgentLink, hello: pm.Hello, in_flight: set[str] | None = None
    ) -> None:
        """`in_flight`: keys of RunTasks the agent has not received yet (resent on a resumed session)."""
        link.connected = True
        agent = self.core.agents.get(hello.agent_id)
        tvm = self.core.tvms.get(agent.tvm) if agent is not None and agent.tvm else None
        before = set(tvm.running) if tvm is not None else set()
        self.core.agent_hello(hello, in_flight or set())
        lost = sorted(before - set(tvm.running)) if tvm is not None else []
        if tvm is not None and lost:  # the operator should see why tasks run again
            log.warning(
                "agent %s came back without %d task(s) placed on %s (restarted, or not the agent"
                " they were given to?): requeued",
                hello.agent_id,
                len(lost),
                tvm.rec.name,
                extra={"tvm": tvm.rec.name, "tasks": lost[:20]},
            )
        self.core.schedule()
        self._dispatch(self.core.take_effects())

    def agent_lost(self, link: AgentLink, connection_id: int) -> None:
        if link.connection_id != connection_id:
            return  # a newer connection of the same agent already took over
        link.connected = False
        link.session.connection_lost()
        self.core.agent_disconnected(link.agent_id)
        agent = self.core.agents.get(link.agent_id)
        tvm = agent.tvm if agent is not None else None
        log.info(
            "agent %s disconnected%s",
            link.agent_id,
            f"; {tvm} is lost unless it is back within {self.core.heartbeat_timeout:g} s"
            if tvm
            else "",
            extra={"tvm": tvm} if tvm else None,
        )

    async def agent_batch(self, link: AgentLink, received: list[Any]) -> None:
        """Messages from one frame: apply, submit the writes, and queue the acknowledgement for
        when everything submitted so far is durable (`ack_committed`). The link's reader does not
        wait for the commit: a reader that waited let an agent's frames queue up behind every
        commit, and a long queue then drained at one or two tasks per frame and per commit. Only
        a reader far ahead of the disk (MAX_PENDING_ACKS frames) waits."""
        core = self.core
        self.monitor.on_frame(link.agent_id, link.session.session_id, link.session.peer_acked)
        for r in received:
            msg = r.msg
            if isinstance(msg, (pm.FileResponse, pm.NodeUserResponse)):
                waiter = self._file_waiters.get(msg.req_id)
                if waiter is not None:
                    waiter[1].append(msg)
                    waiter[0].set()
                continue
            core.agent_message(link.agent_id, msg)
        core.schedule()
        self._dispatch(core.take_effects(), urgent=False)  # only the link's ack waits for them
        if received and not link.commit_failed:  # else its link closes: nothing is acknowledged
            # Not this frame's own ticket: a frame without writes must not be acknowledged before
            # the writes of earlier frames (its seq acknowledges theirs too).
            barrier = self.journal.barrier()
            if barrier.done and not link.pending_acks:
                link.session.confirm(received[-1].seq)
                link.poke()
                return
            link.pending_acks.append((barrier, received[-1].seq))
            self._acking[link] = None
            # Settled already (a retry's failure): no commit will wake the acknowledger for it.
            if barrier.event.is_set():
                self._ack_wake.set()
            if len(link.pending_acks) > MAX_PENDING_ACKS:
                await link.pending_acks[0][0].wait()

    async def flush_loop(self) -> None:
        """Write the messages placements left for agents, one frame per link, from this one task:
        waking each link's writer cost two task switches per frame (with 1,000 agents, every REST
        add deals a task to each of 100 of them). A link this cannot write now is its writer's."""
        while True:
            await self._flush_wake.wait()
            self._flush_wake = trio.Event()
            # Let the tasks woken with this one (other REST adds, other frames' placements) queue
            # their messages first: one frame carries them all.
            await trio.lowlevel.cancel_shielded_checkpoint()
            links, self._flushing = self._flushing, {}
            for link in links:
                if not link.send_now():
                    link.poke()

    def _wake_acker(self) -> None:
        self._ack_wake.set()

    async def ack_loop(self) -> None:
        """One task for every link: after each commit, acknowledge what became durable. (A task
        per link, woken per commit, cost the coordinator two task switches per agent frame.)"""
        while True:
            await self._ack_wake.wait()
            self._ack_wake = trio.Event()
            self.ack_durable()

    def ack_durable(self) -> None:
        """Acknowledge, link by link and in order, the applied frames whose commits are done. A
        failed commit closes its link instead, so what it held is never acknowledged, and makes the
        agent's next hello start a new session (see `link_for`)."""
        for link in list(self._acking):
            q = link.pending_acks
            confirmed = False
            while q and q[0][0].event.is_set():
                ticket, seq = q.popleft()
                if ticket.error is not None:
                    q.clear()
                    link.commit_failed = True
                    log.warning(
                        "agent %s: the commit of what it sent failed (%s): closing its link",
                        link.agent_id,
                        ticket.error,
                    )
                    if link.connected:
                        link.close_request = (1011, "the coordinator could not commit a frame")
                    link.poke()
                    break
                link.session.confirm(seq)
                confirmed = True
            if confirmed:
                if link.direct is not None:
                    self.acks.due(link)  # written by the ack timer unless a message takes it first
                else:
                    link.poke()
            if not q:
                del self._acking[link]

    # An agent that does not answer a file request within this many seconds is reported unreachable.
    FILE_REQUEST_WAIT_S = 30.0

    async def ask_agent_files(
        self, agent_id: str, request: pm.FileRequest
    ) -> pm.FileResponse | None:
        link = self.links.get(agent_id)
        if link is None or not link.connected:
            return None
        req_id = next(self._req_ids)
        req = pm.FileRequest(
            req_id=req_id,
            op=request.op,
            path=request.path,
            recursive=request.recursive,
            offset=request.offset,
            length=request.length,
        )
        event = trio.Event()
        box: list[pm.FileResponse] = []
        self._file_waiters[req_id] = (event, box)
        try:
            link.session.send(req)
            link.poke()
            with trio.move_on_after(self.FILE_REQUEST_WAIT_S):
                await event.wait()
        finally:
            del self._file_waiters[req_id]
        return box[0] if box else None

    async def ask_agent(
        self, agent_id: str, make: Callable[[int], pm.Msg], wait: float
    ) -> Any | None:
        """Send the request `make(req_id)` to an agent and wait for the answer with that req_id
        (None: not connected, or no answer within `wait` seconds)."""
        link = self.links.get(agent_id)
        if link is None or not link.connected:
            return None
        req_id = next(self._req_ids)
        event = trio.Event()
        box: list[Any] = []
        self._file_waiters[req_id] = (event, box)
        try:
            link.session.send(make(req_id))
            link.poke()
            with trio.move_on_after(wait):
                await event.wait()
        finally:
            del self._file_waiters[req_id]
        return box[0] if box else None

    def close(self) -> None:
        self.store.close()
