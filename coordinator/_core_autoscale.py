"""Autoscale (part of the pure core; see state.py): metric sampling, formula runs, applying targets.

Everything is driven by `tick()` and `self.clock()`: a sample of every pool each sample period
(reference §5.7: 30 s) and, for pools with autoscale on, a formula run each evaluation interval.
Runs evaluate with the pure engine in `coordinator.autoscale`; a run that fails changes nothing
but its `autoScaleRun`. Targets are applied through the pool mixin's allocation
(`_allocate` with the pool's `shrink_option`), so scale-in honours `$NodeDeallocationOption` exactly
as a manual resize honours `tvmDeallocationOption` (idle TVMs first; `taskcompletion` lets the
leaving TVMs finish their tasks).

Metric history and the evaluation schedule are in memory: after a coordinator restart the history
starts empty (formulas asking for a sample percentage fail until it refills, as on a new pool) and
each pool is next evaluated one interval after its last recorded run. Resize timeouts do not
apply to autoscale-driven resizes (§5.8).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import msgspec

from protocol import messages as pm

from . import models as m
from ._core_agents import AgentsMixin
from ._core_pools import PoolsMixin
from .autoscale import AutoscaleInputs, AutoscaleResult, FormulaError, Program, evaluate, parse
from .errors import ApiError, bad_request
from .metrics_history import MetricsHistory, TvmCounters, resource_values, to_datetime
from .records import ACTIVE, COMPLETED, RUNNING, PoolRec, Tvm
from .timeutil import format_duration, parse_duration

# (timestamp, results, error code, error message) — what PoolRec.auto_scale_run holds
RunRec = tuple[float, str, str | None, str | None]


@dataclass(frozen=True)
class AutoscaleTiming:
    """Autoscale's time constants. Production uses the defaults (the real service's); tests pass
    shorter ones to `run_coordinator(autoscale_timing=...)` so hours of evaluation intervals run
    in seconds without touching the clock that heartbeats and timeouts use."""

    sample_period: float = 30.0  # one metrics sample per pool
    visibility_delay: float = 60.0  # samples reach formulas about a minute late (§5.7)
    min_interval: float = 300.0  # autoScaleEvaluationInterval bounds (§5.8: 5 min .. 168 h)
    max_interval: float = 168 * 3600.0
    default_interval: float = 900.0
    enable_throttle: float = 30.0  # enable calls on one pool at least this far apart


class AutoscaleMixin(PoolsMixin, AgentsMixin):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.autoscale_timing = AutoscaleTiming()
        self.metrics = MetricsHistory()
        self._tvm_counters: dict[str, TvmCounters] = {}  # TVM name -> its last heartbeat values
        self._as_next: dict[str, float] = {}  # pool -> time of its next formula run
        self._as_programs: dict[str, tuple[str, Program]] = {}  # pool -> (formula text, parsed)
        self._as_enabled_at: dict[str, float] = {}  # pool -> time of the last enable call
        self._as_boundary: dict[str, set[int]] = {}  # pool -> tasks counted finished at its last sample

    # ------------------------------------------------------------------ validation

    @staticmethod
    def _parse_formula(formula: str, prefix: str = "") -> Program:
        try:
            return parse(formula)
        except FormulaError as exc:
            values: dict[str, object] = {"field": prefix + "autoScaleFormula"}
            if exc.line is not None:
                values.update(line=exc.line, column=exc.column)
            raise ApiError(400, exc.code, f"{prefix}autoScaleFormula: {exc.message}", **values) from None

    def _parse_interval(self, text: str | None, prefix: str = "") -> float:
        t = self.autoscale_timing
        if text is None:
            return t.default_interval
        field = prefix + "autoScaleEvaluationInterval"
        seconds = parse_duration(text, field)
        if not t.min_interval <= seconds <= t.max_interval:
            raise bad_request(
                "InvalidPropertyValue",
                f"{field} must be between {format_duration(t.min_interval)} and "
                f"{format_duration(t.max_interval)}, got {text!r}",
                field=field,
            )
        return seconds

    def _interval_of(self, pool: PoolRec) -> float:
        text = pool.spec.auto_scale_evaluation_interval
        try:
            return max(self.autoscale_timing.min_interval, parse_duration(text, "i")) if text else \
                self.autoscale_timing.default_interval
        except ApiError:
            return self.autoscale_timing.default_interval

    # ------------------------------------------------------------------ commands

    def _check_pool_spec(self, req: m.PoolAdd, prefix: str = "") -> tuple[m.PoolAdd, float]:
        """The pool mixin's spec check (user pools and auto pools) plus the autoscale settings."""
        if req.enable_auto_scale:
            if req.target_dedicated:
                raise bad_request("InvalidPropertyValue",
                                  f"{prefix}targetDedicated must be absent (or 0) when enableAutoScale is true: "
                                  "the formula sets the target", field=prefix + "targetDedicated")
            if req.auto_scale_formula is None:
                raise bad_request("MissingRequiredProperty", f"{prefix}enableAutoScale needs autoScaleFormula",
                                  field=prefix + "autoScaleFormula")
            self._parse_formula(req.auto_scale_formula, prefix)
            interval = self._parse_interval(req.auto_scale_evaluation_interval, prefix)
            req = msgspec.structs.replace(req, auto_scale_evaluation_interval=format_duration(interval))
        elif req.auto_scale_formula is not None or req.auto_scale_evaluation_interval is not None:
            raise bad_request("InvalidPropertyValue",
                              f"{prefix}autoScaleFormula and autoScaleEvaluationInterval need enableAutoScale: true",
                              field=prefix + "enableAutoScale")
        return super()._check_pool_spec(req, prefix)

    def add_pool(self, req: m.PoolAdd) -> None:
        super().add_pool(req)
        if req.enable_auto_scale:
            # The formula runs at once (the pool gets its first target now), then every interval.
            # (Auto pools get their first run on the next tick.)
            self._as_enabled_at[req.name] = self.clock()
            self._run_autoscale(req.name, reschedule=True)

    def delete_pool(self, name: str) -> None:
        super().delete_pool(name)
        for d in (self._as_next, self._as_programs, self._as_enabled_at, self._as_boundary):
            d.pop(name, None)
        self.metrics.drop(name)

    def enable_autoscale(self, name: str, formula: str | None, interval_text: str | None) -> None:
        pool = self.get_pool(name)
        now = self.clock()
        enabled = pool.spec.enable_auto_scale
        if pool.state != "active":
            raise ApiError(409, "PoolBeingDeleted" if pool.state == "deleting" else "PoolNotActive",
                           f"pool {name!r} is {pool.state}")
        if not enabled and pool.alloc_state == "resizing":
            raise ApiError(409, "PoolBeingResized", f"pool {name!r} is resizing; wait until it is steady")
        last = self._as_enabled_at.get(name)
        throttle = self.autoscale_timing.enable_throttle
        if last is not None and now - last < throttle:
            raise ApiError(409, "TooManyEnableAutoScaleRequests",
                           f"autoscale of pool {name!r} was enabled {now - last:.0f} s ago; "
                           f"enable calls must be at least {throttle:g} s apart")
        if formula is None and not enabled:
            raise bad_request("MissingRequiredProperty", "enabling autoscale needs autoScaleFormula",
                              field="autoScaleFormula")
        program = self._parse_formula(formula) if formula is not None else None
        interval = self._parse_interval(interval_text) if interval_text is not None else None
        # validated: mutate
        spec = pool.spec
        pool.spec = msgspec.structs.replace(
            spec, enable_auto_scale=True,
            auto_scale_formula=formula if formula is not None else spec.auto_scale_formula,
            auto_scale_evaluation_interval=format_duration(interval) if interval is not None
            else spec.auto_scale_evaluation_interval or format_duration(self.autoscale_timing.default_interval),
        )
        if program is not None and formula is not None:
            self._as_programs[name] = (formula, program)
        self._as_enabled_at[name] = now
        self._put("pool", name, pool)
        # A new interval (or turning autoscale on) restarts the schedule at the request time (§5.8).
        self._run_autoscale(name, reschedule=interval is not None or not enabled)

    def disable_autoscale(self, name: str) -> None:
        pool = self.get_pool(name)
        if not pool.spec.enable_auto_scale:
            return  # already off: nothing to do (the real service answers 200 too)
        pool.spec = msgspec.structs.replace(pool.spec, enable_auto_scale=False, auto_scale_formula=None,
                                            auto_scale_evaluation_interval=None)
        self._as_next.pop(name, None)
        self._as_programs.pop(name, None)
        self._put("pool", name, pool)  # targets stay at their last values

    def evaluate_autoscale(self, name: str, formula: str) -> RunRec:
        """Run `formula` on the pool's current data without applying anything."""
        pool = self.get_pool(name)
        if not pool.spec.enable_auto_scale:
            raise ApiError(409, "OperationInvalidForCurrentState",
                           f"pool {name!r} does not have autoscale enabled; enable it before evaluating")
        program = self._parse_formula(formula)
        now = self.clock()
        return _run_rec(now, self._evaluate(pool, program, now))

    # ------------------------------------------------------------------ events

    def agent_message(self, agent_id: str, msg: pm.Msg) -> None:
        if isinstance(msg, pm.Heartbeat):
            agent = self.agents.get(agent_id)
            if agent is not None and agent.tvm is not None and agent.tvm in self.tvms:
                c = self._tvm_counters.get(agent.tvm)
                if c is None:
                    c = self._tvm_counters[agent.tvm] = TvmCounters()
                c.cpu_percent = msg.cpu_percent
                c.memory_bytes = float(msg.memory_used_bytes)
                c.disk_bytes = float(msg.disk_used_bytes)
                c.net_rx, c.net_tx = msg.net_rx_bytes, msg.net_tx_bytes
                c.fresh = True
        super().agent_message(agent_id, msg)

    def tick(self) -> None:
        now = self.clock()
        for pool in self.pools.values():
            if pool.spec.enable_auto_scale and pool.resize_started is not None:
                pool.resize_started = None  # resize timeouts do not apply to autoscale resizes (§5.8)
        super().tick()
        self._sample_metrics(now)
        for name, pool in list(self.pools.items()):
            if not pool.spec.enable_auto_scale or pool.state != "active":
                continue
            due = self._as_next.get(name)
            if due is None:  # restored from the journal: one interval after the last run
                run = pool.auto_scale_run
                due = self._as_next[name] = (run[0] + self._interval_of(pool)) if run else now
            if now >= due:
                self._run_autoscale(name, reschedule=True)

    # ------------------------------------------------------------------ metrics

    def _pool_tvms(self, pool: str) -> list[Tvm]:
        """Every TVM of the pool, leaving ones included (they still report metrics)."""
        return [t for t in self.tvms.values() if t.rec.pool == pool]

    def _sample_metrics(self, now: float) -> None:
        period = self.autoscale_timing.sample_period
        last = self.metrics.last_sample
        due = {name for name, p in self.pools.items()
               if p.state != "deleting" and (name not in last or now - last[name] >= period)}
        for name in [n for n in self._tvm_counters if n not in self.tvms]:
            del self._tvm_counters[name]
        for name in [n for n in self.metrics.pools() if self.pools.get(n) is None]:
            self.metrics.drop(name)  # the pool is gone (deletion finishes after its TVMs left)
        if not due:
            return
        counts = {name: [0, 0, 0, 0, 0.0] for name in due}  # active, running, succeeded, failed, wall s
        boundary: dict[str, set[int]] = {name: set() for name in due}
        for job in self.jobs.values():
            c = counts.get(job.rec.pool)
            if c is None:
                continue
            since = last.get(job.rec.pool, now - period)
            seen = self._as_boundary.get(job.rec.pool, set())
            for t in job.tasks.values():
                if t.state == ACTIVE:
                    c[0] += 1
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
        self._as_boundary.update(boundary)
        for name in sorted(due):
            active, running, succeeded, failed, wall = counts[name]
            members = self._pool_tvms(name)
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
            values.update(resource_values(c for t in members if (c := self._tvm_counters.get(t.rec.name))))
            self.metrics.record(name, now, values)

    # ------------------------------------------------------------------ evaluation

    def _program(self, pool: PoolRec) -> Program | None:
        formula = pool.spec.auto_scale_formula
        if formula is None:
            return None
        cached = self._as_programs.get(pool.spec.name)
        if cached is not None and cached[0] == formula:
            return cached[1]
        program = parse(formula)  # validated when stored; FormulaError only if the engine changed
        self._as_programs[pool.spec.name] = (formula, program)
        return program

    def _evaluate(self, pool: PoolRec, program: Program, now: float) -> AutoscaleResult:
        t = self.autoscale_timing
        name = pool.spec.name
        members = self._members(name)
        inputs = AutoscaleInputs(
            now=to_datetime(now),
            series=self.metrics.visible(name, now, t.visibility_delay),
            sample_period=timedelta(seconds=t.sample_period),
            current_dedicated=len(members),
            task_slots_per_node=pool.spec.max_tasks_per_vm,
            usable_node_count=sum(1 for m_ in members if m_.rec.state in ("idle", "running")),
            target_dedicated=pool.target,
        )
        return evaluate(program, inputs)

    def _run_autoscale(self, name: str, *, reschedule: bool) -> None:
        pool = self.pools[name]
        now = self.clock()
        try:
            program = self._program(pool)
        except FormulaError as exc:
            program = None
            result = AutoscaleResult(results="", error=(exc.code, exc.message))
        if program is not None:
            result = self._evaluate(pool, program, now)
        pool.auto_scale_run = _run_rec(now, result)
        if reschedule or name not in self._as_next:
            self._as_next[name] = now + self._interval_of(pool)
        self._put("pool", name, pool)
        if result.error is None and result.target_dedicated is not None:
            target = min(result.target_dedicated, self.max_pool_size)
            self._autoscale_resize(pool, target, result.deallocation_option or "requeue")

    # ------------------------------------------------------------------ applying targets

    def _autoscale_resize(self, pool: PoolRec, target: int, option: str) -> None:
        """Set the pool's target and let the pool mixin's allocation grow or shrink it, with the
        formula's deallocation option for the TVMs it removes (idle ones first)."""
        # retaineddata keeps task data on the TVM until retention ends; a leaving TVM is wiped
        # anyway, so the nearest behaviour is to wait for its tasks like taskcompletion.
        shrink = "taskcompletion" if option == "retaineddata" else option
        if (pool.target, pool.shrink_option, pool.resize_error) != (target, shrink, None):
            pool.target = target
            pool.shrink_option = shrink
            pool.resize_error = None
            self._put("pool", pool.spec.name, pool)
        self._allocate()


def _run_rec(now: float, result: AutoscaleResult) -> RunRec:
    if result.error is not None:
        return (now, result.results, result.error[0], result.error[1])
    return (now, result.results, None, None)
