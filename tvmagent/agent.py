"""The TVM agent's Trio shell: link to the coordinator, run tasks, serve files, clean up.

One agent backs at most one TVM at a time. It keeps one `LinkSession` for its whole life, so a
completion survives any number of reconnects until the coordinator acknowledges it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import math
import os
import random
import shutil
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from protocol import SUBPROTOCOL, LinkSession, ProtocolError, agent_codec
from protocol import messages as pm

from . import _cgroups, cmdline, isolation, layout
from ._agent_isolation import IsolationMixin
from ._agent_limits import LimitsMixin
from .degraded import detect_degraded
from .downloads import DownloadCache, DownloadError
from .files import serve as serve_files
from .identity import FATAL_REJECTS, AgentIdentity
from .metrics import HostSampler, host_facts
from .sandbox import LaunchError, ProcessSpec, RunningProcess, Sandbox, SandboxCapabilities
from .taskenv import TvmIdentity, start_task_env, task_dir, task_env

log = logging.getLogger("tvm.agent")

WALL_CLOCK_EXIT_CODE = 0xC000013A
CLEANED_MARKER = ".tvm-cleaned"
RETENTION_SUFFIX = ".tvm-retention"  # beside a finished task's directory: when it may be deleted
RETENTION_XATTR = "user.tvm.retention"  # the same on the directory itself, where xattrs work
# A TaskStarted waits this long for a frame to share (a short task's TaskCompleted) before it goes alone.
LAZY_SEND_S = 0.02
REUSE_CGROUPS = 64


# A link that stayed up this long resets the reconnect backoff when it drops.
STABLE_LINK_S = 1.0


class AgentRejected(Exception):
    pass


@dataclass
class _Running:
    spec: pm.TaskSpec
    process: RunningProcess | None = None
    cancelled: bool = False
    cancel_reason: str = ""
    cancel_code: str = "TaskEnded"  # the failure code of a killed run (DiskLimitExceeded, ...)
    abandoned: bool = False  # killed by the drain: reported as AGENT_STOPPING so it is requeued


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
    ca_file: str | None = None  # trust this CA for wss:// and https:// to the coordinator (issue 8)
    # "users": a root agent runs each task as its own unprivileged user (tvmagent/isolation.py);
    # "none": as the agent's user. Empty: $TVM_AGENT_TASK_ISOLATION, else "users".
    task_isolation: str = ""
    capabilities: list[str] = field(default_factory=lambda: ["files", "starttask", "certs"])


def agent_url(url: str) -> str:
    if url.startswith("http://"):
        url = "ws://" + url[len("http://"):]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://"):]
    if not url.rstrip("/").endswith("/agent"):
        url = url.rstrip("/") + "/agent"
    return url


class Agent(IsolationMixin, LimitsMixin):
    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        self.root = os.path.abspath(opts.root)
        self.private_dir = layout.prepare_agent_dirs(self.root, opts.private_dir)
        self.agent_id = opts.agent_id or layout.load_agent_id(self.private_dir)
        self.session = LinkSession(agent_codec())
        self.wake = trio.Event()
        self._lazy_wake = trio.Event()
        self.tvm: TvmIdentity | None = None
        self.running: dict[str, _Running] = {}
        self._changed = trio.Event()
        # task key -> (attempt, seq of its TaskCompleted) until the coordinator acknowledges it
        self.unacked_done: dict[str, tuple[int, int]] = {}
        self.deferred_runs: dict[str, pm.TaskSpec] = {}  # key -> new attempt waiting for the old run
        self.retention: dict[str, float] = {}  # task key -> unix time its directory may be deleted
        self.caps = SandboxCapabilities.detect()
        # Task cgroups are kept and reused (emptied) up to REUSE_CGROUPS: cgroupfs mkdir/rmdir per task
        # cost more than the rest of a short task's set-up.
        # The prefix is this agent's own (the whole id, not a hostname prefix several agents of a host
        # share), so the empty cgroups a killed agent kept for reuse can be removed at its restart.
        self.sandbox = Sandbox(self.caps, cgroup_prefix=f"tvm-{_cgroups.sanitize_name(self.agent_id, 36)}",
                               reuse_cgroups=REUSE_CGROUPS)
        self.sandbox.remove_empty_leftovers()
        # Issue 8: TLS trust, per-agent credential, task users, port fence, remote-login users.
        self.ssl_context: ssl.SSLContext | None = None
        if opts.ca_file:
            self.ssl_context = ssl.create_default_context(cafile=opts.ca_file)
        self.identity = AgentIdentity(self.agent_id, self._read_private, self._write_private)
        # One uid per running task from a host-wide pool, unless an operator fixed --task-user.
        mode = opts.task_isolation or os.environ.get("TVM_AGENT_TASK_ISOLATION", "") or "users"
        if mode not in ("users", "none"):
            raise ValueError(f"task isolation must be 'users' or 'none', not {mode!r}")
        self.slot_users = (isolation.SlotUsers() if mode == "users" and self.caps.can_switch_user
                           and not opts.task_user else None)
        self.fence: object | None = None  # ports.PortGate or the nft table name
        self.degraded = detect_degraded(self.caps, self.root, isolation_mode=mode, task_user=opts.task_user,
                                        per_task_users=self.slot_users is not None)
        self.login_users: dict[str, float] = {}  # remote-login user -> expiry
        self.cache = DownloadCache(os.path.join(self.root, "cache"),
                                   **({"verify": self.ssl_context} if self.ssl_context else {}))
        self.sampler = HostSampler(self.root)
        self.connected = trio.Event()
        self._coordinator_heartbeat = 0.0  # the last Welcome's heartbeat interval (reconnect cap)
        self.draining = False
        self._nursery: trio.Nursery | None = None
        self._http_base = ""
        self._tvm_scope: trio.CancelScope | None = None
        # Issue 5: join/leave/reboot run one at a time; a running start task can be interrupted.
        self._tvm_lock = trio.Lock()
        self._tvm_ops_send, self._tvm_ops_recv = trio.open_memory_channel[pm.Msg](math.inf)
        self._tvm_ops_started = False
        self._start_run: _Running | None = None
        self._setup_replies: list[pm.Msg] = []  # what the last setup reported, resent on a repeated join

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
            log.info("sandbox: tasks run as per-task users %s<N> (plus the pool's group %s<hash>); runElevated "
                     "tasks as root", isolation.SLOT_PREFIX, isolation.POOL_GROUP_PREFIX)
            blocked = isolation.untraversable_parent(self.root)
            if blocked:
                log.warning("sandbox: task users cannot enter %s (no o+x): their tasks will fail to reach the "
                            "TVM root %s", blocked, self.root)
        elif self.opts.task_user:
            log.info("sandbox: every task runs as %s (runElevated tasks as root)", self.opts.task_user)
        elif self.caps.can_switch_user:
            log.warning("sandbox: task isolation is off: tasks run as the agent's user (root)")
        for line in self._describe_ports():
            log.info("ports: %s", line)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._retention_loop)
                nursery.start_soon(self._lazy_sender)
                nursery.start_soon(self._disk_watch_loop)
                task_status.started()
                await self._connect_loop()
        finally:
            self.sandbox.close()  # the idle task cgroups kept for reuse
            self._drop_pool_group_at_exit()

    def send(self, msg: pm.Msg) -> None:
        self.session.send(msg)
        self.wake.set()

    async def _connect_loop(self) -> None:
        url = agent_url(self.opts.coordinator)
        self._http_base = url.replace("ws://", "http://").replace("wss://", "https://").rsplit("/agent", 1)[0]
        backoff = 0.1
        while True:
            attempt_started = trio.current_time()
            try:
                await self._connection(url)
                backoff = 0.1
            except Exception as exc:  # noqa: BLE001 - classified below
                leaf = _first_leaf(exc)
                if isinstance(leaf, AgentRejected):
                    raise leaf from None
                if not isinstance(leaf, _RETRYABLE):
                    raise
                if self.connected.is_set() and trio.current_time() - attempt_started >= STABLE_LINK_S:
                    # A link that worked for a while: come back fast (a restarted coordinator waits
                    # for its agents only a heartbeat timeout), not after the backoff of old failures.
                    backoff = 0.1
                if self.connected.is_set():
                    log.warning("link to %s lost: %s; reconnecting in %.1f s", url, _describe(leaf), backoff)
                else:
                    log.warning("cannot reach the coordinator at %s: %s; retrying in %.1f s", url,
                                _describe(leaf), backoff)
            self.connected = trio.Event()
            self._notify_changed()
            self.session.connection_lost()
            await trio.sleep(backoff * (0.5 + random.random()))
            backoff = next_backoff(backoff, self.opts.reconnect_max_backoff, self._coordinator_heartbeat)

    async def _connection(self, url: str) -> None:
        codec = self.session.codec
        if url.startswith("wss://"):
            await self._tls_preflight(url)  # trio-websocket turns TLS errors into a bare timeout
        async with open_websocket_url(url, subprotocols=[SUBPROTOCOL], connect_timeout=10,
                                      disconnect_timeout=5, max_message_size=64 * 1024 * 1024,
                                      ssl_context=self.ssl_context) as ws:
            hello = pm.Hello(**self.identity.hello_fields(),  # type: ignore[arg-type]
                agent_id=self.agent_id, token=self.opts.token, capabilities=self.opts.capabilities,
                session_id=self.session.session_id, last_received=self.session.received,
                running=[pm.RunningTask(key=k, attempt=r.spec.attempt) for k, r in self.running.items()],
                finished=[pm.RunningTask(key=k, attempt=a) for k, (a, seq) in self.unacked_done.items()
                          if seq > self.session.peer_acked],
                tvm_name=self.tvm.tvm_name if self.tvm else "", **host_facts(self.root), degraded=self.degraded,
            )
            await ws.send_message(codec.encode(hello))
            with trio.fail_after(15):
                reply = codec.decode_handshake(await ws.get_message())
            if isinstance(reply, pm.Reject):
                log.error("coordinator refused this agent: %s: %s", reply.code, reply.message)
                if reply.code in FATAL_REJECTS:
                    raise AgentRejected(f"{reply.code}: {reply.message}")
                raise ProtocolError(reply.message)
            if not isinstance(reply, pm.Welcome):
                raise ProtocolError("expected welcome")
            self.identity.welcomed()
            if reply.resumed and reply.session_id == self.session.session_id:
                self.session.resume(reply.last_received)
            else:
                self._forget_acked_done()
                shift = self.session.restart(reply.session_id)
                self.unacked_done = {k: (a, seq - shift) for k, (a, seq) in self.unacked_done.items()}
            log.info("connected to %s as %s", url, self.agent_id)
            self._coordinator_heartbeat = reply.heartbeat_interval
            self.connected.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, ws)
                nursery.start_soon(self._heartbeat, reply.heartbeat_interval)
                while True:
                    data = await ws.get_message()
                    if isinstance(data, str):
                        raise ProtocolError("text frame from coordinator")
                    only_runs = True
                    received = self.session.receive_frame(data)
                    self._notify_changed()  # acks may have arrived (drain waits for them)
                    for r in received:
                        self.session.confirm(r.seq)
                        self._handle(r.msg)
                        only_runs = only_runs and isinstance(r.msg, pm.RunTask)
                    if only_runs:
                        # Nobody waits for the acknowledgement of a RunTask: it rides on the task's
                        # TaskStarted/TaskCompleted frame instead of costing both sides a frame of its
                        # own. Anything else (Ping: the coordinator times the link) is acked now.
                        self._lazy_wake.set()
                    else:
                        self.wake.set()

    async def _writer(self, ws) -> None:  # noqa: ANN001 - trio_websocket.WebSocketConnection
        while True:
            frame = self.session.next_frame()
            if frame is None:
                await self.wake.wait()
                self.wake = trio.Event()
                continue
            await ws.send_message(frame)

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            s = self.sampler.sample()
            self.send(pm.Heartbeat(running=len(self.running), cpu_percent=s.cpu_percent,
                                   memory_used_bytes=s.memory_used, disk_used_bytes=s.disk_used,
                                   net_rx_bytes=s.net_rx, net_tx_bytes=s.net_tx))

    # ------------------------------------------------------------------ messages

    def _handle(self, msg: pm.Msg) -> None:
        assert self._nursery is not None
        if isinstance(msg, pm.RunTask):
            key = msg.spec.key
            if self.draining:  # placed before the coordinator saw our Draining: hand it back
                now = time.time()
                self.send(pm.TaskCompleted(key=key, attempt=msg.spec.attempt, exit_code=-1, start_time=now,
                                           end_time=now, failure=pm.Failure(category="ServerError",
                                                                            code=pm.AGENT_STOPPING,
                                                                            message="the agent is stopping")))
                return
            old = self.running.get(key)
            if old is not None and old.spec.attempt != msg.spec.attempt and self.tvm is not None:
                # A requeued task placed here again while its old run is still being cancelled:
                # start the new run as soon as the old one has ended (same task directory).
                self.deferred_runs[key] = msg.spec
                return
            if key in self.running or self.tvm is None:
                if self.tvm is None:
                    now = time.time()
                    self.send(pm.TaskCompleted(key=key, attempt=msg.spec.attempt, exit_code=-1, start_time=now,
                                               end_time=now, failure=pm.Failure(category="ServerError",
                                                                                code="TVMNotReady",
                                                                                message="agent has no TVM")))
                return
            self.running[key] = _Running(msg.spec)
            self._nursery.start_soon(self._run_task, msg.spec)
        elif isinstance(msg, pm.CancelTask):
            waiting = self.deferred_runs.get(msg.key)
            if waiting is not None and waiting.attempt == msg.attempt:
                del self.deferred_runs[msg.key]
            r = self.running.get(msg.key)
            if r is not None and r.spec.attempt == msg.attempt:
                r.cancelled = True
                r.cancel_reason = msg.reason
                if r.process is not None:
                    r.process.kill()
        elif isinstance(msg, (pm.JoinPool, pm.LeavePool, pm.RebootTvm)):
            # TVM lifecycle messages are carried out one after the other, in the order they came.
            if isinstance(msg, (pm.LeavePool, pm.RebootTvm)):
                self._interrupt_start_task(msg.tvm_name)
            if not self._tvm_ops_started:
                self._tvm_ops_started = True
                self._nursery.start_soon(self._tvm_ops_loop)
            self._tvm_ops_send.send_nowait(msg)
        elif isinstance(msg, pm.DeleteTaskFiles):
            self._nursery.start_soon(self._delete_task_files, msg.key)
        elif isinstance(msg, pm.FileRequest):
            self._nursery.start_soon(self._file_request, msg)
        elif isinstance(msg, pm.PoolMembers):
            self._on_pool_members(list(msg.addresses), msg.pool)
        elif isinstance(msg, pm.AddUser):
            self._nursery.start_soon(self._add_login_user, msg)
        elif isinstance(msg, pm.RemoveUser):
            self._nursery.start_soon(self._remove_login_user, msg.name)
        elif isinstance(msg, pm.Ping):
            pass
        elif isinstance(msg, pm.Unsupported):
            log.warning("coordinator does not support message type %s", msg.type)

    # ------------------------------------------------------------------ TVM lifecycle

    async def _tvm_ops_loop(self) -> None:
        async for msg in self._tvm_ops_recv:
            if isinstance(msg, pm.JoinPool):
                await self._join(msg)
            elif isinstance(msg, pm.LeavePool):
                await self._leave(msg)
            elif isinstance(msg, pm.RebootTvm):
                await self._reboot(msg)

    async def _join(self, msg: pm.JoinPool) -> None:
        async with self._tvm_lock:
            if self.tvm is not None and self.tvm.tvm_name == msg.tvm_name and self._setup_replies:
                # Already set up (the coordinator restarted or resent): report again, do not re-run.
                for reply in self._setup_replies:
                    self.send(reply)
                return
            await self._setup(msg)

    async def _setup(self, msg: pm.JoinPool) -> None:
        if self.tvm is not None and self.tvm.tvm_name != msg.tvm_name:
            await self._wipe()
        self._setup_replies = []
        self.tvm = TvmIdentity(account=msg.account, account_url=msg.account_url, pool=msg.pool,
                               tvm_name=msg.tvm_name, root=self.root, port_low=msg.port_range_low,
                               port_high=msg.port_range_high)
        self._apply_join_limits(msg)  # memory share, process and disk limits
        for d in ("tasks", "shared", "start", "certs"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        os.chmod(os.path.join(self.root, "shared"), 0o1777)  # every task writes; only owners delete
        cert_errors = await self._install_certs(msg.certificates)  # before the start task and tasks
        self._pool_bwrap = msg.bubblewrap
        if msg.bubblewrap and not self.caps.has_bwrap:
            log.warning("pool %s asks for bubblewrap, which is not installed: tasks run without it", msg.pool)
        await self._setup_fence(msg)
        ready = pm.TvmReady(tvm_name=msg.tvm_name, cert_errors=cert_errors)
        st = msg.start_task
        if st is not None and st.wait_for_success:
            done = await self._run_start_task(st, msg.tvm_name)
            if done is None:
                return  # interrupted (reboot / leave): whoever interrupted decides what comes next
            self._setup_replies.append(done)
            if done.exit_code != 0 or done.failure is not None:
                return  # TVM stays starttaskfailed; no TvmReady, so no tasks come here
            self._setup_replies.append(ready)
            self.send(ready)
            return
        self._setup_replies.append(ready)
        self.send(ready)
        if st is not None:
            # Tasks do not wait for it, and neither do later TVM operations.
            assert self._nursery is not None
            self._nursery.start_soon(self._background_start_task, st, msg.tvm_name)

    async def _background_start_task(self, st: pm.StartTaskSpec, tvm_name: str) -> None:
        done = await self._run_start_task(st, tvm_name)
        if done is not None and self.tvm is not None and self.tvm.tvm_name == tvm_name:
            self._setup_replies.append(done)

    def _interrupt_start_task(self, tvm_name: str) -> None:
        r = self._start_run
        if r is not None and self.tvm is not None and self.tvm.tvm_name == tvm_name:
            r.cancelled = True
            r.cancel_reason = "TVM rebooted or removed"
            if r.process is not None:
                r.process.kill()

    async def _run_start_task(self, st: pm.StartTaskSpec, tvm_name: str) -> pm.StartTaskCompleted | None:
        """Run the start task with its retries; returns what was reported, None when interrupted."""
        assert self.tvm is not None
        attempts = 0
        wd = os.path.join(self.tvm.start_dir, "wd")
        run = self._start_run = _Running(pm.TaskSpec(key="", attempt=0, command_line=st.command_line, workitem="",
                                                      job="", task="starttask"))
        try:
            while True:
                os.makedirs(wd, exist_ok=True)
                start = time.time()
                self.send(pm.StartTaskStarted(tvm_name=tvm_name, start_time=start, retry_count=attempts))
                failure = await self._fetch_files(st.resource_files, wd)
                code = -1
                if failure is None and not run.cancelled:
                    outcome, _ = await self._spawn(
                        st.command_line, wd, start_task_env(self.tvm, st.env),
                        os.path.join(self.tvm.start_dir, "stdout.txt"),
                        os.path.join(self.tvm.start_dir, "stderr.txt"), "starttask", run, st.run_elevated,
                        lease_dir=self.tvm.start_dir, lease_mode=0o750, hand_back=False)
                    code = outcome.exit_code
                    if outcome.reason == "launch_failed":
                        failure = pm.Failure(category="UserError", code="CommandLaunchFailed",
                                             message=outcome.message)
                if run.cancelled:
                    return None
                ok = failure is None and code == 0
                retry = not ok and failure is None and (
                    st.max_task_retry_count == -1 or attempts < st.max_task_retry_count)
                if ok or not retry:
                    if not ok:
                        _write_text(os.path.join(self.tvm.start_dir, "starttask-failure.txt"),
                                    f"start task failed after {attempts + 1} attempt(s): exit code {code}"
                                    f"{'; ' + failure.code + ': ' + failure.message if failure else ''}\n")
                    done = pm.StartTaskCompleted(exit_code=code, start_time=start, end_time=time.time(),
                                                 retry_count=attempts, failure=failure)
                    self.send(done)
                    return done
                attempts += 1
        finally:
            if self._start_run is run:
                self._start_run = None

    async def _leave(self, msg: pm.LeavePool) -> None:
        async with self._tvm_lock:
            if self.tvm is not None and self.tvm.tvm_name != msg.tvm_name:
                return  # an old request: this agent backs another TVM now
            await self._wipe()
            self.send(pm.TvmLeft(tvm_name=msg.tvm_name))

    async def _reboot(self, msg: pm.RebootTvm) -> None:
        """Restart the sandbox: kill every task process; a reimage also wipes the TVM's directories.
        The coordinator's JoinPool that follows sets the TVM up again and re-runs the start task."""
        async with self._tvm_lock:
            if self.tvm is None or self.tvm.tvm_name != msg.tvm_name:
                return
            await self._kill_all("TVM rebooting")
            self._setup_replies = []
            if msg.reimage:
                self.retention.clear()
                for d in ("tasks", "shared", "start"):
                    await trio.to_thread.run_sync(shutil.rmtree, os.path.join(self.root, d), True)
            log.info("TVM %s %s", msg.tvm_name, "reimaged" if msg.reimage else "rebooted")

    async def _kill_all(self, reason: str) -> None:
        for r in list(self.running.values()):
            r.cancelled = True
            r.cancel_reason = reason
            if r.process is not None:
                r.process.kill()
        with trio.move_on_after(10):
            await self._until(lambda: not self.running)

    async def _wipe(self) -> None:
        self.deferred_runs.clear()
        await self._kill_all("TVM removed")
        self.sandbox.close()
        self.tvm = None
        self._setup_replies = []
        self._task_memory_limit = 0
        self.retention.clear()
        await self._teardown_isolation()
        for d in ("tasks", "shared", "start", "certs"):
            await trio.to_thread.run_sync(shutil.rmtree, os.path.join(self.root, d), True)

    # ------------------------------------------------------------------ tasks

    async def _fetch_files(self, files: list[pm.ResourceFile], dest: str) -> pm.Failure | None:
        for rf in files:
            url = rf.url
            headers = dict(rf.headers)
            if url.startswith("filestore:sha256:"):
                sha = url.rsplit(":", 1)[1]
                url = f"{self._http_base}/files/sha256/{sha}"
                headers.update(self.identity.http_headers())
                expected = rf.sha256 or sha
            else:
                expected = rf.sha256 or None
            try:
                await self.cache.fetch(url, dest, rf.file_path, sha256=expected or None,
                                       size=rf.size if rf.size >= 0 else None, headers=headers or None,
                                       **self._resource_file_mode())
            except DownloadError as exc:
                return pm.Failure(category="UserError", code=exc.code, message=exc.message)
        return None

    async def _spawn(self, command_line: str, cwd: str, env: dict[str, str], out: str, err: str, name: str,
                     running: _Running | None, elevated: bool, wall: float = 0.0,
                     setup: Callable[[], None] | None = None, lease_dir: str = "", lease_mode: int = 0o700,
                     hand_back: bool = True, announce: pm.TaskSpec | None = None):  # noqa: ANN202
        """Run one command to its end. The blocking set-up — `setup()` (directories), fresh output
        files, a task user's lease for `lease_dir` (issue 8), cgroup, fork/exec — is one worker-thread
        call; `announce`: send its TaskStarted once the process runs (lazily, see `_send_lazily`)."""
        leases: list[isolation.SlotLease | None] = []

        def prepare(spec: ProcessSpec) -> ProcessSpec:  # runs in the sandbox's worker thread
            if setup is not None:
                setup()
            for p in (out, err):
                with open(p, "wb"):
                    pass  # a retry starts with fresh output files
            # Split here, off the event loop, in linear time (a poison line must not stall the agent).
            try:
                spec = dataclasses.replace(spec, argv=cmdline.parse(command_line))
            except ValueError as exc:  # CommandLineError, or ProcessSpec refusing e.g. an empty program
                raise LaunchError(str(exc)) from None
            if lease_dir:
                lease = self._lease_now(lease_dir, elevated, lease_mode, keep=not hand_back)
                leases.append(lease)
                if lease is not None:
                    spec = self._as_lease_user(spec, lease)
            return spec

        # argv: a placeholder until prepare() splits the command line in the worker thread.
        spec = ProcessSpec(argv=["-"], cwd=cwd, env=env, stdout_path=out, stderr_path=err,
                           run_as=None if elevated else (self.opts.task_user or None),
                           use_bwrap=self.opts.use_bwrap or self._pool_bwrap, name=name,
                           **self._bwrap_paths(),
                           **self._limit_kwargs())
        try:
            proc = await self.sandbox.start(spec, prepare)
            if announce is not None and proc.pid is not None:
                self._send_lazily(pm.TaskStarted(key=announce.key, attempt=announce.attempt,
                                                 start_time=proc.start_time.timestamp()))
            if running is not None:
                running.process = proc
                if running.cancelled:
                    proc.kill()
            timed_out = False
            if wall > 0:
                with trio.move_on_after(wall) as cs:
                    outcome = await proc.wait()
                if cs.cancelled_caught:
                    timed_out = True
                    proc.kill()
                    outcome = await proc.wait()
            else:
                outcome = await proc.wait()
        finally:
            if leases and hand_back:
                await self._return_lease(leases[0], lease_dir)
            elif leases and leases[0] is not None:
                self._keep_lease(leases[0])  # the start task's directory stays its user's (0750, pool group)
        return outcome, timed_out

    def _send_lazily(self, msg: pm.Msg) -> None:
        """Queue a message that need not travel alone: it leaves with the next frame (a quick task's
        TaskCompleted), or at most LAZY_SEND_S later. One frame per short task instead of two."""
        self.session.send(msg)
        self._lazy_wake.set()

    async def _lazy_sender(self) -> None:
        while True:
            await self._lazy_wake.wait()
            self._lazy_wake = trio.Event()
            await trio.sleep(LAZY_SEND_S)
            self.wake.set()

    async def _run_task(self, spec: pm.TaskSpec) -> None:
        running = self.running[spec.key]
        assert self.tvm is not None
        tvm = self.tvm
        # Every log line of this Trio task (ours and the libraries') carries the task's ids.
        structlog.contextvars.bind_contextvars(task=spec.key, job=f"{spec.workitem}/{spec.job}",
                                               tvm=tvm.tvm_name, attempt=spec.attempt)
        log.debug("task starting")
        tdir = task_dir(self.root, spec.key)
        wd = os.path.join(tdir, "wd")
        start = time.time()
        try:
            failure = None
            if spec.resource_files:
                # Running from here on (downloads count as the task's run); the spawn's own thread
                # call repeats the (idempotent) directory set-up.
                await trio.to_thread.run_sync(_prepare_task_dir, tdir, wd)
                self.send(pm.TaskStarted(key=spec.key, attempt=spec.attempt, start_time=start))
                failure = await self._fetch_files(spec.resource_files, wd)
            exit_code = -1
            if failure is None and not running.cancelled:
                # Issue 8: a uid of its own; its directory 0700 to it, handed back to root afterwards.
                outcome, timed_out = await self._spawn(
                    spec.command_line, wd, task_env(tvm, spec), os.path.join(tdir, "stdout.txt"),
                    os.path.join(tdir, "stderr.txt"), _cg_name(spec), running, spec.run_elevated,
                    spec.max_wall_clock_s, setup=functools.partial(_prepare_task_dir, tdir, wd),
                    lease_dir=tdir, lease_mode=0o700, announce=None if spec.resource_files else spec)
                exit_code = outcome.exit_code
                start = outcome.start_time.timestamp()
                if timed_out:
                    exit_code = WALL_CLOCK_EXIT_CODE
                    failure = pm.Failure(category="ServerError", code="TaskEnded",
                                         message=f"maxWallClockTime of {spec.max_wall_clock_s:g} s exceeded; "
                                                 "the task's process tree was killed")
                elif outcome.reason == "launch_failed":
                    failure = pm.Failure(category="UserError", code="CommandLaunchFailed", message=outcome.message)
                elif outcome.reason == "oom":
                    failure = pm.Failure(category="UserError", code="TaskMemoryLimitExceeded",
                                         message=outcome.message)
                elif running.cancelled:
                    failure = pm.Failure(category="UserError", code=running.cancel_code,
                                         message=f"task killed: {running.cancel_reason}")
                else:
                    failure = await self._disk_verdict(spec.key)  # a writer quicker than the check
            elif running.cancelled:
                failure = pm.Failure(category="UserError", code="TaskEnded", message=running.cancel_reason)
        except Exception as exc:  # the task fails, never the agent
            log.exception("task %s failed inside the agent", spec.key)
            exit_code = -1
            failure = pm.Failure(category="ServerError", code="AgentError", message=f"{type(exc).__name__}: {exc}")
        end = time.time()
        if running.abandoned:
            failure = pm.Failure(category="ServerError", code=pm.AGENT_STOPPING,
                                 message="the agent stopped before the task finished")
        log.log(logging.INFO if failure or exit_code else logging.DEBUG, "task finished: exit code %s%s",
                exit_code, f", {failure.code}: {failure.message}" if failure else "")
        self.running.pop(spec.key, None)
        self._notify_changed()
        self.retention[spec.key] = end + spec.retention_s
        _save_retention(task_dir(self.root, spec.key), end + spec.retention_s)
        deferred = self.deferred_runs.pop(spec.key, None)
        if deferred is not None and self.tvm is not None and self._nursery is not None:
            self.running[spec.key] = _Running(deferred)
            self._nursery.start_soon(self._run_task, deferred)
        self._forget_acked_done()
        self.unacked_done[spec.key] = (spec.attempt, self.session.send(pm.TaskCompleted(
            key=spec.key, attempt=spec.attempt, exit_code=exit_code, start_time=start,
                                   end_time=end, failure=failure)))
        self.wake.set()

    def _forget_acked_done(self) -> None:
        acked = self.session.peer_acked
        for key in [k for k, (_, seq) in self.unacked_done.items() if seq <= acked]:
            del self.unacked_done[key]

    # ------------------------------------------------------------------ retention and files

    async def _retention_loop(self) -> None:
        # Deadlines survive an agent restart: each finished task leaves one beside its directory.
        for key, deadline in (await trio.to_thread.run_sync(_load_retention, self.root)).items():
            self.retention.setdefault(key, deadline)
        while True:
            await trio.sleep(self.opts.retention_sweep_interval)
            now = time.time()
            for key, deadline in list(self.retention.items()):
                if deadline <= now and key not in self.running:
                    del self.retention[key]
                    await self._delete_task_files(key, cleaned=True)

    async def _delete_task_files(self, key: str, cleaned: bool = False) -> None:
        if key in self.running:
            r = self.running[key]
            r.cancelled = True
            if r.process is not None:
                r.process.kill()
        if not cleaned:
            self.retention.pop(key, None)  # deleted: nothing left for the sweep to do
        await trio.to_thread.run_sync(_remove_task_dir, task_dir(self.root, key), cleaned)

    async def _file_request(self, req: pm.FileRequest) -> None:
        try:
            resp = await trio.to_thread.run_sync(
                lambda: serve_files(self.root, req, cleaned_marker=CLEANED_MARKER))
        except Exception as exc:  # noqa: BLE001 - reported to the caller, not fatal
            resp = pm.FileResponse(req_id=req.req_id, error_code="FileReadFailed", message=str(exc))
        self.send(resp)

    def _notify_changed(self) -> None:
        """Running tasks or acknowledgements changed: wake whoever waits in `_until`."""
        self._changed.set()
        self._changed = trio.Event()

    async def _until(self, cond: Callable[[], bool]) -> None:
        while not cond():
            await self._changed.wait()

    async def drain(self, grace: float) -> None:
        """Stop taking tasks, let running ones finish for up to `grace` seconds, then kill them."""
        self.draining = True
        self.send(pm.Draining(reason="agent stopping"))
        with trio.move_on_after(grace):
            await self._until(lambda: not self.running)
        if self.running:
            log.warning("drain grace of %.0f s over: killing %d task(s), they will be requeued", grace,
                        len(self.running))
        for r in list(self.running.values()):
            r.cancelled = True
            r.cancel_reason = "agent stopped"
            r.abandoned = True
            if r.process is not None:
                r.process.kill()
        with trio.move_on_after(10):
            await self._until(lambda: not self.running)
        # Give the writer a moment to deliver the last completions.
        with trio.move_on_after(2):
            await self._until(lambda: not self.session.unacked_count or not self.connected.is_set())


_RETRYABLE = (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError, ProtocolError)


def next_backoff(backoff: float, max_backoff: float, coordinator_heartbeat: float) -> float:
    """Double the reconnect delay up to `max_backoff` — but once a coordinator told us its heartbeat
    interval, retry at least that often: a restarted coordinator waits one heartbeat timeout (four
    intervals) for its agents before it re-places their tasks elsewhere."""
    cap = max_backoff
    if coordinator_heartbeat > 0:
        cap = min(cap, max(0.1, coordinator_heartbeat))
    return min(backoff * 2, cap)


def _first_leaf(exc: BaseException) -> BaseException:
    """Trio nurseries wrap errors in groups; the link cares about the first real one."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _prepare_task_dir(tdir: str, wd: str) -> None:
    """A task placed again (retry, requeue) after its files were cleaned up has files again."""
    for suffix in (CLEANED_MARKER, RETENTION_SUFFIX):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tdir + suffix)
    with contextlib.suppress(OSError):  # no such attribute / directory: the usual case
        os.removexattr(tdir, RETENTION_XATTR)
    os.makedirs(wd, exist_ok=True)


def _save_retention(tdir: str, deadline: float) -> None:
    """Record the deadline where a restarted agent finds it: an extended attribute of the task
    directory (no file to create: inode allocation was a visible share of a short task's cost),
    else a file beside it (file systems without user xattrs)."""
    value = f"{deadline!r}"
    try:
        os.setxattr(tdir, RETENTION_XATTR, value.encode())
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            log.warning("cannot record the retention deadline of %s: %s", tdir, exc)
            return  # the in-memory deadline still applies while this agent runs
    try:
        with open(tdir + RETENTION_SUFFIX + ".tmp", "w") as f:
            f.write(value + "\n")
        os.replace(tdir + RETENTION_SUFFIX + ".tmp", tdir + RETENTION_SUFFIX)
    except OSError as exc:
        log.warning("cannot record the retention deadline of %s: %s", tdir, exc)


def _load_retention(root: str) -> dict[str, float]:
    """Task key -> deadline from what `_save_retention` left under root/tasks/<wi>/<job>/."""
    out: dict[str, float] = {}
    base = os.path.join(root, "tasks")
    for dirpath, _dirs, files in os.walk(base):
        rel = os.path.relpath(dirpath, base).split(os.sep)
        if len(rel) != 2:
            continue
        for name in _dirs:
            try:
                deadline = float(os.getxattr(os.path.join(dirpath, name), RETENTION_XATTR))
            except (OSError, ValueError):
                continue  # still running when the agent stopped, or never finished here
            out["/".join([*rel, name])] = deadline
        _dirs[:] = []  # no need to walk into the task directories themselves
        for name in files:
            if name.endswith(RETENTION_SUFFIX):
                try:
                    with open(os.path.join(dirpath, name)) as f:
                        deadline = float(f.read().strip())
                except (OSError, ValueError):
                    continue
                out["/".join([*rel, name[: -len(RETENTION_SUFFIX)]])] = deadline
    return out


def _remove_task_dir(tdir: str, cleaned: bool) -> None:
    """Delete a task's directory; `cleaned` (retention expired) leaves a marker beside it so the file
    APIs can answer TaskFilesCleanedUp instead of a bare not-found."""
    shutil.rmtree(tdir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tdir + RETENTION_SUFFIX)
    if cleaned and os.path.isdir(os.path.dirname(tdir)):
        with open(tdir + CLEANED_MARKER, "w"):
            pass


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _cg_name(spec: pm.TaskSpec) -> str:
    return f"{spec.task[:40]}-{spec.attempt & 0xFFFFFFFF}"


def _describe(exc: BaseException) -> str:
    """One line naming the real cause: trio-websocket wraps e.g. "connection refused" in a bare
    HandshakeError, so follow the cause chain down to the OS error."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    text = ""
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return f"{text or type(exc).__name__}: {cause.strerror}"[:200]
        if isinstance(cause, OSError) and not text:
            text = str(cause)  # e.g. "all attempts to connect to host:port failed"
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
            continue
        cause = cause.__cause__ or cause.__context__
    text = text or str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
