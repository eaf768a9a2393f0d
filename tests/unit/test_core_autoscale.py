"""Issue 7, pure core: metric sampling, autoscale enable/disable/evaluate, periodic runs, bad input.

No I/O: the core is driven with agent events and a fake clock (hours of evaluation intervals run
in microseconds); effects and records are inspected directly.
"""

from __future__ import annotations

import math

import pytest
from msgspec.structs import astuple

from coordinator.autoscale import SYNTAX_ERROR, TOO_LONG
from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import CoordinatorState
from coordinator.core.metrics_history import MetricsHistory, TvmCounters, resource_values
from coordinator.rest.views import pool_view
from protocol import messages as pm

PENDING = """
$tasks = max(0, $PendingTasks.GetSample(1));
$TargetDedicatedNodes = min($tasks, 3);
$NodeDeallocationOption = taskcompletion;
"""
MIN = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _core(agents: int = 4) -> tuple[CoordinatorState, Clock]:
    clock = Clock()
    core = CoordinatorState("acct", clock=clock, heartbeat_timeout=10.0)
    for i in range(agents):
        core.agent_hello(pm.Hello(agent_id=f"a{i}", token="t"))
    core.take_effects()
    return core, clock


def _autopool(
    core: CoordinatorState, formula: str = PENDING, interval: str | None = "PT5M", name: str = "p"
) -> None:
    core.add_pool(
        m.PoolAdd(
            name=name,
            enable_auto_scale=True,
            auto_scale_formula=formula,
            auto_scale_evaluation_interval=interval,
        )
    )


def _workitem(core: CoordinatorState, pool: str = "p") -> str:
    core.add_workitem(
        m.WorkitemAdd(
            name="wi", job_execution_environment=m.JobExecutionEnvironment(pool_name=pool)
        )
    )
    return next(iter(core.jobs)).split("/")[1]


def _advance(
    core: CoordinatorState,
    clock: Clock,
    seconds: float,
    step: float = 10.0,
) -> list[tuple[str, pm.TaskSpec]]:
    """Let time pass: agents keep heartbeating, confirm joins and leaves; the core ticks and
    schedules. Returns the tasks sent to agents meanwhile (agent, spec)."""
    runs: list[tuple[str, pm.TaskSpec]] = []
    end = clock.now + seconds
    while clock.now < end:
        clock.now += step
        for a in core.agents.values():
            core.agent_message(a.agent_id, pm.Heartbeat(cpu_percent=50.0))
        core.tick()
        core.schedule()
        while sends := core.take_effects().sends:
            for agent_id, msg in map(astuple, sends):
                if isinstance(msg, pm.JoinPool):
                    core.agent_message(agent_id, pm.TvmReady(tvm_name=msg.tvm_name))
                elif isinstance(msg, pm.LeavePool):
                    core.agent_message(agent_id, pm.TvmLeft(tvm_name=msg.tvm_name))
                elif isinstance(msg, pm.RunTask):
                    runs.append((agent_id, msg.spec))
            core.schedule()
    return runs


def _complete(
    core: CoordinatorState, clock: Clock, agent: str, spec: pm.TaskSpec, code: int = 0
) -> None:
    core.agent_message(
        agent,
        pm.TaskCompleted(
            key=spec.key,
            attempt=spec.attempt,
            exit_code=code,
            start_time=clock.now,
            end_time=clock.now,
        ),
    )


def _size(core: CoordinatorState, pool: str = "p") -> int:
    return sum(1 for t in core.tvms.values() if t.rec.pool == pool)


def _refused(fn: object, *args: object) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value


# ---------------------------------------------------------------------------- metrics


def test_task_metrics_are_sampled_every_period() -> None:
    core, clock = _core(agents=0)
    core.add_pool(m.PoolAdd(name="p"))
    job = _workitem(core)
    for i in range(5):
        core.add_task("wi", job, m.TaskAdd(name=f"t{i}", command_line="x"))
    _advance(core, clock, 10 * MIN)
    series = core.metrics.visible("p", clock.now, 0)
    assert len(series["PendingTasks"]) == 20  # one sample per 30 s
    assert {s.value for s in series["ActiveTasks"]} == {5.0}
    assert {s.value for s in series["PendingTasks"]} == {5.0}
    assert {s.value for s in series["RunningTasks"]} == {0.0}
    assert {s.value for s in series["SampleNodeCount"]} == {0.0}
    # samples reach formulas about a minute late
    assert len(core.metrics.visible("p", clock.now, 60.0)["PendingTasks"]) == 18


def test_succeeded_and_failed_count_tasks_finished_in_the_period() -> None:
    core, clock = _core(agents=1)
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1, max_tasks_per_vm=2))
    job = _workitem(core)
    _advance(core, clock, 30)
    core.add_task("wi", job, m.TaskAdd(name="ok", command_line="x"))
    core.add_task("wi", job, m.TaskAdd(name="bad", command_line="x"))
    core.schedule()
    runs = [
        msg.spec
        for _, msg in map(astuple, core.take_effects().sends)
        if isinstance(msg, pm.RunTask)
    ]
    assert len(runs) == 2
    clock.now += 30
    core.tick()
    assert core.metrics.visible("p", clock.now, 0)["RunningTasks"][-1].value == 2
    for spec, code in zip(runs, (0, 3), strict=True):
        core.agent_message(
            "a0",
            pm.TaskCompleted(
                key=spec.key,
                attempt=spec.attempt,
                exit_code=code,
                start_time=clock.now - 5,
                end_time=clock.now,
            ),
        )
    clock.now += 30
    core.tick()
    last = {k: v[-1].value for k, v in core.metrics.visible("p", clock.now, 0).items()}
    assert (
        last["SucceededTasks"],
        last["FailedTasks"],
        last["RunningTasks"],
        last["WallClockSeconds"],
    ) == (1, 1, 0, 10)
    clock.now += 30
    core.tick()
    last = {k: v[-1].value for k, v in core.metrics.visible("p", clock.now, 0).items()}
    assert (last["SucceededTasks"], last["FailedTasks"]) == (0, 0)  # counted once, in their period


def test_resource_metrics_come_from_heartbeats() -> None:
    core, clock = _core(agents=2)
    core.add_pool(m.PoolAdd(name="p", target_dedicated=2))
    _advance(core, clock, 30)
    for i, agent in enumerate(("a0", "a1")):
        core.agent_message(
            agent,
            pm.Heartbeat(
                cpu_percent=20.0 + 40 * i,
                memory_used_bytes=1000 * (i + 1),
                disk_used_bytes=10,
                net_rx_bytes=5000,
                net_tx_bytes=100,
            ),
        )
    clock.now += 30
    core.tick()
    for agent in ("a0", "a1"):
        core.agent_message(
            agent, pm.Heartbeat(cpu_percent=40.0, net_rx_bytes=5500, net_tx_bytes=300)
        )
    clock.now += 30
    core.tick()
    s = core.metrics.visible("p", clock.now, 0)
    assert [x.value for x in s["CPUPercent"][-2:]] == [40.0, 40.0]
    assert s["MemoryBytes"][-2].value == 1500.0
    assert [x.value for x in s["NetworkInBytes"][-2:]] == [
        10000.0,
        1000.0,
    ]  # deltas of the counters
    assert s["NetworkOutBytes"][-1].value == 400.0
    assert s["SampleNodeCount"][-1].value == 2


def test_a_heartbeat_cpu_figure_that_is_not_a_number_reads_as_zero() -> None:
    """A broken agent's NaN or infinite CPU figure must not reach the pool's samples (a formula
    averaging them would get no count)."""
    core, clock = _core(agents=2)
    core.add_pool(m.PoolAdd(name="p", target_dedicated=2))
    _advance(core, clock, 30)
    core.agent_message("a0", pm.Heartbeat(cpu_percent=math.nan))
    core.agent_message("a1", pm.Heartbeat(cpu_percent=math.inf))
    clock.now += 30
    core.tick()
    assert core.metrics.visible("p", clock.now, 0)["CPUPercent"][-1].value == 0.0


def test_history_is_bounded_and_pure() -> None:
    h = MetricsHistory(max_samples=3)
    for i in range(10):
        h.record("p", 1000.0 + 30 * i, {"ActiveTasks": i})
    assert [s.value for s in h.visible("p", 2000.0, 0)["ActiveTasks"]] == [7, 8, 9]
    with pytest.raises(ValueError, match="unknown series"):
        h.record("p", 0, {"Bogus": 1})
    h.drop("p")
    assert h.visible("p", 2000.0, 0) == {}
    assert resource_values([TvmCounters()]) == {}  # no heartbeat since the last sample: no sample
    c = TvmCounters(net_rx=10, counted_rx=50, counted_tx=0, fresh=True)  # counter restarted
    assert resource_values([c])["NetworkInBytes"] == 0


# ---------------------------------------------------------------------------- pool create / enable


def test_create_with_autoscale_runs_the_formula_at_once() -> None:
    core, clock = _core()
    _autopool(core, "$TargetDedicatedNodes = 2;")
    pool = core.pools["p"]
    assert pool.target == 2
    assert _size(core) == 2
    view = pool_view(core, pool)
    assert view.enable_auto_scale
    assert view.auto_scale_evaluation_interval == "PT5M"
    assert view.auto_scale_run is not None
    assert view.auto_scale_run.results == "$TargetDedicatedNodes=2;$NodeDeallocationOption=requeue"
    assert view.auto_scale_run.error is None


def test_default_interval_is_15_minutes_and_runs_repeat() -> None:
    core, clock = _core()
    _autopool(core, "$TargetDedicatedNodes = $CurrentDedicatedNodes + 1;", interval=None)
    assert pool_view(core, core.pools["p"]).auto_scale_evaluation_interval == "PT15M"
    assert core.pools["p"].target == 1
    _advance(core, clock, 14 * MIN)
    assert core.pools["p"].target == 1
    _advance(core, clock, 2 * MIN)
    assert core.pools["p"].target == 2
    _advance(core, clock, 15 * MIN)
    assert core.pools["p"].target == 3


@pytest.mark.parametrize(
    ("formula", "code", "where"),
    [
        ("$TargetDedicatedNodes = ;", SYNTAX_ERROR, "line 1, column"),
        ("$a = 1;\n$TargetDedicatedNodes = max(;", SYNTAX_ERROR, "line 2, column"),
        ("$TargetDedicatedNodes = nosuchfunction(1);", SYNTAX_ERROR, "line 1, column"),
        ("$TargetDedicatedNodes = 1;" + " " * 8200, TOO_LONG, ""),
    ],
)
def test_bad_formula_is_refused_on_create_and_nothing_is_stored(
    formula: str, code: str, where: str
) -> None:
    core, _ = _core()
    err = _refused(_autopool, core, formula)
    assert (err.status, err.code) == (400, code)
    assert where in err.message
    assert "autoScaleFormula" in err.message
    if where:
        assert err.values["line"]
        assert err.values["column"]
    assert "p" not in core.pools
    assert core.take_effects().writes == []


@pytest.mark.parametrize(
    ("kw", "code", "field"),
    [
        ({"enable_auto_scale": True}, "MissingRequiredProperty", "autoScaleFormula"),
        (
            {
                "enable_auto_scale": True,
                "auto_scale_formula": "$TargetDedicatedNodes=1",
                "auto_scale_evaluation_interval": "PT4M",
            },
            "InvalidPropertyValue",
            "autoScaleEvaluationInterval",
        ),
        (
            {
                "enable_auto_scale": True,
                "auto_scale_formula": "$TargetDedicatedNodes=1",
                "auto_scale_evaluation_interval": "P8D",
            },
            "InvalidPropertyValue",
            "autoScaleEvaluationInterval",
        ),
        (
            {
                "enable_auto_scale": True,
                "auto_scale_formula": "$TargetDedicatedNodes=1",
                "auto_scale_evaluation_interval": "soon",
            },
            "InvalidPropertyValue",
            "autoScaleEvaluationInterval",
        ),
        (
            {
                "enable_auto_scale": True,
                "auto_scale_formula": "$TargetDedicatedNodes=1",
                "target_dedicated": 2,
            },
            "InvalidPropertyValue",
            "targetDedicated",
        ),
        (
            {"auto_scale_formula": "$TargetDedicatedNodes=1"},
            "InvalidPropertyValue",
            "enableAutoScale",
        ),
    ],
)
def test_bad_autoscale_settings_on_create(kw: dict[str, object], code: str, field: str) -> None:
    core, _ = _core()
    err = _refused(core.add_pool, m.PoolAdd(name="p", **kw))  # type: ignore[arg-type]
    assert (err.status, err.code, err.values.get("field")) == (400, code, field)
    assert "p" not in core.pools
    assert core.take_effects().writes == []


def test_enable_disable_and_manual_resize() -> None:
    core, clock = _core()
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1))
    _advance(core, clock, 30)
    err = _refused(core.enable_autoscale, "p", None, None)
    assert (err.status, err.code) == (400, "MissingRequiredProperty")
    err = _refused(core.enable_autoscale, "p", "$TargetDedicatedNodes = (1", None)
    assert (err.status, err.code) == (400, SYNTAX_ERROR)
    assert "line 1, column" in err.message
    err = _refused(core.enable_autoscale, "nope", "$TargetDedicatedNodes = 1", None)
    assert (err.status, err.code) == (404, "PoolNotFound")
    assert not core.pools["p"].spec.enable_auto_scale
    assert core.pools["p"].auto_scale_run is None

    core.enable_autoscale("p", "$TargetDedicatedNodes = 3", "PT10M")
    pool = core.pools["p"]
    assert pool.spec.enable_auto_scale
    assert pool.spec.auto_scale_evaluation_interval == "PT10M"
    assert pool.target == 3
    err = _refused(core.resize_pool, "p", m.PoolResize(target_dedicated=1))
    assert (err.status, err.code) == (409, "AutoScaleEnabled")
    # a second enable within 30 s is throttled
    err = _refused(core.enable_autoscale, "p", "$TargetDedicatedNodes = 1", None)
    assert err.code == "TooManyEnableAutoScaleRequests"
    assert pool.target == 3
    _advance(core, clock, MIN)
    # formula only: evaluated now, schedule kept
    core.enable_autoscale("p", "$TargetDedicatedNodes = 2", None)
    assert pool.target == 2
    assert pool.spec.auto_scale_evaluation_interval == "PT10M"

    core.disable_autoscale("p")
    assert not pool.spec.enable_auto_scale
    assert pool.spec.auto_scale_formula is None
    assert pool.target == 2  # targets stay
    _advance(core, clock, 30 * MIN)
    assert pool.target == 2  # no more runs
    assert pool_view(core, pool).auto_scale_run is not None  # the last run stays visible
    core.resize_pool("p", m.PoolResize(target_dedicated=1))
    assert pool.target == 1


def test_evaluate_answers_without_applying() -> None:
    core, clock = _core()
    _autopool(core, "$TargetDedicatedNodes = 1;")
    _advance(core, clock, 30)
    writes_before = core.take_effects().writes
    ts, results, code, message = core.evaluate_autoscale(
        "p", "$TargetDedicatedNodes = 3; $x = 2 * 2;"
    )
    assert (results, code) == ("$TargetDedicatedNodes=3;$NodeDeallocationOption=requeue;$x=4", None)
    assert ts == clock.now
    assert core.pools["p"].target == 1
    assert core.take_effects().writes == []
    del writes_before
    # a bare unknown identifier is tolerated and leaves the target as it is
    _, results, code, _ = core.evaluate_autoscale("p", "something_useless")
    assert (results, code) == ("$TargetDedicatedNodes=1;$NodeDeallocationOption=requeue", None)
    # runtime failure: error with code and message
    _, results, code, message = core.evaluate_autoscale("p", "$TargetDedicatedNodes = $nothing;")
    assert code == "AutoScalingFormulaEvaluationError"
    assert "line 1, column" in (message or "")
    err = _refused(core.evaluate_autoscale, "p", "$TargetDedicatedNodes = = 1")
    assert (err.status, err.code) == (400, SYNTAX_ERROR)
    core.add_pool(m.PoolAdd(name="manual"))
    err = _refused(core.evaluate_autoscale, "manual", "$TargetDedicatedNodes = 1")
    assert (err.status, err.code) == (409, "OperationInvalidForCurrentState")


def test_insufficient_samples_fail_the_run_and_change_nothing() -> None:
    core, clock = _core()
    formula = "$TargetDedicatedNodes = max(1, avg($PendingTasks.GetSample(TimeInterval_Minute * 10, 80)));"
    core.add_pool(m.PoolAdd(name="p", target_dedicated=2))
    _advance(core, clock, 2 * MIN)
    core.enable_autoscale("p", formula, "PT5M")
    run = core.pools["p"].auto_scale_run
    assert run is not None
    assert run[2] == "InsufficientSampleData"
    assert run[1] == ""
    assert "$PendingTasks" in (run[3] or "")
    assert core.pools["p"].target == 2  # unchanged
    # once ten minutes of samples exist the same formula applies (18 of 20 are visible: 90%)
    _advance(core, clock, 15 * MIN)
    run = core.pools["p"].auto_scale_run
    assert run is not None
    assert run[2] is None
    assert core.pools["p"].target == 1


def test_hours_of_pending_tasks_scale_out_and_back_in_with_taskcompletion() -> None:
    core, clock = _core(agents=4)
    _autopool(core, PENDING, "PT5M")
    job = _workitem(core)
    assert core.pools["p"].target == 0
    _advance(core, clock, 60 * MIN)
    assert _size(core) == 0
    for i in range(10):
        core.add_task("wi", job, m.TaskAdd(name=f"t{i}", command_line="x"))
    runs = _advance(core, clock, 7 * MIN)  # one interval plus the visibility delay
    assert core.pools["p"].target == 3
    assert _size(core) == 3
    assert core.pools["p"].shrink_option == "taskcompletion"
    # every task but the first one placed finishes at once; that one keeps running
    keep = runs[0]
    done = 0
    while runs:
        for agent, spec in runs:
            if spec != keep[1]:
                _complete(core, clock, agent, spec)
                done += 1
        runs = _advance(core, clock, 10)
    assert done == 9
    counts = core.task_counts(core.jobs[f"wi/{job}"])
    assert (counts.running, counts.active, counts.completed) == (1, 0, 9)
    _advance(core, clock, 10 * MIN)
    assert core.pools["p"].target == 1
    assert _size(core) == 1
    assert core.tvms[core.get_task("wi", job, keep[1].task)[1].tvm or ""].rec.pool == "p"
    _complete(core, clock, *keep)
    _advance(core, clock, 10 * MIN)
    assert core.pools["p"].target == 0
    assert _size(core) == 0
    _, t = core.get_task("wi", job, keep[1].task)
    assert t.state == "completed"
    assert t.requeue_count == 0


def test_scale_in_waits_for_running_tasks_with_taskcompletion() -> None:
    core, clock = _core(agents=2)
    core.add_pool(m.PoolAdd(name="p", target_dedicated=2))
    job = _workitem(core)
    _advance(core, clock, 30)
    core.add_task("wi", job, m.TaskAdd(name="long", command_line="x"))
    ((agent, spec),) = _advance(core, clock, 10)
    core.disable_autoscale("p")  # no-op on a manual pool
    core.enable_autoscale(
        "p", "$TargetDedicatedNodes = 0; $NodeDeallocationOption = taskcompletion;", "PT5M"
    )
    assert core.pools["p"].target == 0
    _advance(core, clock, MIN)
    tvms = [t for t in core.tvms.values() if t.rec.pool == "p"]
    assert len(tvms) == 1
    assert tvms[0].rec.state == "leavingpool"
    assert core.get_task("wi", job, "long")[1].state == "running"
    _complete(core, clock, agent, spec)
    _advance(core, clock, MIN)
    assert _size(core) == 0
    assert core.get_task("wi", job, "long")[1].requeue_count == 0


def test_requeue_option_moves_tasks_at_once() -> None:
    core, clock = _core(agents=2)
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1))
    job = _workitem(core)
    _advance(core, clock, 30)
    core.add_task("wi", job, m.TaskAdd(name="long", command_line="x"))
    assert len(_advance(core, clock, 10)) == 1
    core.enable_autoscale("p", "$TargetDedicatedNodes = 0;", None)
    _advance(core, clock, MIN)
    _, task = core.get_task("wi", job, "long")
    assert task.state == "active"
    assert task.requeue_count == 1
    assert core.pools["p"].target == 0


def test_targets_are_capped_at_the_pool_size_limit() -> None:
    core, clock = _core(agents=1)
    core.max_pool_size = 5
    _autopool(core, "$TargetDedicatedNodes = 1000;")
    assert core.pools["p"].target == 5
    assert core.pools["p"].auto_scale_run is not None
    assert core.pools["p"].auto_scale_run[1].startswith("$TargetDedicatedNodes=1000")


def test_autoscale_resize_does_not_time_out() -> None:
    core, clock = _core(agents=1)
    _autopool(core, "$TargetDedicatedNodes = 3;", "PT5M")
    _advance(core, clock, 60 * MIN)
    pool = core.pools["p"]
    assert pool.resize_error is None
    assert pool.alloc_state == "resizing"
    assert _size(core) == 1


def test_deleted_pool_forgets_its_history() -> None:
    core, clock = _core(agents=0)
    _autopool(core, "$TargetDedicatedNodes = 0;")
    _advance(core, clock, 2 * MIN)
    assert core.metrics.count("p", "PendingTasks") > 0
    core.delete_pool("p")
    _advance(core, clock, 30)
    assert "p" not in core.pools
    assert core.metrics.count("p", "PendingTasks") == 0


def test_restore_keeps_settings_and_last_run_and_resumes_the_schedule() -> None:
    core, clock = _core(agents=0)
    _autopool(core, "$TargetDedicatedNodes = $CurrentDedicatedNodes + 1;", "PT5M")
    first = core.pools["p"].auto_scale_run
    rows = [
        ("pool", w.key, w.body) for w in core.take_effects().writes if w.kind == "pool" and w.body
    ]
    again = CoordinatorState("acct", clock=clock, heartbeat_timeout=10.0)
    again.restore(rows[-1:])
    pool = again.pools["p"]
    assert pool.spec.enable_auto_scale
    assert pool.auto_scale_run == first
    assert pool.target == 1
    clock.now += 4 * MIN
    again.tick()
    assert pool.auto_scale_run == first  # not yet: one interval after the last run
    clock.now += 2 * MIN
    again.tick()
    assert pool.auto_scale_run != first
    assert pool.target == 1


def test_auto_pool_formulas_are_checked_and_run() -> None:
    core, clock = _core(agents=2)
    field = "jobExecutionEnvironment.autoPoolSpecification.pool."

    def workitem(name: str, formula: str) -> None:
        spec = {
            "poolLifetimeOption": "job",
            "pool": {
                "enableAutoScale": True,
                "autoScaleFormula": formula,
                "autoScaleEvaluationInterval": "PT5M",
            },
        }
        core.add_workitem(
            m.WorkitemAdd(
                name=name,
                job_execution_environment=m.JobExecutionEnvironment(auto_pool_specification=spec),
            )
        )

    err = _refused(workitem, "bad", "$TargetDedicatedNodes = (")
    assert (err.status, err.code, err.values["field"]) == (
        400,
        SYNTAX_ERROR,
        field + "autoScaleFormula",
    )
    assert core.pools == {}
    assert "bad" not in core.workitems
    workitem("good", "$TargetDedicatedNodes = 2;")
    ((name, pool),) = core.pools.items()
    assert pool.spec.enable_auto_scale
    _advance(core, clock, 10)
    assert pool.target == 2
    assert _size(core, name) == 2
    assert pool.auto_scale_run is not None
    assert pool.auto_scale_run[2] is None


def test_recent_formula_runs_are_kept_per_pool_and_bounded() -> None:
    """What the dashboard plots from before it was opened: every run, newest last, at most
    HISTORY_RUNS of them, dropped with the pool."""
    from coordinator.core.autoscale import HISTORY_RUNS

    core, clock = _core(agents=0)
    _autopool(core, "$TargetDedicatedNodes = 0;")
    _advance(core, clock, 16 * MIN)
    runs = list(core.autoscale.history["p"])
    assert len(runs) == 4  # at 0, 5, 10 and 15 minutes
    assert all(r[1].startswith("$TargetDedicatedNodes=0;") for r in runs)
    assert [r[0] for r in runs] == sorted(r[0] for r in runs)
    assert core.autoscale.history["p"].maxlen == HISTORY_RUNS
    core.delete_pool("p")
    _advance(core, clock, 30)
    assert "p" not in core.autoscale.history


def test_rates_are_sampled_about_once_a_second_for_the_dashboard() -> None:
    from coordinator.core.facade import RATE_SAMPLES

    core, clock = _core(agents=1)
    _autopool(core, "$TargetDedicatedNodes = 1;")
    job = _workitem(core)
    core.add_task("wi", job, m.TaskAdd(name="t1", command_line="true"))
    runs = _advance(core, clock, 5, step=0.25)
    assert runs
    _complete(core, clock, *runs[0])
    _advance(core, clock, 3, step=0.25)
    samples = list(core.rate_samples)
    assert 7 <= len(samples) <= 9  # one per second, not one per tick
    assert all(b[0] - a[0] >= 1.0 for a, b in zip(samples, samples[1:], strict=False))
    assert samples[-1][1:] == (core.placements, core.completions) == (1, 1)
    assert core.rate_samples.maxlen == RATE_SAMPLES
