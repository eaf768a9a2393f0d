"""The agent's task runner: fetch resource files, spawn one command in the sandbox (as a task user
where the agent has them), wait for it with its wall-clock limit, and say how it ended. Whether to run
at all, and what to report, is the state machine's (tvmagent/state.py)."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable

import structlog
import trio

from protocol import messages as pm
from protocol.exitcodes import NO_EXIT_CODE

from . import cmdline, isolation
from .downloads import DownloadCache, DownloadError
from .jobprep_dir import share_with_pool
from .limits import TaskLimits
from .outputs import Uploader
from .pool_isolation import PoolIsolation
from .procspec import LaunchError, ProcessOutcome, ProcessSpec
from .sandbox import RunningProcess, Sandbox
from .state import AgentState, Run, run_verdict
from .taskdirs import SKELETON, TaskDirStock, clear_markers, prepare_task_dir
from .taskenv import TvmIdentity, task_dir, task_env

log = logging.getLogger("tvm.agent")

START_TASK_SLOT = ""  # the start task's process, among task keys (never empty)
QUIET_S = 1.0  # no process for this long: the agent is idle, and its directory stock may grow
STOCK_CHUNK = 16  # directories per worker-thread call: a few ms, a task arriving meanwhile waits


STOCK_ENV = "TVM_AGENT_TASKDIR_STOCK"


def expected_burst(most: int) -> int:
    """TVM_AGENT_TASKDIR_STOCK=N: directories for a burst of N tasks are made while the agent is idle
    from its start (by default only after it has seen such a burst); at most `most`."""
    raw = os.environ.get(STOCK_ENV, "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        log.warning("%s=%r is not a number of task directories: ignored", STOCK_ENV, raw)
        return 0
    if int(raw) > most:
        log.warning("%s=%s: the stock holds at most %d directories", STOCK_ENV, raw, most)
    return min(int(raw), most)


class TaskRunner:
    def __init__(
        self,
        root: str,
        task_user: str | None,
        use_bwrap: bool,
        sandbox: Sandbox,
        isolation: PoolIsolation,
        limits: TaskLimits,
        cache: DownloadCache,
        state: AgentState,
        send: Callable[[pm.Msg], object],
        send_lazily: Callable[[pm.TaskStarted], None],
        http_base: Callable[[], str],
        http_headers: Callable[[], dict[str, str]],
        finished: Callable[..., None],
    ) -> None:
        self.root = root
        self.task_user = task_user
        self.use_bwrap = use_bwrap
        self.sandbox = sandbox
        self.isolation = isolation
        self.limits = limits
        self.cache = cache
        self.state = state
        self._send = send
        self._send_lazily = send_lazily
        self._http_base = http_base
        self._http_headers = http_headers
        self._finished = finished
        self.procs: dict[str, RunningProcess] = {}  # task key (or START_TASK_SLOT) -> its process
        self.stock = TaskDirStock(root)
        self.stock.burst = expected_burst(self.stock.most)
        self.uploader = Uploader(cache.http_client, http_base, http_headers)
        self._stock_low = trio.Event()
        # keep_stock waits with no deadline (nothing to refill, no growth wanted when it looked):
        # the end of the last process must wake it, else its own timer will.
        self._stock_asleep = False
        self._last_busy = time.monotonic()  # when a process last ended (see keep_stock)

    def _take_dir(self, tdir: str) -> bool:
        try:
            made = self.stock.take(tdir)
        except OSError as exc:  # e.g. the job directory cannot be made: the usual path reports it
            log.debug("no ready task directory for %s: %s", tdir, exc)
            return False
        if self.stock.low():
            self._stock_low.set()
        return made

    async def keep_stock(self) -> None:
        """Refill the task directory stock from a worker thread (see taskdirs.TaskDirStock)."""
        try:
            await trio.to_thread.run_sync(self.stock.start)
        except OSError as exc:
            log.warning("task directories are made per task (no stock: %s)", exc)
            return
        while True:
            refill = self.stock.refill()  # half of its target gone: at once
            grow = 0  # beyond it, towards the largest burst seen: only while idle
            if not refill and self.stock.wanted_idle() > 0:
                idle_for = -1.0 if self.procs else time.monotonic() - self._last_busy
                if idle_for < QUIET_S:  # look again when it may have become idle
                    with trio.move_on_after(QUIET_S - max(idle_for, 0.0)):
                        await self._stock_low.wait()
                    if self._stock_low.is_set():
                        self._stock_low = trio.Event()
                    continue
                grow = self.stock.wanted_idle()
            if not refill and not grow:
                self._stock_asleep = True
                try:
                    await self._stock_low.wait()
                finally:
                    self._stock_asleep = False
                self._stock_low = trio.Event()
                continue
            try:
                made = await trio.to_thread.run_sync(
                    self.stock.make, min(refill or grow, STOCK_CHUNK)
                )
            except OSError as exc:  # e.g. the disk is full: tasks make their own meanwhile
                log.warning("cannot make ready task directories: %s", exc)
                if grow:  # no more growing until a burst asks for it again
                    self.stock.burst = self.stock.ready()
                await trio.sleep(5)
                continue
            self.stock.add(made)

    def kill(self, slot: str) -> None:
        proc = self.procs.get(slot)
        if proc is not None:
            proc.kill()

    async def fetch_files(self, files: list[pm.ResourceFile], dest: str) -> pm.Failure | None:
        for rf in files:
            url = rf.url
            headers = dict(rf.headers)
            if url.startswith("filestore:sha256:"):
                sha = url.rsplit(":", 1)[1]
                url = f"{self._http_base()}/files/sha256/{sha}"
                headers.update(self._http_headers())
                expected = rf.sha256 or sha
            else:
                expected = rf.sha256 or ""
            try:
                await self.cache.fetch(
                    url,
                    dest,
                    rf.file_path,
                    sha256=expected or None,
                    size=rf.size if rf.size >= 0 else None,
                    headers=headers or None,
                    **self.isolation.resource_file_mode(),
                )
            except DownloadError as exc:
                return pm.Failure(category="UserError", code=exc.code, message=exc.message)
        return None

    async def spawn(
        self,
        command_line: str,
        cwd: str,
        env: dict[str, str],
        out: str,
        err: str,
        name: str,
        run: Run | None,
        slot: str | None,
        elevated: bool,
        wall: float = 0.0,
        setup: Callable[[], None] | None = None,
        lease_dir: str = "",
        lease_mode: int = 0o700,
        hand_back: bool = True,
        announce: pm.TaskSpec | None = None,
        made: bool = False,
        readonly: tuple[str, ...] = (),
        hand_back_later: list[isolation.SlotLease] | None = None,
    ) -> tuple[ProcessOutcome, bool]:
        """Run one command to its end. The blocking set-up — `setup()` (directories), fresh output
        files, a task user's lease for `lease_dir`, cgroup, fork/exec — is one worker-thread call,
        or runs on the event loop when all of it is short: `made`, the directory came ready from
        the stock (nothing to create), with the clone3 launcher and a task user at hand.
        `announce`: send its TaskStarted once the process runs (lazily, see `Link.send_lazily`).
        `slot`: where `kill` finds the process. `readonly`: more directories a bubblewrap sandbox
        shows (read-only). `hand_back_later`: the task user's lease is put there for the caller to
        return (`return_lease`) instead of being returned here. Returns (outcome, killed for its
        wall clock)."""
        leases: list[isolation.SlotLease | None] = []
        iso = self.isolation
        inline = (
            made
            and self.sandbox.caps.fast_launch
            and (elevated or not lease_dir or iso.lease_ready())
        )

        def prepare(spec: ProcessSpec) -> ProcessSpec:  # worker thread, or inline (see above)
            if made:
                clear_markers(lease_dir)
            else:
                if setup is not None:
                    setup()
                for p in (out, err):
                    with open(p, "wb"):
                        pass  # a retry starts with fresh output files
            # Split in linear time (a poison line must not stall the agent; at most 8,191 characters).
            try:
                spec = spec.evolve(argv=cmdline.parse(command_line))
            except (
                ValueError
            ) as exc:  # CommandLineError, or ProcessSpec refusing e.g. an empty program
                raise LaunchError(str(exc)) from None
            if lease_dir:
                lease = iso.lease_now(
                    lease_dir,
                    elevated,
                    lease_mode,
                    keep=not hand_back,
                    # stdout/stderr become the task user's when the sandbox opens them (fchown)
                    fresh=SKELETON[:1] if made else (),
                )
                leases.append(lease)
                if lease is not None:
                    spec = iso.as_lease_user(spec, lease)
            return spec

        # argv: a placeholder until prepare() splits the command line.
        use_bwrap = self.use_bwrap or iso.pool_bwrap
        bw = iso.bwrap_paths() if use_bwrap else {}
        if use_bwrap and readonly:  # those that exist (bwrap cannot bind a missing one)
            shown = tuple([p for p in readonly if await trio.Path(p).is_dir()])
            bw["bwrap_readonly"] = (*bw.get("bwrap_readonly", ()), *shown)
        spec = ProcessSpec(
            argv=["-"],
            cwd=cwd,
            env=env,
            stdout_path=out,
            stderr_path=err,
            run_as=None if elevated else (self.task_user or None),
            use_bwrap=use_bwrap,
            name=name,
            **bw,  # type: ignore[arg-type]
            **self.limits.process_limits(),  # type: ignore[arg-type]
        )
        try:
            proc = await self.sandbox.start(spec, prepare, inline=inline)
            if announce is not None and proc.pid is not None:
                self._send_lazily(
                    pm.TaskStarted(
                        key=announce.key,
                        attempt=announce.attempt,
                        start_time=proc.start_time.timestamp(),
                    )
                )
            if slot is not None:
                self.procs[slot] = proc
            if run is not None and run.cancelled:
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
            if slot is not None:
                self.procs.pop(slot, None)
                if not self.procs:
                    self._last_busy = time.monotonic()
                    if self._stock_asleep and self.stock.wanted_idle() > 0:
                        self._stock_low.set()  # grow the stock once the agent stays idle
            if leases and hand_back and hand_back_later is not None:
                if leases[0] is not None:
                    hand_back_later.append(leases[0])
            elif leases and hand_back:
                await iso.return_lease(leases[0], lease_dir)
            elif leases and leases[0] is not None:
                iso.keep_lease(
                    leases[0]
                )  # the start task's directory stays its user's (0750, pool group)
        return outcome, timed_out

    async def run_task(self, spec: pm.TaskSpec, tvm: TvmIdentity) -> None:
        # The task user's lease goes back once the completion is on its way (a lone task's round
        # trip waits for it no longer): nothing else runs on the agent in between (no checkpoint),
        # so the directory is root's again before any other message or task is handled.
        tdir = task_dir(self.root, spec.key)
        leased: list[isolation.SlotLease] = []
        try:
            await self._run_task(spec, tvm, tdir, leased)
        finally:
            for lease in leased:
                await self.isolation.return_lease(lease, tdir)

    async def _run_task(
        self, spec: pm.TaskSpec, tvm: TvmIdentity, tdir: str, leased: list[isolation.SlotLease]
    ) -> None:
        run = self.state.running[spec.key]
        # Every log line of this Trio task (ours and the libraries') carries the task's ids.
        structlog.contextvars.bind_contextvars(
            task=spec.key, job=f"{spec.workitem}/{spec.job}", tvm=tvm.tvm_name, attempt=spec.attempt
        )
        log.debug("task starting")
        wd = os.path.join(tdir, "wd")
        start = time.time()
        failure: pm.Failure | None = None
        exit_code = NO_EXIT_CODE
        uploaded: list[pm.OutputUploaded] = []
        ran = False
        try:
            if spec.resource_files:
                # Running from here on (downloads count as the task's run); the spawn's own thread
                # call repeats the (idempotent) directory set-up.
                await trio.to_thread.run_sync(prepare_task_dir, tdir, wd)
                self._send(pm.TaskStarted(key=spec.key, attempt=spec.attempt, start_time=start))
                failure = await self.fetch_files(spec.resource_files, wd)
            made = not spec.resource_files and self._take_dir(tdir)
            # The job's preparation directory, which its tasks read (AZ_BATCH_JOB_PREP_DIR).
            prep = os.path.join(os.path.dirname(tdir), spec.job_prep) if spec.job_prep else ""
            shown = (prep,) if prep and spec.kind != "jobprep" else ()
            if failure is None and not run.cancelled:
                outcome, timed_out = await self.spawn(
                    spec.command_line,
                    wd,
                    task_env(tvm, spec),
                    os.path.join(tdir, "stdout.txt"),
                    os.path.join(tdir, "stderr.txt"),
                    "task",  # the cgroup's name: every user lists cgroupfs, task names are not theirs
                    run,
                    spec.key,
                    spec.run_elevated,
                    spec.max_wall_clock_s,
                    setup=functools.partial(prepare_task_dir, tdir, wd),
                    lease_dir=tdir,
                    lease_mode=0o700,
                    announce=None if spec.resource_files else spec,
                    made=made,
                    readonly=shown,
                    # A job preparation's directory is shared with the pool after its hand-back.
                    hand_back_later=None if spec.kind == "jobprep" else leased,
                )
                start = outcome.start_time.timestamp()
                ran = True
                exit_code, failure = run_verdict(
                    run, outcome.exit_code, outcome.reason, outcome.message, timed_out
                )
                if failure is None:
                    # a writer quicker than the periodic check
                    failure = await self.limits.disk_verdict(spec.key, list(self.state.running))
                if spec.kind == "jobprep":  # the job's tasks read what it left
                    await trio.to_thread.run_sync(share_with_pool, tdir, self.isolation.pool_gid)
            elif run.cancelled:
                failure = pm.Failure(
                    category="UserError", code="TaskEnded", message=run.cancel_reason
                )
            if ran and spec.output_files and not run.cancelled:
                # After the process, before the completion: the task's result waits for its files.
                upload_failure, uploaded = await self.uploader.run(
                    spec.output_files, tdir, wd, exit_code, failure
                )
                failure = failure or upload_failure  # the task's own failure comes first
        except Exception as exc:  # the task fails, never the agent
            log.exception("task %s failed inside the agent", spec.key)
            exit_code = NO_EXIT_CODE
            failure = pm.Failure(
                category="ServerError", code="AgentError", message=f"{type(exc).__name__}: {exc}"
            )
        self._finished(spec.key, exit_code, start, time.time(), failure, uploaded)
