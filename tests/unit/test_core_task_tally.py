"""Pure core: a job's task counts are kept as its tasks change (not counted per read), and they stay
exactly what a full count of its tasks gives: after random sequences of commands and agent events
(adds with dependencies, wide and multi-instance tasks, placements, completions, retries, late and
duplicate results, terminate, reactivate, delete, job disable/terminate/delete, lost agents, removed
TVMs, restarts of the coordinator) and in targeted cases."""

from __future__ import annotations

import random

import pytest
from msgspec.structs import astuple

from coordinator.common import models as m
from coordinator.common.errors import ApiError
from coordinator.core import CoordinatorState, Effects
from coordinator.core.records import Job
from protocol import messages as pm
from tests.unit.test_core_foundation import JOB, Clock, Journal, _core, _done, _hello, _runs, _wi


def _recount(job: Job) -> m.TaskCounts:
    """Task counts the way they were computed before the tally: one pass over the job's tasks."""
    c = m.TaskCounts()
    for t in job.tasks.values():
        if t.state == "active":
            c.active += 1
        elif t.state == "running":
            c.running += 1
        else:
            c.completed += 1
            if t.exit_code == 0 and t.failure is None:
                c.succeeded += 1
            else:
                c.failed += 1
    return c


def _check(core: CoordinatorState, step: object = None) -> None:
    for key, job in core.jobs.items():
        assert core.task_counts(job) == _recount(job), (key, step)
    # The account-wide count that max-tasks is checked against, kept by every insertion and removal.
    assert core.store.task_count == sum(len(j.tasks) for j in core.jobs.values()), step


class World:
    """A core, its journal, and what each simulated agent runs (RunTasks received, not yet ended)."""

    def __init__(self, seed: int, agents: int = 3) -> None:
        self.rng = random.Random(seed)
        self.core, self.clock, self.j = _core()
        self.epoch = 1
        self.agents = [f"a{i}" for i in range(agents)]
        self.runs: dict[str, dict[str, int]] = {
            a: {} for a in self.agents
        }  # agent -> key -> attempt
        self.old: list[tuple[str, str, int]] = []  # ended runs: late or duplicate results
        self.wis = ["wi"]
        self.n = 0
        for a in self.agents:
            _hello(self.core, a)
        self.core.add_pool(
            m.PoolAdd(
                name="p",
                target_dedicated=agents,
                max_tasks_per_vm=2,
                vm_size="large",
                communication=True,
            )
        )
        self._ready_all()
        self._add_workitem("wi")

    # ------------------------------------------------------------------ plumbing

    def pump(self) -> Effects:
        fx = self.j.apply(self.core.take_effects())
        for agent, msg in map(astuple, fx.sends):
            if isinstance(msg, pm.RunTask):
                self.runs.setdefault(agent, {})[msg.spec.key] = msg.spec.attempt
            elif isinstance(msg, pm.CancelTask):
                held = self.runs.get(agent, {})
                if held.get(msg.key) == msg.attempt:
                    del held[msg.key]
                    self.old.append((agent, msg.key, msg.attempt))
        return fx

    def _ready_all(self) -> None:
        for tvm in list(self.core.tvms.values()):
            if tvm.rec.state in ("starting", "creating", "unknown", "rebooting", "reimaging"):
                self.core.agent_message(tvm.rec.agent_id, pm.TvmReady(tvm_name=tvm.rec.name))
        self.pump()

    def _add_workitem(self, name: str) -> None:
        wi = _wi(name)
        wi.uses_task_dependencies = True
        wi.job_constraints = m.JobConstraints(max_task_retry_count=1)
        wi.on_task_failure = "performexitoptionsjobaction"
        self.core.add_workitem(wi)
        self.pump()

    def jobs(self) -> list[tuple[str, Job]]:
        return [(j.rec.workitem, j) for j in self.core.jobs.values()]

    def live_jobs(self) -> list[tuple[str, Job]]:
        live = [(wi, j) for wi, j in self.jobs() if j.rec.state in ("active", "disabled")]
        return live or self.jobs()

    def names(self, job: Job) -> list[str]:
        return sorted(job.tasks)

    def _task_req(self, job: Job, batch: list[str]) -> m.TaskAdd:
        rng = self.rng
        self.n += 1
        req = m.TaskAdd(name=f"t{self.n}", command_line="x")
        parents = [n for n in self.names(job) + batch if rng.random() < 0.08]
        if parents and rng.random() < 0.5:
            req.depends_on = m.TaskDependencies(task_ids=parents[:3])
        r = rng.random()
        if r < 0.08:
            req.multi_instance_settings = m.MultiInstanceSettings(
                number_of_instances=2, coordination_command_line="c"
            )
        elif r < 0.16:
            req.required_slots = 2
        if rng.random() < 0.1:
            action = rng.choice(["block", "satisfy"])
            job_action = rng.choice(["none", "none", "none", "disable", "terminate"])
            req.exit_conditions = m.ExitConditions(
                exit_codes=[
                    m.ExitCodeMapping(
                        code=3,
                        exit_options=m.ExitOptions(job_action=job_action, dependency_action=action),
                    )
                ]
            )
        return req

    # ------------------------------------------------------------------ operations

    def op_add(self) -> None:
        wi, job = self.rng.choice(self.live_jobs())
        if self.rng.random() < 0.5:
            self.core.add_task(wi, job.rec.name, self._task_req(job, []))
        else:
            batch: list[str] = []
            reqs = []
            for _ in range(self.rng.randint(1, 6)):
                reqs.append(self._task_req(job, batch))
                batch.append(reqs[-1].name)
            self.core.add_tasks(wi, job.rec.name, reqs)

    def op_schedule(self) -> None:
        self.core.schedule()

    def _pick_run(self) -> tuple[str, str, int] | None:
        held = [(a, k, att) for a, runs in self.runs.items() for k, att in runs.items()]
        return self.rng.choice(held) if held else None

    def op_complete(self) -> None:
        pick = self._pick_run()
        if pick is None:
            return
        agent, key, attempt = pick
        del self.runs[agent][key]
        self.old.append(pick)
        r = self.rng.random()
        failure = None
        if r < 0.1:
            failure = pm.Failure(category="ServerError", code=pm.AGENT_STOPPING, message="stop")
        elif r < 0.2:
            failure = pm.Failure(category="UserError", code="FailureExitCode", message="bad")
        code = self.rng.choice([0, 0, 0, 1, 3])
        now = self.clock()
        self.core.agent_message(
            agent,
            pm.TaskCompleted(
                key=key,
                attempt=attempt,
                exit_code=code,
                start_time=now - 1,
                end_time=now,
                failure=failure,
            ),
        )

    def op_started(self) -> None:
        pick = self._pick_run()
        if pick is not None:
            agent, key, attempt = pick
            self.core.agent_message(
                agent, pm.TaskStarted(key=key, attempt=attempt, start_time=self.clock())
            )

    def op_late_result(self) -> None:
        """A result of a run already ended, cancelled or requeued: recorded at most once."""
        if self.old:
            agent, key, attempt = self.rng.choice(self.old)
            now = self.clock()
            self.core.agent_message(
                agent,
                pm.TaskCompleted(
                    key=key, attempt=attempt, exit_code=0, start_time=now - 1, end_time=now
                ),
            )

    def _pick_task(self) -> tuple[str, Job, str] | None:
        wi, job = self.rng.choice(self.jobs())
        names = self.names(job)
        return (wi, job, self.rng.choice(names)) if names else None

    def op_terminate(self) -> None:
        pick = self._pick_task()
        if pick is not None:
            self.core.terminate_task(pick[0], pick[1].rec.name, pick[2])

    def op_reactivate(self) -> None:
        pick = self._pick_task()
        if pick is not None:
            self.core.reactivate_task(pick[0], pick[1].rec.name, pick[2])

    def op_delete(self) -> None:
        pick = self._pick_task()
        if pick is not None:
            self.core.delete_task(pick[0], pick[1].rec.name, pick[2])

    def op_job(self) -> None:
        wi, job = self.rng.choice(self.jobs())
        what = self.rng.choice(["terminate", "disable", "enable", "delete", "delete workitem"])
        if what == "terminate":
            self.core.terminate_job(wi, job.rec.name)
        elif what == "disable":
            option = self.rng.choice(["requeue", "terminate", "wait"])
            self.core.disable_job(wi, job.rec.name, option)
        elif what == "enable":
            self.core.enable_job(wi, job.rec.name)
        elif what == "delete":
            self.core.delete_job(wi, job.rec.name)
        else:
            self.core.delete_workitem(wi)

    def op_lose_agent(self) -> None:
        agent = self.rng.choice(self.agents)
        self.core.agent_exited(agent, "killed")
        for key, attempt in self.runs[agent].items():
            self.old.append((agent, key, attempt))
        self.runs[agent] = {}

    def op_rejoin(self) -> None:
        """An agent comes back reporting what it still runs (adopted or cancelled)."""
        agent = self.rng.choice(self.agents)
        running = [pm.RunningTask(key=k, attempt=a) for k, a in self.runs[agent].items()]
        tvm = next((t for t in self.core.tvms.values() if t.rec.agent_id == agent), None)
        self.core.agent_hello(
            pm.Hello(
                agent_id=agent,
                token="t",
                ip_address="10.0.0.1",
                hostname=agent,
                running=running,
                tvm_name=tvm.rec.name if tvm else "",
            )
        )
        self.pump()
        self._ready_all()

    def op_remove_tvm(self) -> None:
        tvms = [t for t in self.core.tvms.values() if t.rec.state in ("idle", "running")]
        if not tvms:
            return
        tvm = self.rng.choice(tvms)
        option = self.rng.choice(["requeue", "terminate"])
        self.core.remove_tvms(
            "p", m.TvmRemove(tvm_names=[tvm.rec.name], tvm_deallocation_option=option)
        )
        self.pump()
        # The agent stops its TVM and is free again; the pool grows back to its target.
        self.core.tvm_left(tvm.rec.agent_id, tvm.rec.name)
        self.runs[tvm.rec.agent_id] = {}
        self.pump()
        self.core.resize_pool("p", m.PoolResize(target_dedicated=len(self.agents)))
        self.pump()
        self._ready_all()

    def op_tick(self) -> None:
        self.clock.now += self.rng.choice([0.5, 2.0, 11.0])
        self.core.tick()

    def op_restart(self) -> None:
        """The coordinator restarts: a fresh core restored from the journal, agents say hello."""
        self.pump()
        self.epoch += 1
        again = CoordinatorState("acct", epoch=self.epoch, clock=self.clock, heartbeat_timeout=10.0)
        again.restore(self.j.load())
        _check(again, "restored")
        self.core = again
        for agent in self.agents:
            self.op_rejoin_one(agent)

    def op_rejoin_one(self, agent: str) -> None:
        running = [pm.RunningTask(key=k, attempt=a) for k, a in self.runs[agent].items()]
        tvm = next((t for t in self.core.tvms.values() if t.rec.agent_id == agent), None)
        self.core.agent_hello(
            pm.Hello(
                agent_id=agent,
                token="t",
                ip_address="10.0.0.1",
                hostname=agent,
                running=running,
                tvm_name=tvm.rec.name if tvm else "",
            )
        )
        self.pump()
        self._ready_all()

    def step(self) -> str:
        ops = [
            (self.op_add, 14),
            (self.op_schedule, 12),
            (self.op_complete, 16),
            (self.op_started, 3),
            (self.op_late_result, 3),
            (self.op_terminate, 3),
            (self.op_reactivate, 3),
            (self.op_delete, 2),
            (self.op_job, 1),
            (self.op_lose_agent, 1),
            (self.op_rejoin, 2),
            (self.op_remove_tvm, 1),
            (self.op_tick, 3),
            (self.op_restart, 1),
        ]
        op = self.rng.choices([o for o, _ in ops], weights=[w for _, w in ops])[0]
        try:
            op()
        except ApiError:
            pass  # refused (an ending job, a task not in a state for it): nothing changed
        self.pump()
        if not any(j.rec.state in ("active", "disabled", "disabling") for _, j in self.jobs()):
            self.n += 1
            self._add_workitem(f"w{self.n}")
        return op.__name__


@pytest.mark.parametrize("seed", range(40))
def test_counts_equal_a_full_count_after_every_random_step(seed: int) -> None:
    w = World(seed)
    seen: set[str] = set()
    for i in range(250):
        name = w.step()
        seen.add(name)
        _check(w.core, (i, name))
    assert {"op_add", "op_schedule", "op_complete"} <= seen


def test_random_runs_reach_every_count() -> None:
    """Across the seeds, every count (and restarts, lost agents, reactivations) is exercised: the
    random test is not vacuous."""
    maxima = {"active": 0, "running": 0, "succeeded": 0, "failed": 0}
    for seed in range(5):
        w = World(seed)
        for _ in range(250):
            w.step()
            for _, job in w.jobs():
                c = w.core.task_counts(job)
                for k in maxima:
                    maxima[k] = max(maxima[k], getattr(c, k))
    assert all(v > 0 for v in maxima.values()), maxima


# ---------------------------------------------------------------------------- targeted cases


def _cluster(slots: int = 2) -> tuple[CoordinatorState, Clock, Journal]:
    core, clock, j = _core()
    _hello(core, "a0")
    core.add_pool(m.PoolAdd(name="p", target_dedicated=1, max_tasks_per_vm=slots, vm_size="large"))
    tvm = next(iter(core.tvms.values()))
    core.agent_message("a0", pm.TvmReady(tvm_name=tvm.rec.name))
    wi = _wi()
    wi.job_constraints = m.JobConstraints(max_task_retry_count=1)
    wi.uses_task_dependencies = True
    core.add_workitem(wi)
    j.apply(core.take_effects())
    return core, clock, j


def _counts(core: CoordinatorState) -> tuple[int, int, int, int, int]:
    job = core.get_job("wi", JOB)
    c = core.task_counts(job)
    assert c == _recount(job)
    return (c.active, c.running, c.completed, c.succeeded, c.failed)


def test_place_complete_retry_fail_terminate_reactivate_delete() -> None:
    core, _, j = _cluster()
    core.add_tasks("wi", JOB, [m.TaskAdd(name=f"t{i}", command_line="x") for i in range(3)])
    assert _counts(core) == (3, 0, 0, 0, 0)
    core.schedule()
    runs = _runs(j.apply(core.take_effects()))
    assert _counts(core) == (1, 2, 0, 0, 0)
    _done(core, *runs[0], code=0)
    assert _counts(core) == (1, 1, 1, 1, 0)
    _done(core, *runs[1], code=1)  # retried once: active again, not failed
    assert _counts(core) == (2, 0, 1, 1, 0)
    _done(core, *runs[1], code=1)  # the same result again: recorded once
    assert _counts(core) == (2, 0, 1, 1, 0)
    core.schedule()
    runs = _runs(j.apply(core.take_effects()))
    retried = next(r for r in runs if r[1].task == "t1")
    _done(core, *retried, code=1)  # out of retries: failed
    assert _counts(core) == (0, 1, 2, 1, 1)
    core.terminate_task("wi", JOB, "t2")  # running, terminated: failed
    assert _counts(core) == (0, 0, 3, 1, 2)
    core.reactivate_task("wi", JOB, "t1")
    assert _counts(core) == (1, 0, 2, 1, 1)
    core.delete_task("wi", JOB, "t0")
    assert _counts(core) == (1, 0, 1, 0, 1)
    core.delete_task("wi", JOB, "t1")
    assert _counts(core) == (0, 0, 1, 0, 1)


def test_blocked_tasks_count_as_active_and_a_job_terminate_ends_running_ones() -> None:
    core, _, j = _cluster(slots=1)
    core.add_tasks(
        "wi",
        JOB,
        [
            m.TaskAdd(name="a", command_line="x"),
            m.TaskAdd(name="b", command_line="x", depends_on=m.TaskDependencies(task_ids=["a"])),
        ],
    )
    core.schedule()
    (run,) = _runs(j.apply(core.take_effects()))
    assert _counts(core) == (1, 1, 0, 0, 0)  # b waits for a: active
    core.terminate_job("wi", JOB)
    assert _counts(core) == (1, 0, 1, 0, 1)  # a killed with its job, b never runs
    _done(core, *run, code=0)  # the killed run's late result changes nothing
    assert _counts(core) == (1, 0, 1, 0, 1)


def test_lost_agent_requeues_and_a_restart_rebuilds_the_counts() -> None:
    core, clock, j = _cluster()
    core.add_tasks("wi", JOB, [m.TaskAdd(name=f"t{i}", command_line="x") for i in range(4)])
    core.schedule()
    runs = _runs(j.apply(core.take_effects()))
    _done(core, *runs[0], code=0)
    _done(core, *runs[1], code=1)  # retried
    core.schedule()
    runs = _runs(j.apply(core.take_effects()))
    assert _counts(core) == (1, 2, 1, 1, 0)
    core.agent_exited("a0", "killed")  # its running tasks back in the queue
    j.apply(core.take_effects())
    assert _counts(core) == (3, 0, 1, 1, 0)
    # A new agent process; the unknown TVM expires and the pool takes the agent again.
    clock.now += 200
    core.tick()
    core.agent_hello(pm.Hello(agent_id="a0", token="t"))
    core.tick()
    core.agent_message("a0", pm.TvmReady(tvm_name=core.pool_tvms("p")[0].rec.name))
    core.schedule()
    runs = _runs(j.apply(core.take_effects()))
    assert _counts(core) == (1, 2, 1, 1, 0)
    # Restart: placements are not journaled, the restored core counts them active until the agent
    # reports them, then running again (adopted).
    again = CoordinatorState("acct", epoch=2, clock=clock, heartbeat_timeout=10.0)
    again.restore(j.load())
    job = again.get_job("wi", JOB)
    assert (
        again.task_counts(job) == _recount(job) == m.TaskCounts(active=3, completed=1, succeeded=1)
    )
    tvm = again.pool_tvms("p")[0]
    again.agent_hello(
        pm.Hello(
            agent_id="a0",
            token="t",
            tvm_name=tvm.rec.name,
            running=[pm.RunningTask(key=s.key, attempt=s.attempt) for _, s in runs],
        )
    )
    assert (
        again.task_counts(job)
        == _recount(job)
        == m.TaskCounts(active=1, running=2, completed=1, succeeded=1)
    )
