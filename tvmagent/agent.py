"""The TVM agent: one object composing its parts, and the Trio glue that carries out the decisions
of its state machine.

* tvmagent/state.py decides (run, cancel, defer, hand back, report, delete): `AgentState.handle(event)`
  returns instructions, which `_carry_out` performs.
* tvmagent/link.py moves frames to and from the coordinator (one session for the agent's life).
* tvmagent/lifecycle.py joins, leaves, reboots and wipes the TVM; tvmagent/runner.py runs a task;
  tvmagent/pool_isolation.py and tvmagent/limits.py keep the TVM's isolation and limits;
  tvmagent/files.py serves file requests.

One agent backs at most one TVM at a time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from protocol import messages as pm

from . import _cgroups, host_health, isolation, layout
from .degraded import detect_degraded
from .downloads import DownloadCache
from .files import serve as serve_files
from .identity import AgentIdentity
from .lifecycle import TvmLifecycle
from .limits import DISK_CHECK_INTERVAL, TaskLimits
from .link import AgentRejected as AgentRejected
from .link import Link
from .link import agent_url as agent_url
from .link import next_backoff as next_backoff
from .metrics import HostSampler, host_facts
from .nodeusers import NodeUsers
from .pool_isolation import PoolIsolation
from .runner import START_TASK_SLOT, TaskRunner
from .sandbox import Sandbox, SandboxCapabilities
from .state import (
    AgentState,
    CancelReceived,
    CompletionQueued,
    DeleteFilesReceived,
    DeleteTaskFiles,
    DiskMeasured,
    DrainGraceOver,
    DrainStarted,
    Instruction,
    KillProcess,
    KillStartTask,
    QueueTick,
    QueueTvmOp,
    RetentionLoaded,
    RetentionSweep,
    Run,
    RunFinished,
    RunTaskReceived,
    SaveRetention,
    Send,
    SendCompletion,
    SessionRestarted,
    StartRun,
    TvmOpReceived,
    Warn,
    Welcomed,
)
from .taskdirs import (
    CLEANED_MARKER,
    detach_task_dir,
    empty_trash,
    load_retention,
    remove_detached,
    save_retention,
)
from .taskenv import TvmIdentity, task_dir
from .taskqueue import WAIT_S

log = logging.getLogger("tvm.agent")

REUSE_CGROUPS = 64


@dataclass
class AgentOptions:
    coordinator: str  # ws://host:port/agent (http:// is accepted and converted)
    token: str
    root: str
    agent_id: str = ""
    private_dir: str = ""  # agent-id, credential: 0700, outside the root (default ROOT.private)
    heartbeat_interval: float = 5.0
    reconnect_max_backoff: float = 30.0
    retention_sweep_interval: float = 20.0
    task_user: str | None = None
    use_bwrap: bool = False
    drain_grace: float = 60.0
    ca_file: str | None = None  # trust this CA for wss:// and https:// to the coordinator
    # "users": a root agent runs each task as its own unprivileged user (tvmagent/isolation.py);
    # "none": as the agent's user. Empty: $TVM_AGENT_TASK_ISOLATION, else "users".
    task_isolation: str = ""
    capabilities: list[str] = field(
        default_factory=lambda: ["files", "starttask", "certs", pm.TASK_QUEUE]
    )


def cgroup_prefix(agent_id: str, root: str) -> str:
    digest = hashlib.sha256(os.path.realpath(root).encode()).hexdigest()[:8]
    return f"tvm-{_cgroups.sanitize_name(agent_id, 30)}-{digest}"


class Agent:
    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.root = os.path.abspath(opts.root)
        self.private_dir = layout.prepare_agent_dirs(self.root, opts.private_dir)
        self.agent_id = opts.agent_id or layout.load_agent_id(self.private_dir)
        self.state = AgentState()
        self._changed = trio.Event()
        self.caps = SandboxCapabilities.detect()
        # Task cgroups are kept and reused (emptied) up to REUSE_CGROUPS: cgroupfs mkdir/rmdir per task
        # cost more than the rest of a short task's set-up.
        # The prefix is this agent's own, so the empty cgroups a killed agent kept for reuse can be
        # removed at its restart: its id and its root (two agents given one --name on a host, or
        # two test runs naming theirs alike, would otherwise remove each other's live cgroups).
        self.sandbox = Sandbox(
            self.caps,
            cgroup_prefix=cgroup_prefix(self.agent_id, self.root),
            reuse_cgroups=REUSE_CGROUPS,
        )
        self.sandbox.remove_empty_leftovers()
        self.ssl_context: ssl.SSLContext | None = None
        if opts.ca_file:
            self.ssl_context = ssl.create_default_context(cafile=opts.ca_file)
        self.identity = AgentIdentity(self.agent_id, self._read_private, self._write_private)
        # One uid per running task from a host-wide pool, unless an operator fixed --task-user.
        mode = opts.task_isolation or os.environ.get("TVM_AGENT_TASK_ISOLATION", "") or "users"
        if mode not in ("users", "none"):
            raise ValueError(f"task isolation must be 'users' or 'none', not {mode!r}")
        self.slot_users = (
            isolation.SlotUsers()
            if mode == "users" and self.caps.can_switch_user and not opts.task_user
            else None
        )
        self.degraded = detect_degraded(
            self.caps,
            self.root,
            isolation_mode=mode,
            task_user=opts.task_user,
            per_task_users=self.slot_users is not None,
        )
        self.cache = DownloadCache(
            os.path.join(self.root, "cache"), verify=self.ssl_context or True
        )
        self.sampler = HostSampler(self.root)
        self._nursery: trio.Nursery | None = None
        self.link = Link(
            opts.coordinator,
            self.agent_id,
            self.ssl_context,
            opts.reconnect_max_backoff,
            hello=self._hello,
            on_welcome=self._welcomed,
            on_message=self._handle,
            heartbeat=self._heartbeat,
            on_acks=self._notify_changed,
            # Completions wait a moment for more to share their frame while tasks wait for slots:
            # the next task starts meanwhile, nobody waits for these.
            hold=lambda: bool(self.state.slots.waiting),
        )
        self.isolation = PoolIsolation(
            self.root,
            self.agent_id,
            opts.task_user,
            self.slot_users,
            self.sandbox,
            current_tvm=lambda: self.tvm,
            nursery=lambda: self._nursery,
        )
        self.isolation.sweep_and_record()
        self.node_users = NodeUsers(
            self.private_dir,
            self.send,
            lambda: self._nursery,
            lambda: self.tvm.tvm_name if self.tvm is not None else "",
            lambda: self.isolation.pool_group,
        )
        self.isolation.node_users = self.node_users
        self.limits = TaskLimits(self.root)
        self.runner = TaskRunner(
            self.root,
            opts.task_user,
            opts.use_bwrap,
            self.sandbox,
            self.isolation,
            self.limits,
            self.cache,
            self.state,
            send=self.send,
            send_lazily=self.link.send_lazily,
            http_base=lambda: self.link.http_base,
            http_headers=self.identity.http_headers,
            finished=self._run_finished,
        )
        self.lifecycle = TvmLifecycle(
            self.root,
            self.state,
            self.runner,
            self.isolation,
            self.limits,
            self.sandbox,
            send=self.send,
            carry_out=self._carry_out,
            wait_idle=self._wait_idle,
            nursery=lambda: self._nursery,
        )
        self.health = self.lifecycle.health  # host state checks (host_health.py)
        self.lifecycle.heartbeat = self._heartbeat

    # ------------------------------------------------------------------ what others read

    @property
    def tvm(self) -> TvmIdentity | None:
        return self.lifecycle.tvm

    @property
    def running(self) -> dict[str, Run]:
        return self.state.running

    @property
    def draining(self) -> bool:
        return self.state.draining

    @property
    def connected(self) -> trio.Event:
        return self.link.connected

    # ------------------------------------------------------------------ private files

    def _read_private(self, name: str) -> str:
        try:
            with open(os.path.join(self.private_dir, name)) as f:
                return f.read().strip()
        except FileNotFoundError:
            return ""

    def _write_private(self, name: str, value: str) -> None:
        path = os.path.join(self.private_dir, name)
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    # ------------------------------------------------------------------ main loop

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for line in self.caps.describe():
            log.info("sandbox: %s", line)
        if self.slot_users is not None:
            log.info(
                "sandbox: tasks run as per-task users %s<N> (plus the pool's group %s<hash>); runElevated "
                "tasks as root",
                isolation.SLOT_PREFIX,
                isolation.POOL_GROUP_PREFIX,
            )
            host_health.check_user_database(self.health)
            blocked = isolation.untraversable_parent(self.root)
            if blocked:
                log.warning(
                    "sandbox: task users cannot enter %s (no o+x): their tasks will fail to reach the "
                    "TVM root %s",
                    blocked,
                    self.root,
                )
        elif self.opts.task_user:
            log.info(
                "sandbox: every task runs as %s (runElevated tasks as root)", self.opts.task_user
            )
        elif self.caps.can_switch_user:
            log.warning("sandbox: task isolation is off: tasks run as the agent's user (root)")
        for line in self.isolation.describe_ports():
            log.info("ports: %s", line)
        try:  # before the task directory stock looks at tasks/
            host_health.adopt_tvm_dirs(self.root, self.slot_users is not None)
        except host_health.AdoptError as exc:
            self.health.broken("tvm-directories", str(exc))
        host_health.check_cgroups(self.health, self.caps.layout, self.sandbox.cgroup_prefix)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(trio.to_thread.run_sync, empty_trash, self.root)
                nursery.start_soon(self._retention_loop)
                nursery.start_soon(self._queue_loop)
                nursery.start_soon(self.link.lazy_sender)
                nursery.start_soon(self._disk_watch_loop)
                nursery.start_soon(self.runner.keep_stock)
                if self.caps.task_mounts is not None:
                    nursery.start_soon(self.caps.task_mounts.keep)
                nursery.start_soon(
                    host_health.recheck_loop,
                    self.health,
                    self.caps.layout,
                    self.sandbox.cgroup_prefix,
                    self.lifecycle.retry_join,
                )
                await self.node_users.start()
                task_status.started()
                await self.link.connect_loop()
        finally:
            left = self.sandbox.close()  # the idle task cgroups kept for reuse
            self.isolation.drop_pool_group_at_exit()
            self.isolation.forget_record(left)

    def send(self, msg: pm.Msg) -> None:
        self.link.send(msg)

    def _hello(self) -> pm.Hello:
        session = self.link.session
        return pm.Hello(
            **self.identity.hello_fields(),  # type: ignore[arg-type]
            agent_id=self.agent_id,
            token=self.opts.token,
            capabilities=self.opts.capabilities,
            session_id=session.session_id,
            last_received=session.received,
            running=self.state.hello_running(),
            finished=self.state.hello_finished(session.peer_acked),
            tvm_name=self.tvm.tvm_name if self.tvm else "",
            **host_facts(self.root),  # type: ignore[arg-type]
            degraded=self.degraded,
        )

    def _welcomed(self, reply: pm.Welcome) -> None:
        self.identity.welcomed()
        self._carry_out(self.state.handle(Welcomed(reply.protocol_minor)))
        session = self.link.session
        if reply.resumed and reply.session_id == session.session_id:
            session.resume(reply.last_received)
        else:
            peer_acked = session.peer_acked
            shift = session.restart(reply.session_id)
            self._carry_out(self.state.handle(SessionRestarted(peer_acked, shift)))

    def _heartbeat(self) -> pm.Msg:
        s = self.sampler.sample()
        host_health.runtime_degraded(self.health, self.isolation, self.slot_users)
        return pm.Heartbeat(
            running=len(self.state.running),
            cpu_percent=s.cpu_percent,
            memory_used_bytes=s.memory_used,
            disk_used_bytes=s.disk_used,
            net_rx_bytes=s.net_rx,
            net_tx_bytes=s.net_tx,
            degraded=self.health.degraded_modes(),
            unusable=self.health.unusable_reason(),
        )

    # ------------------------------------------------------------------ messages

    def _handle(self, msg: pm.Msg) -> None:
        assert self._nursery is not None
        if isinstance(msg, pm.RunTask):
            self._carry_out(self.state.handle(RunTaskReceived(msg.spec, time.time())))
        elif isinstance(msg, pm.CancelTask):
            self._carry_out(
                self.state.handle(CancelReceived(msg.key, msg.attempt, msg.reason, time.time()))
            )
        elif isinstance(msg, (pm.JoinPool, pm.LeavePool, pm.RebootTvm)):
            self._carry_out(self.state.handle(TvmOpReceived(msg)))
        elif isinstance(msg, pm.DeleteTaskFiles):
            self._carry_out(self.state.handle(DeleteFilesReceived(msg.key)))
        elif isinstance(msg, pm.FileRequest):
            self._nursery.start_soon(self._file_request, msg)
        elif isinstance(msg, pm.PoolMembers):
            self.isolation.on_pool_members(list(msg.addresses), msg.pool)
        elif isinstance(msg, pm.NodeUserRequest):
            self._nursery.start_soon(self.node_users.handle, msg)
        elif isinstance(msg, pm.AddUser):
            self._nursery.start_soon(self.node_users.add_login_user, msg)
        elif isinstance(msg, pm.RemoveUser):
            self._nursery.start_soon(self.node_users.remove_login_user, msg.name)
        elif isinstance(msg, pm.Ping):
            pass
        elif isinstance(msg, pm.Unsupported):
            log.warning("coordinator does not support message type %s", msg.type)

    def _carry_out(self, instructions: list[Instruction]) -> None:
        for ins in instructions:
            if isinstance(ins, StartRun):
                assert self._nursery is not None
                assert self.tvm is not None
                self._nursery.start_soon(self.runner.run_task, ins.spec, self.tvm)
            elif isinstance(ins, KillProcess):
                self.runner.kill(ins.key)
            elif isinstance(ins, SendCompletion):
                # With no other task running, no other completion can share its frame: at once.
                seq = self.link.send(ins.msg, now=not self.state.running)
                self.state.handle(CompletionQueued(ins.msg.key, ins.msg.attempt, seq))
            elif isinstance(ins, Send):
                self.send(ins.msg)
            elif isinstance(ins, SaveRetention):
                save_retention(task_dir(self.root, ins.key), ins.deadline)
            elif isinstance(ins, DeleteTaskFiles):
                assert self._nursery is not None
                tdir = task_dir(self.root, ins.key)
                self._nursery.start_soon(
                    trio.to_thread.run_sync,
                    remove_detached,
                    detach_task_dir(self.root, tdir),
                    tdir,
                    ins.cleaned,
                )
            elif isinstance(ins, QueueTvmOp):
                self.lifecycle.queue(ins.msg)
            elif isinstance(ins, KillStartTask):
                self.runner.kill(START_TASK_SLOT)
            elif isinstance(ins, Warn):
                log.warning("%s", ins.text)

    def _run_finished(
        self,
        key: str,
        exit_code: int,
        start: float,
        end: float,
        failure: pm.Failure | None,
        uploaded: list[pm.OutputUploaded] | None = None,
    ) -> None:
        out = self.state.handle(
            RunFinished(
                key, exit_code, start, end, failure, self.link.session.peer_acked, uploaded or []
            )
        )
        done = next((i.msg for i in out if isinstance(i, SendCompletion)), None)
        if done is not None:  # the failure as reported (a drained run's is AgentStopping)
            f = done.failure
            log.log(
                logging.INFO if f or exit_code else logging.DEBUG,
                "task finished: exit code %s%s",
                exit_code,
                f", {f.code}: {f.message}" if f else "",
            )
        self._notify_changed()
        self._carry_out(out)

    # ------------------------------------------------------------------ retention, disk, files

    async def _retention_loop(self) -> None:
        # Deadlines survive an agent restart: each finished task leaves one beside its directory.
        self.state.handle(RetentionLoaded(await trio.to_thread.run_sync(load_retention, self.root)))
        while True:
            await trio.sleep(self.opts.retention_sweep_interval)
            self._carry_out(self.state.handle(RetentionSweep(time.time())))

    async def _queue_loop(self) -> None:
        # Hands back what waited too long for a slot (taskqueue.WAIT_S); a few checks per WAIT_S.
        while True:
            await trio.sleep(WAIT_S / 4)
            if self.state.slots.waiting:
                self._carry_out(self.state.handle(QueueTick(time.time())))

    async def _disk_watch_loop(self) -> None:
        while True:
            await trio.sleep(DISK_CHECK_INTERVAL)
            if self.limits.disk_limit and self.state.running:
                keys = [k for k, r in self.state.running.items() if not r.cancelled]
                usage = await self.limits.measure(keys)
                self._carry_out(self.state.handle(DiskMeasured(usage, self.limits.disk_limit)))

    async def _file_request(self, req: pm.FileRequest) -> None:
        try:
            resp = await trio.to_thread.run_sync(
                lambda: serve_files(self.root, req, cleaned_marker=CLEANED_MARKER)
            )
        except Exception as exc:  # noqa: BLE001 - reported to the caller, not fatal
            resp = pm.FileResponse(req_id=req.req_id, error_code="FileReadFailed", message=str(exc))
        self.send(resp)

    # ------------------------------------------------------------------ waiting and draining

    def _notify_changed(self) -> None:
        """Running tasks or acknowledgements changed: wake whoever waits in `_until`."""
        self._changed.set()
        self._changed = trio.Event()

    async def _until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            await self._changed.wait()

    async def _wait_idle(self, grace: float) -> None:
        with trio.move_on_after(grace):
            await self._until(lambda: not self.state.running)

    async def drain(self, grace: float) -> None:
        """Stop taking tasks, let running ones finish for up to `grace` seconds, then kill them."""
        self._carry_out(self.state.handle(DrainStarted()))
        with trio.move_on_after(grace):
            await self._until(lambda: not self.state.running)
        if self.state.running:
            log.warning(
                "drain grace of %.0f s over: killing %d task(s), they will be requeued",
                grace,
                len(self.state.running),
            )
        self._carry_out(self.state.handle(DrainGraceOver()))
        await self._wait_idle(10)
        # Give the writer a moment to deliver the last completions.
        session = self.link.session
        with trio.move_on_after(2):
            await self._until(lambda: not session.unacked_count or not self.link.connected.is_set())
