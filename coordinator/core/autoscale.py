"""Autoscale: metric sampling, formula runs, applying targets.

Everything is driven by the tick and the store's clock: a sample of every pool each sample period
(reference §5.7: 30 s) and, for pools with autoscale on, a formula run each evaluation interval.
Runs evaluate with the pure engine in `coordinator.autoscale`; a run that fails changes nothing
but its `autoScaleRun`. Targets are applied through membership's allocation (with the pool's
`shrink_option`), so scale-in honours `$NodeDeallocationOption` exactly as a manual resize honours
`tvmDeallocationOption` (idle TVMs first; `taskcompletion` lets the leaving TVMs finish their tasks).

Metric history and the evaluation schedule are in memory: after a coordinator restart the history
starts empty (formulas asking for a sample percentage fail until it refills, as on a new pool) and
each pool is next evaluated one interval after its last recorded run. Resize timeouts do not
apply to autoscale-driven resizes (§5.8).
"""

from __future__ import annotations

import math
from collections import deque
from datetime import timedelta

import msgspec

from coordinator.autoscale import (
    AutoscaleInputs,
    AutoscaleResult,
    FormulaError,
    Program,
    evaluate,
    parse,
)
from coordinator.common.errors import ApiError, bad_request
from coordinator.common.timeutil import format_duration
from protocol import messages as pm

from .autoscale_rules import interval_of, parse_formula, parse_interval
from .instructions import Outbox
from .membership import Membership
from .metrics_history import MetricsHistory, TvmCounters, resource_values, to_datetime
from .records import ACTIVE, COMPLETED, RUNNING, PoolRec
from .store import Store

# (timestamp, results, error code, error message) — what PoolRec.auto_scale_run holds
RunRec = tuple[float, str, str | None, str | None]


HISTORY_RUNS = 200


class Autoscale:
    def __init__(self, store: Store, out: Outbox, membership: Membership) -> None:
        self.s = store
        self.out = out
        self.membership = membership
        self.metrics = MetricsHistory()
        self.tvm_counters: dict[str, TvmCounters] = {}  # TVM name -> its last heartbeat values
        self.next_run: dict[str, float] = {}  # pool -> time of its next formula run
        self.programs: dict[str, tuple[str, Program]] = {}  # pool -> (formula text, parsed)
        self.enabled_at: dict[str, float] = {}  # pool -> time of the last enable call
        self.boundary: dict[str, set[int]] = {}  # pool -> tasks counted finished at its last sample
        # pool -> its last HISTORY_RUNS formula runs (in memory, like the metric history): what the
        # dashboard plots, from before anyone opened it.
        self.history: dict[str, deque[RunRec]] = {}

    # ------------------------------------------------------------------ pool life

    def pool_added(self, name: str) -> None:
        """After add_pool: the formula runs at once (the pool gets its first target now), then
        every interval. (Auto pools get their first run on the next tick.)"""
        self.enabled_at[name] = self.s.clock()
        self.run(name, reschedule=True)

    def pool_deleted(self, name: str) -> None:
        for d in (self.next_run, self.programs, self.enabled_at, self.boundary, self.history):
            d.pop(name, None)
        self.metrics.drop(name)

    # ------------------------------------------------------------------ commands

    def enable_autoscale(self, name: str, formula: str | None, interval_text: str | None) -> None:
        s = self.s
        pool = s.get_pool(name)
        now = s.clock()
        enabled = pool.spec.enable_auto_scale
        if pool.state != "active":
            raise ApiError(
                409,
                "PoolBeingDeleted" if pool.state == "deleting" else "PoolNotActive",
                f"pool {name!r} is {pool.state}",
            )
        if not enabled and pool.alloc_state == "resizing":
            raise ApiError(
                409, "PoolBeingResized", f"pool {name!r} is resizing; wait until it is steady"
            )
        last = self.enabled_at.get(name)
        throttle = s.autoscale_timing.enable_throttle
        if last is not None and now - last < throttle:
            raise ApiError(
                409,
                "TooManyEnableAutoScaleRequests",
                f"autoscale of pool {name!r} was enabled {now - last:.0f} s ago; "
                f"enable calls must be at least {throttle:g} s apart",
            )
        if formula is None and not enabled:
            raise bad_request(
                "MissingRequiredProperty",
                "enabling autoscale needs autoScaleFormula",
                field="autoScaleFormula",
            )
        program = parse_formula(formula) if formula is not None else None
        interval = (
            parse_interval(s.autoscale_timing, interval_text) if interval_text is not None else None
        )
        # validated: mutate
        spec = pool.spec
        pool.spec = msgspec.structs.replace(
            spec,
            enable_auto_scale=True,
            auto_scale_formula=formula if formula is not None else spec.auto_scale_formula,
            auto_scale_evaluation_interval=format_duration(interval)
            if interval is not None
            else spec.auto_scale_evaluation_interval
            or format_duration(s.autoscale_timing.default_interval),
        )
        if program is not None and formula is not None:
            self.programs[name] = (formula, program)
        self.enabled_at[name] = now
        self.out.put("pool", name, pool)
        # A new interval (or turning autoscale on) restarts the schedule at the request time (§5.8).
        self.run(name, reschedule=interval is not None or not enabled)

    def disable_autoscale(self, name: str) -> None:
        pool = self.s.get_pool(name)
        if not pool.spec.enable_auto_scale:
            return  # already off: nothing to do (the real service answers 200 too)
        pool.spec = msgspec.structs.replace(
            pool.spec,
            enable_auto_scale=False,
            auto_scale_formula=None,
            auto_scale_evaluation_interval=None,
        )
        self.next_run.pop(name, None)
        self.programs.pop(name, None)
        self.out.put("pool", name, pool)  # targets stay at their last values

    def evaluate_autoscale(self, name: str, formula: str) -> RunRec:
        """Run `formula` on the pool's current data without applying anything."""
        pool = self.s.get_pool(name)
        if not pool.spec.enable_auto_scale:
            raise ApiError(
                409,
                "OperationInvalidForCurrentState",
                f"pool {name!r} does not have autoscale enabled; enable it before evaluating",
            )
        program = parse_formula(formula)
        now = self.s.clock()
        return _run_rec(now, self._evaluate(pool, program, now))

    # ------------------------------------------------------------------ events

    def heartbeat(self, agent_id: str, msg: pm.Heartbeat) -> None:
        agent = self.s.agents.get(agent_id)
        if agent is not None and agent.tvm is not None and agent.tvm in self.s.tvms:
            c = self.tvm_counters.get(agent.tvm)
            if c is None:
                c = self.tvm_counters[agent.tvm] = TvmCounters()
            # An agent's figures feed formulas: a NaN or infinite one (a broken agent) reads as 0.
            c.cpu_percent = msg.cpu_percent if math.isfinite(msg.cpu_percent) else 0.0
            c.memory_bytes = float(msg.memory_used_bytes)
            c.disk_bytes = float(msg.disk_used_bytes)
            c.net_rx, c.net_tx = msg.net_rx_bytes, msg.net_tx_bytes
            c.fresh = True

    def before_tick(self) -> None:
        for pool in self.s.pools.values():
            if pool.spec.enable_auto_scale and pool.resize_started is not None:
                pool.resize_started = (
                    None  # resize timeouts do not apply to autoscale resizes (§5.8)
                )

    def after_tick(self, now: float) -> None:
        self._sample_metrics(now)
        for name, pool in list(self.s.pools.items()):
            if not pool.spec.enable_auto_scale or pool.state != "active":
                continue
            due = self.next_run.get(name)
            if due is None:  # restored from the journal: one interval after the last run
                run = pool.auto_scale_run
                due = self.next_run[name] = (
                    (run[0] + interval_of(self.s.autoscale_timing, pool)) if run else now
                )
            if now >= due:
                self.run(name, reschedule=True)

    # ------------------------------------------------------------------ metrics

    def _sample_metrics(self, now: float) -> None:
        s = self.s
        period = s.autoscale_timing.sample_period
        last = self.metrics.last_sample
        due = {
            name
            for name, p in s.pools.items()
            if p.state != "deleting" and (name not in last or now - last[name] >= period)
        }
        for name in [n for n in self.tvm_counters if n not in s.tvms]:
            del self.tvm_counters[name]
        for name in [n for n in self.metrics.pools() if s.pools.get(n) is None]:
            self.metrics.drop(name)  # the pool is gone (deletion finishes after its TVMs left)
        if not due:
            return
        counts = {
            name: [0, 0, 0, 0, 0.0] for name in due
        }  # active, running, succeeded, failed, wall s
        boundary: dict[str, set[int]] = {name: set() for name in due}
        for job in s.jobs.values():
            c = counts.get(job.rec.pool)
            if c is None:
                continue
            since = last.get(job.rec.pool, now - period)
            seen = self.boundary.get(job.rec.pool, set())
            waiting = job.deps.pending if job.deps is not None else ()
            for t in job.tasks.values():
                if t.state == ACTIVE:
                    c[0] += t.name not in waiting  # $ActiveTasks leaves out unmet dependencies
                elif t.state == RUNNING:
                    c[1] += 1
                elif t.state == COMPLETED and t.state_time >= since and t.seq not in seen:
                    # Finished in this period. A task finished at the very instant of the previous
                    # sample may or may not have been counted then: `seen` remembers which were.
                    if t.state_time == now:
                        boundary[job.rec.pool].add(t.seq)
                    if t.exit_code == 0 and t.failure is None:
                        c[2] += 1
                    else:
                        c[3] += 1
                    if t.start_time is not None and t.end_time is not None:
                        c[4] += max(0.0, t.end_time - t.start_time)
        self.boundary.update(boundary)
        for name in sorted(due):
            active, running, succeeded, failed, wall = counts[name]
            members = s.all_pool_tvms(name)  # leaving ones included: they still report metrics
            values: dict[str, float] = {
                "ActiveTasks": active,
                "RunningTasks": running,
                "PendingTasks": active + running,
                "SucceededTasks": succeeded,
                "FailedTasks": failed,
                "WallClockSeconds": wall,
                "SampleNodeCount": len(members),
                "PreemptedNodeCount": 0,  # dedicated TVMs are never preempted
            }
            values.update(
                resource_values(tc for t in members if (tc := self.tvm_counters.get(t.rec.name)))
            )
            self.metrics.record(name, now, values)

    # ------------------------------------------------------------------ evaluation

    def _program(self, pool: PoolRec) -> Program | None:
        formula = pool.spec.auto_scale_formula
        if formula is None:
            return None
        cached = self.programs.get(pool.spec.name)
        if cached is not None and cached[0] == formula:
            return cached[1]
        program = parse(formula)  # validated when stored; FormulaError only if the engine changed
        self.programs[pool.spec.name] = (formula, program)
        return program

    def _evaluate(self, pool: PoolRec, program: Program, now: float) -> AutoscaleResult:
        t = self.s.autoscale_timing
        name = pool.spec.name
        members = self.s.members(name)
        inputs = AutoscaleInputs(
            now=to_datetime(now),
            series=self.metrics.visible(name, now, t.visibility_delay),
            sample_period=timedelta(seconds=t.sample_period),
            current_dedicated=len(members),
            task_slots_per_node=pool.spec.max_tasks_per_vm,
            usable_node_count=sum(1 for m_ in members if m_.rec.state in ("idle", "running")),
            target_dedicated=pool.target,
            # Azure's modern service always reports $TargetLowPriorityNodes (0 here); the seed's
            # 2015 results did not: pools made through the Azure API get the modern form.
            report_low_priority=pool.spec.azure is not None,
        )
        return evaluate(program, inputs)

    def run(self, name: str, *, reschedule: bool) -> None:
        pool = self.s.pools[name]
        now = self.s.clock()
        try:
            program = self._program(pool)
        except FormulaError as exc:
            program = None
            result = AutoscaleResult(results="", error=(exc.code, exc.message))
        if program is not None:
            result = self._evaluate(pool, program, now)
        pool.auto_scale_run = _run_rec(now, result)
        self.history.setdefault(name, deque(maxlen=HISTORY_RUNS)).append(pool.auto_scale_run)
        if reschedule or name not in self.next_run:
            self.next_run[name] = now + interval_of(self.s.autoscale_timing, pool)
        self.out.put("pool", name, pool)
        if result.error is None and result.target_dedicated is not None:
            target = min(result.target_dedicated, self.s.max_pool_size)
            self._resize(pool, target, result.deallocation_option or "requeue")

    # ------------------------------------------------------------------ applying targets

    def _resize(self, pool: PoolRec, target: int, option: str) -> None:
        """Set the pool's target and let membership's allocation grow or shrink it, with the
        formula's deallocation option for the TVMs it removes (idle ones first)."""
        # retaineddata keeps task data on the TVM until retention ends; a leaving TVM is wiped
        # anyway, so the nearest behaviour is to wait for its tasks like taskcompletion.
        shrink = "taskcompletion" if option == "retaineddata" else option
        if (pool.target, pool.shrink_option, pool.resize_error) != (target, shrink, None):
            pool.target = target
            pool.shrink_option = shrink
            pool.resize_error = None
            self.out.put("pool", pool.spec.name, pool)
        self.membership.allocate()


def _run_rec(now: float, result: AutoscaleResult) -> RunRec:
    if result.error is not None:
        return (now, result.results, result.error[0], result.error[1])
    return (now, result.results, None, None)
