"""The TVM lifecycle on the agent: join (set up, certificates, fence, start task), leave, reboot
and reimage, wipe. Operations run one at a time in arrival order (`TvmOpReceived` queues them);
a running start task can be interrupted by a leave or reboot of its TVM."""

from __future__ import annotations

import logging
import math
import os
import shutil
import stat
import time
from collections.abc import Awaitable, Callable

import trio

from protocol import messages as pm
from protocol.exitcodes import NO_EXIT_CODE

from .host_health import TVM_DIRS, AdoptError, HostHealth, adopt_tvm_dirs
from .limits import TaskLimits
from .pool_isolation import PoolIsolation
from .runner import START_TASK_SLOT, TaskRunner
from .sandbox import Sandbox
from .state import (
    AgentState,
    Instruction,
    RebootStarted,
    Reimaged,
    Run,
    StartTaskBegan,
    StartTaskEnded,
    TvmSetUp,
    TvmWiped,
    WipeStarted,
)
from .taskdirs import write_text
from .taskenv import TvmIdentity, start_task_env

log = logging.getLogger("tvm.agent")

TvmOp = pm.JoinPool | pm.LeavePool | pm.RebootTvm

# In the TVM root: which TVM its directories belong to (account, pool, TVM name).
MEMBERSHIP_FILE = "tvm-membership"
TVM_DIR_NAMES = tuple(TVM_DIRS)


class TvmLifecycle:
    def __init__(
        self,
        root: str,
        state: AgentState,
        runner: TaskRunner,
        isolation: PoolIsolation,
        limits: TaskLimits,
        sandbox: Sandbox,
        send: Callable[[pm.Msg], object],
        carry_out: Callable[[list[Instruction]], None],
        wait_idle: Callable[[float], Awaitable[None]],
        nursery: Callable[[], trio.Nursery | None],
    ) -> None:
        self.root = root
        self.state = state
        self.runner = runner
        self.isolation = isolation
        self.limits = limits
        self.sandbox = sandbox
        self._send = send
        self._carry_out = carry_out
        self._wait_idle = wait_idle
        self._nursery = nursery
        self.tvm: TvmIdentity | None = None
        self.setup_replies: list[
            pm.Msg
        ] = []  # what the last setup reported, resent on a repeated join
        self._lock = trio.Lock()
        self._ops_send, self._ops_recv = trio.open_memory_channel[TvmOp](math.inf)
        self._ops_started = False
        # Host state checks (host_health.py): what is broken, the join that could not be set up
        # because of it, and how to tell the coordinator at once (the agent sets these).
        self.health = HostHealth()
        self.failed_join: pm.JoinPool | None = None
        self.heartbeat: Callable[[], pm.Msg] = pm.Heartbeat

    def retry_join(self) -> None:
        """Set up the TVM again if broken host state stopped its last join."""
        if self.failed_join is not None:
            self.queue(self.failed_join)
            self.failed_join = None  # set again if it fails again

    def queue(self, msg: TvmOp) -> None:
        if not self._ops_started:
            nursery = self._nursery()
            assert nursery is not None
            self._ops_started = True
            nursery.start_soon(self._ops_loop)
        self._ops_send.send_nowait(msg)

    async def _ops_loop(self) -> None:
        async for msg in self._ops_recv:
            try:
                if isinstance(msg, pm.JoinPool):
                    await self._join(msg)
                elif isinstance(msg, pm.LeavePool):
                    await self._leave(msg)
                elif isinstance(msg, pm.RebootTvm):
                    await self._reboot(msg)
            except Exception as exc:  # noqa: BLE001 - the host (a disk gone read-only) or a bug
                # The agent stays up and its TVM says why (an agent that ended here would be
                # restarted into the same failure, its TVM lost each time); a join is tried again.
                log.exception("%s failed", type(msg).__name__)
                if isinstance(msg, pm.JoinPool):
                    self.failed_join = msg
                why = f"{type(msg).__name__} failed: {type(exc).__name__}: {exc}"
                if self.health.broken("tvm-operation", why):
                    self._send(self.heartbeat())
            else:
                if isinstance(msg, pm.JoinPool) and self.health.fixed("tvm-operation"):
                    self._send(self.heartbeat())

    async def _join(self, msg: pm.JoinPool) -> None:
        async with self._lock:
            if self.tvm is not None and self.tvm.tvm_name == msg.tvm_name and self.setup_replies:
                # Already set up (the coordinator restarted or resent): report again, do not re-run.
                for reply in self.setup_replies:
                    self._send(reply)
                return
            await self._setup(msg)

    async def _setup(self, msg: pm.JoinPool) -> None:
        if self.tvm is not None and self.tvm.tvm_name != msg.tvm_name:
            await self.wipe()
        if self.isolation.node_users is not None:
            await self.isolation.node_users.remove_all(keep_tvm=msg.tvm_name)
        # What earlier runs left in the TVM root: another TVM's files go, the rest is repaired, or
        # the TVM is reported unusable and the join tried again by `retry_join` (host_health.py)
        # until it can be.
        try:
            await trio.to_thread.run_sync(self._forget_other_tvm, msg)
            await trio.to_thread.run_sync(
                adopt_tvm_dirs, self.root, self.isolation.slot_users is not None
            )
        except AdoptError as exc:
            self.failed_join = msg
            if self.health.broken("tvm-directories", str(exc)):
                self._send(self.heartbeat())
            return
        self.failed_join = None
        if self.health.fixed("tvm-directories"):
            self._send(self.heartbeat())
        self.setup_replies = []
        self.tvm = TvmIdentity(
            account=msg.account,
            account_url=msg.account_url,
            pool=msg.pool,
            tvm_name=msg.tvm_name,
            root=self.root,
            port_low=msg.port_range_low,
            port_high=msg.port_range_high,
        )
        # Before anything is set up: /etc read-only or locked fails the join here (_ops_loop
        # reports it and the join is tried again).
        await self.isolation.join_pool_group()
        self._carry_out(self.state.handle(TvmSetUp(msg.tvm_name, msg.slots)))
        self.limits.apply_join(msg)  # memory share, process and disk limits
        cert_errors = await self.isolation.install_certs(
            msg.certificates
        )  # before the start task and tasks
        self.isolation.pool_bwrap = msg.bubblewrap
        if msg.bubblewrap and not self.sandbox.caps.has_bwrap:
            log.warning(
                "pool %s asks for bubblewrap, which is not installed: tasks run without it",
                msg.pool,
            )
        await self.isolation.setup_fence(msg)
        ready = pm.TvmReady(tvm_name=msg.tvm_name, cert_errors=cert_errors)
        st = msg.start_task
        if st is not None and st.wait_for_success:
            done = await self._run_start_task(st, msg.tvm_name)
            if done is None:
                return  # interrupted (reboot / leave): whoever interrupted decides what comes next
            self.setup_replies.append(done)
            if done.exit_code != 0 or done.failure is not None:
                return  # TVM stays starttaskfailed; no TvmReady, so no tasks come here
            self.setup_replies.append(ready)
            self._send(ready)
            return
        self.setup_replies.append(ready)
        self._send(ready)
        if st is not None:
            # Tasks do not wait for it, and neither do later TVM operations.
            nursery = self._nursery()
            assert nursery is not None
            nursery.start_soon(self._background_start_task, st, msg.tvm_name)

    def _forget_other_tvm(self, msg: pm.JoinPool) -> None:
        """(thread) The TVM directories hold the files of the TVM named in `MEMBERSHIP_FILE`. Those
        of another one (this root's TVM before the agent was given a new identity, or joined a
        pool of another coordinator) are removed before this TVM's tasks can see them, as a
        machine is reimaged before it is given to another pool; the same TVM keeps its files
        over an agent restart. OSError: AdoptError (the join is retried)."""
        note = os.path.join(self.root, MEMBERSHIP_FILE)
        mine = f"{msg.account}\n{msg.pool}\n{msg.tvm_name}\n"  # not the URL: it moves in a failover
        try:
            with open(note) as f:
                if f.read() == mine:
                    return
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise AdoptError(f"{note}: {exc.strerror or exc}") from None
        for d in TVM_DIR_NAMES:
            path = os.path.join(self.root, d)
            held = False
            try:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    continue  # a link or a file: adopt_tvm_dirs replaces it, never following it
                held = bool(os.listdir(path))
                shutil.rmtree(path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise AdoptError(
                    f"TVM directory {path} cannot be repaired: {exc.strerror or exc}"
                    + (" (it holds another TVM's files)" if held else "")
                ) from None
            if held:
                log.warning("TVM directory %s held another TVM's files: removed", path)
        try:
            write_text(note, mine)
        except OSError as exc:
            raise AdoptError(f"{note}: {exc.strerror or exc}") from None

    async def _background_start_task(self, st: pm.StartTaskSpec, tvm_name: str) -> None:
        done = await self._run_start_task(st, tvm_name)
        if done is not None and self.tvm is not None and self.tvm.tvm_name == tvm_name:
            self.setup_replies.append(done)

    async def _run_start_task(
        self, st: pm.StartTaskSpec, tvm_name: str
    ) -> pm.StartTaskCompleted | None:
        """Run the start task with its retries; returns what was reported, None when interrupted."""
        assert self.tvm is not None
        tvm = self.tvm
        attempts = 0
        wd = os.path.join(tvm.start_dir, "wd")
        run = Run(
            pm.TaskSpec(
                key="",
                attempt=0,
                command_line=st.command_line,
                workitem="",
                job="",
                task="starttask",
            )
        )
        self.state.handle(StartTaskBegan(run))
        try:
            while True:
                os.makedirs(wd, exist_ok=True)
                start = time.time()
                self._send(
                    pm.StartTaskStarted(tvm_name=tvm_name, start_time=start, retry_count=attempts)
                )
                failure = await self.runner.fetch_files(st.resource_files, wd)
                code = NO_EXIT_CODE
                if failure is None and not run.cancelled:
                    outcome, _ = await self.runner.spawn(
                        st.command_line,
                        wd,
                        start_task_env(tvm, st.env),
                        os.path.join(tvm.start_dir, "stdout.txt"),
                        os.path.join(tvm.start_dir, "stderr.txt"),
                        "starttask",
                        run,
                        START_TASK_SLOT,
                        st.run_elevated,
                        lease_dir=tvm.start_dir,
                        lease_mode=0o750,
                        hand_back=False,
                    )
                    code = outcome.exit_code
                    if outcome.reason == "launch_failed":
                        failure = pm.Failure(
                            category="UserError",
                            code="CommandLaunchFailed",
                            message=outcome.message,
                        )
                if run.cancelled:
                    return None
                ok = failure is None and code == 0
                retry = (
                    not ok
                    and failure is None
                    and (st.max_task_retry_count == -1 or attempts < st.max_task_retry_count)
                )
                if ok or not retry:
                    if not ok:
                        write_text(
                            os.path.join(tvm.start_dir, "starttask-failure.txt"),
                            f"start task failed after {attempts + 1} attempt(s): exit code {code}"
                            f"{'; ' + failure.code + ': ' + failure.message if failure else ''}\n",
                        )
                    done = pm.StartTaskCompleted(
                        exit_code=code,
                        start_time=start,
                        end_time=time.time(),
                        retry_count=attempts,
                        failure=failure,
                    )
                    self._send(done)
                    return done
                attempts += 1
        finally:
            self.state.handle(StartTaskEnded(run))

    async def _leave(self, msg: pm.LeavePool) -> None:
        async with self._lock:
            if self.tvm is not None and self.tvm.tvm_name != msg.tvm_name:
                return  # an old request: this agent backs another TVM now
            await self.wipe()
            self._send(pm.TvmLeft(tvm_name=msg.tvm_name))

    async def _reboot(self, msg: pm.RebootTvm) -> None:
        """Restart the sandbox: kill every task process; a reimage also wipes the TVM's directories.
        The coordinator's JoinPool that follows sets the TVM up again and re-runs the start task."""
        async with self._lock:
            if self.tvm is None or self.tvm.tvm_name != msg.tvm_name:
                return
            self._carry_out(self.state.handle(RebootStarted()))
            await self._wait_idle(10)
            self.setup_replies = []
            if msg.reimage:
                self._carry_out(self.state.handle(Reimaged()))
                for d in ("tasks", "shared", "start"):
                    await trio.to_thread.run_sync(shutil.rmtree, os.path.join(self.root, d), True)
            log.info("TVM %s %s", msg.tvm_name, "reimaged" if msg.reimage else "rebooted")

    async def wipe(self) -> None:
        self._carry_out(self.state.handle(WipeStarted()))
        await self._wait_idle(10)
        self.sandbox.close()
        self.tvm = None
        self._carry_out(self.state.handle(TvmWiped()))
        self.setup_replies = []
        self.limits.task_memory_limit = 0
        await self.isolation.teardown()
        for d in TVM_DIR_NAMES:
            await trio.to_thread.run_sync(shutil.rmtree, os.path.join(self.root, d), True)
