"""Pools: creating, resizing, stopping a resize, removing TVMs, deleting, and auto pools.

The TVMs themselves come and go through `membership` (allocation towards the pool's target).
"""

from __future__ import annotations

import secrets

import msgspec

from coordinator.common import models as m
from coordinator.common.errors import ApiError, bad_request, conflict, not_found
from coordinator.common.timeutil import parse_duration
from coordinator.common.validation import check_env, check_name, check_range

from .autoscale_rules import check_autoscale_spec
from .certs import Certs
from .instructions import Outbox
from .membership import Membership
from .pool_limits import check_pool_limits
from .records import PoolRec, Tvm, WorkitemRec
from .specs import check_files
from .states import move_alloc, move_pool
from .store import Store

DEALLOCATION_OPTIONS = ("requeue", "terminate", "taskcompletion")
MAX_REMOVE = 100

# (spec without name, resize timeout, lifetime, keepAlive) of a checked autoPoolSpecification
AutoPool = tuple[m.PoolAdd, float, str, bool]


def check_option(option: str, field: str) -> str:
    value = (option or "requeue").lower()
    if value not in DEALLOCATION_OPTIONS:
        raise bad_request(
            "InvalidPropertyValue",
            f"{field} must be requeue, terminate or taskcompletion, got {option!r}",
            field=field,
        )
    return value


class Pools:
    def __init__(self, store: Store, out: Outbox, certs: Certs, membership: Membership) -> None:
        self.s = store
        self.out = out
        self.certs = certs
        self.membership = membership

    # ------------------------------------------------------------------ pools

    def check_pool_spec(self, req: m.PoolAdd, prefix: str = "") -> tuple[m.PoolAdd, float]:
        """Validate a pool spec (user pool or auto pool); returns the normalised spec and resize timeout."""
        req = check_autoscale_spec(self.s.autoscale_timing, req, prefix)
        sizes = self.s.vm_sizes()
        size = sizes.get(req.vm_size.lower())
        if size is None:
            raise bad_request(
                "InvalidVmSize",
                f"unknown {prefix}vmSize {req.vm_size!r}; known sizes: " + ", ".join(sizes),
                field=prefix + "vmSize",
            )
        check_range(req.target_dedicated, 0, self.s.max_pool_size, prefix + "targetDedicated")
        if req.max_tasks_per_vm < 1 or req.max_tasks_per_vm > 4 * size[0]:
            raise bad_request(
                "InvalidPropertyValue",
                f"{prefix}maxTasksPerVM must be between 1 and {4 * size[0]} (4 x the {size[0]} "
                f"core(s) of vmSize {req.vm_size!r}), got {req.max_tasks_per_vm}",
                field=prefix + "maxTasksPerVM",
            )
        if req.tvm_fill_type.lower() not in ("pack", "spread"):
            raise bad_request(
                "InvalidPropertyValue",
                f"{prefix}tvmFillType must be 'pack' or 'spread'",
                field=prefix + "tvmFillType",
            )
        timeout = (
            parse_duration(req.resize_timeout, prefix + "resizeTimeout")
            if req.resize_timeout
            else 900.0
        )
        if req.start_task is not None:
            if not req.start_task.command_line.strip():
                raise bad_request(
                    "MissingRequiredProperty",
                    f"{prefix}startTask.commandLine must not be empty",
                    field=prefix + "startTask.commandLine",
                )
            check_env(req.start_task.environment_settings, prefix + "startTask.environmentSettings")
            check_files(req.start_task.resource_files, prefix + "startTask.resourceFiles")
            check_range(
                req.start_task.max_task_retry_count,
                -1,
                1000,
                prefix + "startTask.maxTaskRetryCount",
            )
        check_pool_limits(req, prefix)
        cert_refs = self.certs.check_references(req.certificate_references, prefix)
        spec = msgspec.structs.replace(
            req,
            tvm_fill_type=req.tvm_fill_type.lower(),
            vm_size=req.vm_size.lower(),
            certificate_references=cert_refs,
        )
        return spec, timeout

    def add_pool(self, req: m.PoolAdd) -> None:
        check_name(req.name)
        if req.name.lower() in (n.lower() for n in self.s.pools):
            raise conflict("pool", req.name)
        spec, timeout = self.check_pool_spec(req)
        made = sum(1 for p in self.s.pools.values() if not p.auto_owner)
        if made >= self.s.max_pools:
            raise ApiError(
                409,
                "PoolQuotaReached",
                f"the account has {made:,} pools, the most this coordinator allows "
                f"({self.s.max_pools:,}: max-pools in its configuration; auto pools are not "
                "counted). Delete a pool or raise the limit.",
                limit=self.s.max_pools,
            )
        self._create_pool(spec, timeout)

    def _create_pool(
        self,
        spec: m.PoolAdd,
        timeout: float,
        auto_owner: str = "",
        auto_lifetime: str = "",
        keep_alive: bool = False,
    ) -> PoolRec:
        now = self.s.clock()
        rec = PoolRec(
            spec=spec,
            created=now,
            target=spec.target_dedicated,
            resize_timeout_s=timeout,
            state_time=now,
            alloc_time=now,
            auto_owner=auto_owner,
            auto_lifetime=auto_lifetime,
            keep_alive=keep_alive,
        )
        self.s.pools[spec.name] = rec
        self.out.put("pool", spec.name, rec)
        self.membership.allocate()
        return rec

    def active_pool(self, name: str) -> PoolRec:
        pool = self.s.get_pool(name)
        if pool.state == "deleting":
            raise ApiError(409, "PoolBeingDeleted", f"pool {name!r} is being deleted", name=name)
        return pool

    def delete_pool(self, name: str) -> None:
        """Stop any resize, remove every TVM with requeue, then drop the pool (reference §2.1)."""
        pool = self.s.get_pool(name)
        if pool.state == "deleting":
            return  # repeated delete: already under way
        now = self.s.clock()
        move_pool(pool, "deleting")
        pool.state_time = now
        pool.target = 0
        move_alloc(pool, "steady")
        pool.resize_started = None
        self.out.put("pool", name, pool)
        for tvm in [t for t in self.s.tvms.values() if t.rec.pool == name]:
            self.membership.begin_leave(tvm, "requeue", "pool deleted")
        self.membership.finish_pool_delete(name)

    def resize_pool(self, name: str, req: m.PoolResize) -> None:
        pool = self.active_pool(name)
        if pool.spec.enable_auto_scale:
            raise ApiError(
                409,
                "AutoScaleEnabled",
                f"pool {name!r} has autoscale enabled; disable it to resize",
            )
        if pool.alloc_state != "steady":
            raise ApiError(
                409,
                "PoolBeingResized",
                f"pool {name!r} is {pool.alloc_state}; resize it again when "
                "it is steady (or stop the resize first)",
            )
        check_range(req.target_dedicated, 0, self.s.max_pool_size, "targetDedicated")
        option = check_option(req.tvm_deallocation_option, "tvmDeallocationOption")
        timeout = (
            parse_duration(req.resize_timeout, "resizeTimeout") if req.resize_timeout else None
        )
        if timeout is not None:
            pool.resize_timeout_s = timeout
        pool.target = req.target_dedicated
        pool.shrink_option = option
        pool.resize_error = None
        self.out.put("pool", name, pool)
        self.membership.allocate()

    def stop_resize(self, name: str) -> None:
        """Keep whatever TVMs exist now (no rollback); the pool goes steady."""
        pool = self.active_pool(name)
        if pool.alloc_state != "resizing":
            raise ApiError(
                409, "PoolNotResizing", f"pool {name!r} is {pool.alloc_state}, not resizing"
            )
        now = self.s.clock()
        pool.target = len(self.s.members(name))
        move_alloc(pool, "stopping")
        pool.alloc_time = now
        pool.resize_started = None
        pool.resize_error = ("ResizeStopped", "The resize was stopped by the user")
        self.out.put("pool", name, pool)
        self.membership.allocate()

    def remove_tvms(self, name: str, req: m.TvmRemove) -> None:
        pool = self.active_pool(name)
        if pool.alloc_state != "steady":
            raise ApiError(
                409,
                "PoolBeingResized",
                f"pool {name!r} is {pool.alloc_state}; remove TVMs when it is steady",
            )
        if not req.tvm_names:
            raise bad_request(
                "MissingRequiredProperty", "tvmNames must name at least one TVM", field="tvmNames"
            )
        if len(req.tvm_names) > MAX_REMOVE:
            raise bad_request(
                "TooManyTvms",
                f"at most {MAX_REMOVE} TVMs per call, got {len(req.tvm_names)}",
                field="tvmNames",
            )
        option = check_option(req.tvm_deallocation_option, "tvmDeallocationOption")
        timeout = (
            parse_duration(req.resize_timeout, "resizeTimeout") if req.resize_timeout else None
        )
        victims: list[Tvm] = []
        for tvm_name in dict.fromkeys(req.tvm_names):
            tvm = self.s.tvms.get(tvm_name)
            if tvm is None:
                raise not_found("tvm", tvm_name)
            if tvm.rec.pool != name:
                raise bad_request(
                    "TVMNotInPool",
                    f"TVM {tvm_name!r} belongs to pool {tvm.rec.pool!r}, not {name!r}",
                    field="tvmNames",
                    name=tvm_name,
                )
            if tvm.rec.pending_op in ("leave", "leaving"):
                raise ApiError(
                    409,
                    "TVMLeavingPool",
                    f"TVM {tvm_name!r} is already leaving the pool",
                    name=tvm_name,
                )
            victims.append(tvm)
        if timeout is not None:
            pool.resize_timeout_s = timeout
        pool.target = max(0, len(self.s.members(name)) - len(victims))
        pool.resize_error = None
        self.out.put("pool", name, pool)
        for tvm in victims:
            self.membership.begin_leave(tvm, option, "removed from the pool")
        self.membership.allocate()

    def update_pool(self, name: str, spec: m.PoolAdd) -> None:
        """Replace the pool's spec (start task, metadata, the Azure properties); the caller changes
        only what may change after creation. Start-task changes reach TVMs that join or restart."""
        pool = self.active_pool(name)
        checked, _ = self.check_pool_spec(msgspec.structs.replace(spec, name=name))
        pool.spec = msgspec.structs.replace(checked, target_dedicated=pool.spec.target_dedicated)
        self.out.put("pool", name, pool)

    def expire_resizes(self, now: float) -> None:
        """Resizes that ran past their timeout stop where they are (called by the tick)."""
        for name, pool in self.s.pools.items():
            if (
                pool.alloc_state == "resizing"
                and pool.resize_started is not None
                and now - pool.resize_started >= pool.resize_timeout_s
            ):
                move_alloc(pool, "steady")
                pool.alloc_time = now
                pool.resize_started = None
                pool.resize_error = (
                    "AllocationTimedout",
                    "Desired number of dedicated TVMs could not be allocated in time",
                )
                self.out.put("pool", name, pool)

    def provision_failed(self, name: str, code: str, message: str) -> None:
        """The pool's provisioner could not start what the pool lacks (a host unreachable, a paused
        Slurm queue): the resize stops where it is, with the reason in the pool's resize error."""
        pool = self.s.pools.get(name)
        if pool is None or pool.state != "active" or pool.resize_error == (code, message):
            return
        now = self.s.clock()
        pool.resize_error = (code, message)
        if pool.alloc_state == "resizing":
            move_alloc(pool, "steady")
            pool.alloc_time = now
            pool.resize_started = None
        self.out.put("pool", name, pool)

    # ------------------------------------------------------------------ auto pools

    def check_auto_pool(self, env: m.JobExecutionEnvironment) -> AutoPool:
        """Validate jobExecutionEnvironment.autoPoolSpecification; returns (spec without name, timeout,
        lifetime, keepAlive). The pool itself is made by `_ensure_auto_pool` once validation passed."""
        field = "jobExecutionEnvironment.autoPoolSpecification"
        spec = env.auto_pool_specification
        if env.pool_name:
            raise bad_request(
                "InvalidPropertyValue",
                f"give jobExecutionEnvironment.poolName or {field}, not both",
                field=field,
            )
        if not isinstance(spec, dict):
            raise bad_request("InvalidPropertyValue", f"{field} must be an object", field=field)
        unknown = set(spec) - {"poolLifetimeOption", "keepAlive", "pool", "autoPoolNamePrefix"}
        if unknown:
            raise bad_request(
                "InvalidPropertyValue",
                f"{field} has unknown field(s): {', '.join(sorted(unknown))}",
                field=field,
            )
        lifetime = spec.get("poolLifetimeOption")
        if lifetime not in ("job", "workitem"):
            raise bad_request(
                "InvalidPropertyValue",
                f"{field}.poolLifetimeOption must be 'job' or 'workitem'",
                field=field + ".poolLifetimeOption",
            )
        keep = spec.get("keepAlive", False)
        if not isinstance(keep, bool):
            raise bad_request(
                "InvalidPropertyValue",
                f"{field}.keepAlive must be true or false",
                field=field + ".keepAlive",
            )
        prefix = spec.get("autoPoolNamePrefix", "")
        if prefix:
            check_name(prefix, field + ".autoPoolNamePrefix")
            if len(prefix) > 40:
                raise bad_request(
                    "InvalidPropertyValue",
                    f"{field}.autoPoolNamePrefix is longer than 40 characters",
                    field=field + ".autoPoolNamePrefix",
                )
        body = spec.get("pool")
        if not isinstance(body, dict):
            raise bad_request(
                "MissingRequiredProperty",
                f"{field}.pool (the pool's properties) is required",
                field=field + ".pool",
            )
        if "name" in body:
            raise bad_request(
                "InvalidPropertyValue",
                f"{field}.pool must not have a name: the service names it",
                field=field + ".pool.name",
            )
        try:
            req = msgspec.convert({**body, "name": prefix or "auto"}, m.PoolAdd)
        except msgspec.ValidationError as exc:
            raise bad_request(
                "InvalidPropertyValue", f"{field}.pool: {exc}", field=field + ".pool"
            ) from None
        checked, timeout = self.check_pool_spec(req, field + ".pool.")
        return checked, timeout, lifetime, keep

    def _ensure_auto_pool(self, checked: AutoPool, workitem: str, job: str) -> str:
        """Create (or, for lifetime 'workitem', reuse) the auto pool of a new job; returns its name."""
        spec, timeout, lifetime, keep = checked
        owner = workitem if lifetime == "workitem" else f"{workitem}/{job}"
        for name, pool in self.s.pools.items():
            if pool.auto_owner == owner and pool.state == "active":
                return name
        prefix = spec.name if spec.name != "auto" else "auto"
        name = f"{prefix}-{secrets.token_hex(6)}"
        self._create_pool(
            msgspec.structs.replace(spec, name=name),
            timeout,
            auto_owner=owner,
            auto_lifetime=lifetime,
            keep_alive=keep,
        )
        return name

    def job_pool(self, wi: WorkitemRec, job_name: str) -> str:
        """The pool a new job of workitem `wi` runs on: its poolName, or its auto pool (made here)."""
        env = wi.spec.job_execution_environment
        if env.auto_pool_specification is None:
            return env.pool_name or ""
        try:
            checked = self.check_auto_pool(env)
        except ApiError:
            # Validated when the workitem was added; a later job (schedule) may meet a changed catalogue
            # (an agent's native size gone). Never fail inside a tick: take the spec as it is.
            spec = env.auto_pool_specification
            req = msgspec.convert(
                {**spec["pool"], "name": spec.get("autoPoolNamePrefix") or "auto"}, m.PoolAdd
            )
            checked = (req, 900.0, spec["poolLifetimeOption"], bool(spec.get("keepAlive", False)))
        return self._ensure_auto_pool(checked, wi.spec.name, job_name)

    def release_auto_pools(self) -> list[str]:
        """Delete auto pools whose job or workitem has ended (unless keepAlive); returns their names."""
        released = []
        for name, pool in list(self.s.pools.items()):
            if not pool.auto_owner or pool.keep_alive or pool.state != "active":
                continue
            if pool.auto_lifetime == "job":
                job = self.s.jobs.get(pool.auto_owner)
                ended = job is None or job.rec.state in ("completed", "deleting")
            else:
                wi = self.s.workitems.get(pool.auto_owner)
                ended = wi is None or wi.state in ("completed", "deleting")
            if ended:
                self.delete_pool(name)
                released.append(name)
        return released
