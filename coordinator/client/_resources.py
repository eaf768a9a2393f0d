"""Resource groups of the client: pools, TVMs, workitems, jobs, operations, certificates, keys, agents and TVM users."""

from __future__ import annotations

import builtins
from typing import Any

import msgspec

from coordinator.common import models as m

from ._http import (
    _Call,
    _Group,
    _list,
    _one,
    _seg,
)


class Pools(_Group):
    def add(
        self,
        name: str,
        *,
        vm_size: str = "small",
        target_dedicated: int = 0,
        max_tasks_per_vm: int = 1,
        tvm_fill_type: str = "spread",
        **extra: Any,
    ) -> Any:
        spec = m.PoolAdd(
            name=name,
            vm_size=vm_size,
            target_dedicated=target_dedicated,
            max_tasks_per_vm=max_tasks_per_vm,
            tvm_fill_type=tvm_fill_type,
            **extra,
        )
        return self._c._call(_Call("POST", "/pools", spec, parse=_one(m.Pool)))

    def list(self) -> Any:
        return self._c._call(_Call("GET", "/pools", parse=_list(m.Pool)))

    def get(self, name: str) -> Any:
        return self._c._call(_Call("GET", f"/pools/{_seg(name)}", parse=_one(m.Pool)))

    def delete(self, name: str) -> Any:
        return self._c._call(_Call("DELETE", f"/pools/{_seg(name)}"))

    def resize(
        self,
        name: str,
        target_dedicated: int,
        *,
        tvm_deallocation_option: str = "requeue",
        resize_timeout: str | None = None,
    ) -> Any:
        body = m.PoolResize(
            target_dedicated=target_dedicated,
            tvm_deallocation_option=tvm_deallocation_option,
            resize_timeout=resize_timeout,
        )
        return self._c._call(_Call("POST", f"/pools/{_seg(name)}/resize", body))

    def stop_resize(self, name: str) -> Any:
        return self._c._call(_Call("POST", f"/pools/{_seg(name)}/stopresize"))

    # builtins.list: in this class's body a bare `list` is the method `list` above.
    def remove_tvms(
        self,
        name: str,
        tvm_names: builtins.list[str],
        *,
        tvm_deallocation_option: str = "requeue",
        resize_timeout: str | None = None,
    ) -> Any:
        body = m.TvmRemove(
            tvm_names=list(tvm_names),
            tvm_deallocation_option=tvm_deallocation_option,
            resize_timeout=resize_timeout,
        )
        return self._c._call(_Call("POST", f"/pools/{_seg(name)}/removetvms", body))

    def vm_sizes(self) -> Any:
        return self._c._call(_Call("GET", "/vmsizes", parse=_list(m.VmSize)))

    def enable_autoscale(
        self, name: str, formula: str | None = None, *, evaluation_interval: str | None = None
    ) -> Any:
        """Turn autoscale on (the formula is required then) or change its formula/interval."""
        body = m.PoolEnableAutoScale(
            auto_scale_formula=formula, auto_scale_evaluation_interval=evaluation_interval
        )
        return self._c._call(_Call("POST", f"/pools/{_seg(name)}/enableautoscale", body))

    def disable_autoscale(self, name: str) -> Any:
        return self._c._call(_Call("POST", f"/pools/{_seg(name)}/disableautoscale"))

    def evaluate_autoscale(self, name: str, formula: str) -> Any:
        """Run `formula` on the pool's data without applying it -> AutoScaleRun {timestamp, results, error}."""
        body = m.PoolEvaluateAutoScale(auto_scale_formula=formula)
        return self._c._call(
            _Call(
                "POST", f"/pools/{_seg(name)}/evaluateautoscale", body, parse=_one(m.AutoScaleRun)
            )
        )


class Tvms(_Group):
    def list(self, pool: str) -> Any:
        return self._c._call(_Call("GET", f"/pools/{_seg(pool)}/tvms", parse=_list(m.Tvm)))

    def get(self, pool: str, tvm: str) -> Any:
        return self._c._call(
            _Call("GET", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}", parse=_one(m.Tvm))
        )

    def _op(self, pool: str, tvm: str, op: str, body: Any = None) -> Any:
        return self._c._call(_Call("POST", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/{op}", body))

    def reboot(self, pool: str, tvm: str, *, option: str = "requeue") -> Any:
        return self._op(pool, tvm, "reboot", m.TvmReboot(tvm_reboot_option=option))

    def reimage(self, pool: str, tvm: str, *, option: str = "requeue") -> Any:
        return self._op(pool, tvm, "reimage", m.TvmReimage(tvm_reimage_option=option))

    def disable_scheduling(self, pool: str, tvm: str, *, option: str = "requeue") -> Any:
        return self._op(
            pool,
            tvm,
            "disablescheduling",
            m.TvmDisableScheduling(tvm_disable_scheduling_option=option),
        )

    def enable_scheduling(self, pool: str, tvm: str) -> Any:
        return self._op(pool, tvm, "enablescheduling")

    def delete(self, pool: str, tvm: str, *, option: str = "requeue") -> Any:
        return self._c._call(
            _Call(
                "DELETE",
                f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}",
                params={"tvmDeallocationOption": option},
            )
        )


class Workitems(_Group):
    def add(
        self,
        name: str,
        pool: str | None,
        *,
        priority: int = 0,
        auto_pool: dict | None = None,
        **extra: Any,
    ) -> Any:
        """`pool`: an existing pool's name, or None with `auto_pool` (an autoPoolSpecification object)."""
        env = m.JobExecutionEnvironment(pool_name=pool, auto_pool_specification=auto_pool)
        spec = m.WorkitemAdd(name=name, job_execution_environment=env, priority=priority, **extra)
        return self._c._call(_Call("POST", "/workitems", spec, parse=_one(m.Workitem)))

    def list(self) -> Any:
        return self._c._call(_Call("GET", "/workitems", parse=_list(m.Workitem)))

    def get(self, name: str) -> Any:
        return self._c._call(_Call("GET", f"/workitems/{_seg(name)}", parse=_one(m.Workitem)))

    def delete(self, name: str) -> Any:
        return self._c._call(_Call("DELETE", f"/workitems/{_seg(name)}"))

    def update(
        self,
        name: str,
        *,
        priority: int | None = None,
        schedule: m.Schedule | None = None,
        job_constraints: m.JobConstraints | None = None,
        on_all_tasks_complete: str | None = None,
        max_parallel_tasks: int | None = None,
    ) -> Any:
        body = m.WorkitemUpdate(
            priority=priority,
            schedule=schedule,
            job_constraints=job_constraints,
            on_all_tasks_complete=on_all_tasks_complete,
            max_parallel_tasks=max_parallel_tasks,
        )
        return self._c._call(
            _Call("PATCH", f"/workitems/{_seg(name)}", body, parse=_one(m.Workitem))
        )

    def terminate(self, name: str) -> Any:
        return self._c._call(_Call("POST", f"/workitems/{_seg(name)}/terminate"))

    def disable(self, name: str) -> Any:
        return self._c._call(_Call("POST", f"/workitems/{_seg(name)}/disable"))

    def enable(self, name: str) -> Any:
        return self._c._call(_Call("POST", f"/workitems/{_seg(name)}/enable"))


class Jobs(_Group):
    def list(self, workitem: str) -> Any:
        return self._c._call(_Call("GET", f"/workitems/{_seg(workitem)}/jobs", parse=_list(m.Job)))

    def get(self, workitem: str, job: str) -> Any:
        return self._c._call(
            _Call("GET", f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}", parse=_one(m.Job))
        )

    def update(
        self,
        workitem: str,
        job: str,
        *,
        priority: int | None = None,
        job_constraints: m.JobConstraints | None = None,
        on_all_tasks_complete: str | None = None,
        max_parallel_tasks: int | None = None,
    ) -> Any:
        body = m.JobUpdate(
            priority=priority,
            job_constraints=job_constraints,
            on_all_tasks_complete=on_all_tasks_complete,
            max_parallel_tasks=max_parallel_tasks,
        )
        return self._c._call(
            _Call("PATCH", f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}", body, parse=_one(m.Job))
        )

    def terminate(self, workitem: str, job: str, *, reason: str | None = None) -> Any:
        return self._c._call(
            _Call(
                "POST",
                f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/terminate",
                m.JobTerminate(terminate_reason=reason),
            )
        )

    def disable(self, workitem: str, job: str, *, disable_tasks: str = "requeue") -> Any:
        return self._c._call(
            _Call(
                "POST",
                f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/disable",
                m.JobDisable(disable_tasks=disable_tasks),
            )
        )

    def enable(self, workitem: str, job: str) -> Any:
        return self._c._call(_Call("POST", f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/enable"))

    def delete(self, workitem: str, job: str) -> Any:
        return self._c._call(_Call("DELETE", f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}"))

    def prep_release_status(self, workitem: str, job: str) -> Any:
        """Where the job's preparation and release tasks ran: one `JobPrepReleaseStatus` per TVM."""
        return self._c._call(
            _Call(
                "GET",
                f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/jobpreparationandreleasetaskstatus",
                parse=_list(m.JobPrepReleaseStatus),
            )
        )

    def task_counts(self, workitem: str, job: str) -> Any:
        dec = msgspec.json.Decoder(dict[str, m.TaskCounts])
        return self._c._call(
            _Call(
                "GET",
                f"/workitems/{_seg(workitem)}/jobs/{_seg(job)}/taskcounts",
                parse=lambda r: dec.decode(r.content)["taskCounts"],
            )
        )


class Ops(_Group):
    """Operations: the cluster summary (`tvm status`) and the Prometheus metrics text."""

    def status(self) -> Any:
        return self._c._call(
            _Call("GET", "/ops/status", parse=lambda r: msgspec.json.decode(r.content))
        )

    def metrics(self) -> Any:
        return self._c._call(_Call("GET", "/metrics", parse=lambda r: r.text))


class Certificates(_Group):
    def add(
        self,
        thumbprint: str,
        data_b64: str,
        *,
        certificate_format: str = "pfx",
        password: str | None = None,
        thumbprint_algorithm: str = "sha1",
    ) -> Any:
        req = m.CertificateAdd(
            thumbprint=thumbprint,
            thumbprint_algorithm=thumbprint_algorithm,
            data=data_b64,
            certificate_format=certificate_format,
            password=password,
        )
        return self._c._call(_Call("POST", "/certificates", req, parse=_one(m.Certificate)))

    def list(self) -> Any:
        return self._c._call(_Call("GET", "/certificates", parse=_list(m.Certificate)))

    def get(self, thumbprint: str, thumbprint_algorithm: str = "sha1") -> Any:
        return self._c._call(
            _Call(
                "GET",
                f"/certificates/{_seg(thumbprint_algorithm)}-{_seg(thumbprint)}",
                parse=_one(m.Certificate),
            )
        )

    def delete(self, thumbprint: str, thumbprint_algorithm: str = "sha1") -> Any:
        return self._c._call(
            _Call("DELETE", f"/certificates/{_seg(thumbprint_algorithm)}-{_seg(thumbprint)}")
        )


class AccountKeys(_Group):
    def regenerate(self, key_name: str) -> Any:
        """key_name "primary" or "secondary"; returns both keys (the other one is unchanged)."""
        return self._c._call(
            _Call(
                "POST",
                "/account/regeneratekeys",
                m.RegenerateKey(key_name=key_name),
                parse=_one(m.AccountKeys),
            )
        )


class Agents(_Group):
    def revoke(self, agent_id: str) -> Any:
        return self._c._call(_Call("POST", f"/agents/{_seg(agent_id)}/revoke"))

    def create_token(self, *, expires_in: str | None = None, single_use: bool = False) -> Any:
        """A join token for agents that expires (ISO 8601 duration) and/or enrols one agent only;
        the answer's `token` is the only time the secret is shown."""
        return self._c._call(
            _Call(
                "POST",
                "/agenttokens",
                m.AgentTokenAdd(expires_in=expires_in, single_use=single_use),
                parse=_one(m.AgentToken),
            )
        )

    def list_tokens(self) -> Any:
        return self._c._call(_Call("GET", "/agenttokens", parse=_list(m.AgentToken)))

    def revoke_token(self, token_id: str) -> Any:
        return self._c._call(_Call("DELETE", f"/agenttokens/{_seg(token_id)}"))


class TvmUsers(_Group):
    def add(
        self,
        pool: str,
        tvm: str,
        name: str,
        ssh_public_key: str,
        *,
        expiry_time: str | None = None,
        is_admin: bool = False,
    ) -> Any:
        req = m.TvmUserAdd(
            name=name, ssh_public_key=ssh_public_key, expiry_time=expiry_time, is_admin=is_admin
        )
        return self._c._call(
            _Call("POST", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/users", req, parse=_one(m.TvmUser))
        )

    def list(self, pool: str, tvm: str) -> Any:
        return self._c._call(
            _Call("GET", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/users", parse=_list(m.TvmUser))
        )

    def delete(self, pool: str, tvm: str, name: str) -> Any:
        return self._c._call(
            _Call("DELETE", f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/users/{_seg(name)}")
        )

    def remote_login_settings(self, pool: str, tvm: str) -> Any:
        return self._c._call(
            _Call(
                "GET",
                f"/pools/{_seg(pool)}/tvms/{_seg(tvm)}/remoteloginsettings",
                parse=_one(m.RemoteLoginSettings),
            )
        )
