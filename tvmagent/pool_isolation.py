"""The agent's isolation duties for the TVM it backs: certificates, task users (leases and the pool's
group), the intra-pool port fence and remote-login users. One object the agent holds
(`Agent.isolation`); see tvmagent/isolation.py for the user scheme and tvmagent/ports.py for the fence.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import stat
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from protocol import messages as pm
from protocol.hostio import primary_ip

from . import _ipc_sweep, _keyrings, isolation, leftovers, nftowners
from ._uid_sweep import TmpWatch
from ._users import lookup_user
from .host_health import SHARED_GROUP_MODE, TASKS_GROUP_MODE
from .ports import NftError, PortGate, apply_nft, nft_available, remove_nft, render_nft_ruleset
from .sweeps import Sweeps

if TYPE_CHECKING:
    from .nodeusers import NodeUsers
    from .sandbox import ProcessSpec, Sandbox
    from .taskenv import TvmIdentity

log = logging.getLogger("tvm.agent")
POOL_GROUP_FILE = "pool-group"  # in the agent's root: the group to delete after a crash


class PoolIsolation:
    def __init__(
        self,
        root: str,
        agent_id: str,
        task_user: str | None,
        slot_users: isolation.SlotUsers | None,
        sandbox: Sandbox,
        current_tvm: Callable[[], TvmIdentity | None],
        nursery: Callable[[], trio.Nursery | None],
    ) -> None:
        self.root = root
        self.agent_id = agent_id
        self.task_user = task_user
        self.slot_users = slot_users
        self.sandbox = sandbox
        self._current_tvm = current_tvm
        self._nursery_of = nursery
        self.fence: object | None = None  # ports.PortGate or the nft table name
        self._swept = False  # the fence tables of ended agents were looked for (nftowners)
        self.node_users: NodeUsers | None = None  # set by the agent; removed with the TVM
        # The pool's member addresses: PoolMembers may be handled before the JoinPool setup reaches
        # the fence (separate Trio tasks), so they are kept here and used when the fence comes up.
        self._fence_members: list[str] = []
        self._fence_pool = (
            ""  # the pool _fence_members belong to ("": an older coordinator did not say)
        )
        # Membership changes are numbered in arrival order; nft updates run one at a time under
        # _fence_lock and each records the generation it rendered, so the newest list always lands last.
        self._fence_generation = 0
        self._fence_applied = -1
        self._fence_lock_obj: trio.Lock | None = None
        self._fence_range = (0, 0)
        self._gate_scope: trio.CancelScope | None = None
        self.ports_unfenced = (
            False  # degraded: neither nftables nor the user-space gate fences the ports
        )
        self.pool_bwrap = False  # the pool asked for bubblewrap (JoinPool.bubblewrap)
        # The group of this agent's current pool membership (certs/ and start/ are its) and its gid.
        self._pool_group = ""
        self._pool_gid: int | None = None
        # The start task's user, held while the TVM is in the pool: it owns start/, no task gets it.
        self._start_lease: isolation.SlotLease | None = None
        # Task users this agent keeps between tasks (flock held, swept): taking one is free, where
        # acquiring one looks users and groups up and may sweep a dead holder's leftovers.
        self._idle_leases: list[isolation.SlotLease] = []
        self.tmp_watch = TmpWatch()
        # One walk of the sweep roots for all the task users waiting to be swept at a moment.
        self._sweeps = Sweeps(lambda: not self.sandbox.caps.layout.usable, self.tmp_watch.refresh)

    @property
    def tvm(self) -> TvmIdentity | None:
        return self._current_tvm()

    @property
    def pool_gid(self) -> int | None:
        """The group of this membership's pool (None without task users)."""
        return self._pool_gid

    @property
    def pool_group(self) -> str:
        """Its name ("" without task users or a pool)."""
        return self._pool_group

    @property
    def _nursery(self) -> trio.Nursery | None:
        return self._nursery_of()

    def resource_file_mode(self) -> dict[str, int]:
        """With per-task users, resource files (root's hard links into the download cache) must be
        readable and executable by the task's uid: 0775 (the cache directory itself is 0700, so
        only a task's own directory leads to them)."""
        if self.slot_users is None:
            return {}
        cache_dir = os.path.join(self.root, "cache")
        if os.path.isdir(cache_dir) and os.stat(cache_dir).st_mode & 0o777 != 0o700:
            os.chmod(cache_dir, 0o700)
        return {"mode": 0o775}

    def bwrap_paths(self) -> dict[str, tuple[str, ...]]:
        """Inside bubblewrap a task sees its working directory, shared/ (writable) and the
        certificates and startup directory (read-only); never another task's directory."""
        if self.tvm is None:
            return {}
        return {
            "bwrap_writable": (self.tvm.shared_dir,),
            "bwrap_readonly": tuple(
                d for d in (self.tvm.certs_dir, self.tvm.start_dir) if os.path.isdir(d)
            ),
        }

    # ------------------------------------------------------------------ certificates

    async def install_certs(self, certs: list[pm.CertFile]) -> list[str]:
        """Install before the start task and any task (after `join_pool_group`: certs/ is the
        group's); one error line per certificate that failed. Errors name the thumbprint and the
        reason only (never the data or the password)."""
        assert self.tvm is not None
        if not certs:
            return []
        from .certs import CertSpec, install_certificates

        specs = [
            CertSpec(
                thumbprint=c.thumbprint,
                thumbprint_algorithm=c.thumbprint_algorithm,
                certificate_format=c.certificate_format,
                data=c.data,
                password=c.password or None,
            )
            for c in certs
        ]
        certs_dir = self.tvm.certs_dir
        try:
            results = await trio.to_thread.run_sync(
                install_certificates, certs_dir, specs, self.task_user
            )
            if self._pool_gid is not None:  # many task uids: the pool's read through its group
                await trio.to_thread.run_sync(
                    isolation.share_certs_with_group, certs_dir, self._pool_gid
                )
        except (OSError, ValueError) as exc:
            log.error("certificates could not be installed: %s", exc)
            return [f"sha1-{c.thumbprint}: {type(exc).__name__}: {exc}" for c in certs]
        errors = [f"sha1-{r.thumbprint}: {r.error}" for r in results if not r.ok]
        for e in errors:
            log.error("certificate install failed: %s", e)
        return errors

    # ------------------------------------------------------------------ task users

    async def join_pool_group(self) -> None:
        """The pool's group, which certs/, start/, shared/ and tasks/ belong to (OSError when it
        cannot be made)."""
        await trio.to_thread.run_sync(self._join_pool_group)

    def _join_pool_group(self) -> None:
        """(thread) Make this membership's group; give it certs/ and start/ (0750, owner root until
        the start task's user takes start/), shared/ and tasks/ (see `host_health.SHARED_GROUP_MODE`:
        a task of another TVM on the host may not even list them). The TVM's node users join it
        too. A group a crashed agent left is deleted first."""
        if self.slot_users is None or self.tvm is None:
            return
        t = self.tvm
        name = isolation.pool_group_name(self.agent_id, t.account, t.pool, t.tvm_name)
        stale = _read_small(os.path.join(self.root, POOL_GROUP_FILE))
        if stale and stale != name:
            self._drop_pool_group(stale)
        _write_small(
            os.path.join(self.root, POOL_GROUP_FILE), name
        )  # before it exists: never leaked
        self._record(name)  # likewise, for when the root is deleted with the agent dead
        self._pool_gid = isolation.ensure_group(name)
        self._pool_group = name
        for d, mode in (
            (t.certs_dir, 0o750),
            (t.start_dir, 0o750),
            (t.shared_dir, SHARED_GROUP_MODE),
            (os.path.join(self.root, "tasks"), TASKS_GROUP_MODE),
        ):
            os.makedirs(d, exist_ok=True)
            os.chown(d, 0, self._pool_gid)
            os.chmod(d, mode)
        if self.node_users is not None:
            self.node_users.ledger.join_group(name, t.tvm_name)

    def _drop_pool_group(self, name: str) -> None:
        _drop_group_and_note(self.root, name)

    def sweep_and_record(self) -> None:
        """(blocking, at start) Remove what agents of deleted roots left (`leftovers`), then record
        this agent with the group its root names (a killed run's, which its join deletes)."""
        if os.geteuid() != 0:
            return  # no pool group, and the records' directory is root's
        try:
            for what in leftovers.sweep():
                log.warning("removed %s: its agent ended without it and its root is gone", what)
        except OSError as exc:
            log.warning("cannot look for what agents of deleted roots left: %s", exc)
        self._record(_read_small(os.path.join(self.root, POOL_GROUP_FILE)))

    def _record(self, group: str) -> None:
        if os.geteuid() != 0:
            return
        try:
            leftovers.record(self.root, self.sandbox.caps.layout, self.sandbox.cgroup_prefix, group)
        except OSError as exc:  # only a sweep after a crash with the root deleted misses it
            log.warning("cannot record this agent in %s: %s", leftovers.RECORDS_DIR, exc)

    def forget_record(self, cgroups_left: list[str]) -> None:
        """The agent stops: nothing of it is left unless `cgroups_left` or its group note says so."""
        if os.geteuid() != 0 or cgroups_left:
            return
        if not os.path.exists(os.path.join(self.root, POOL_GROUP_FILE)):
            leftovers.forget(self.root)

    def as_lease_user(self, spec: ProcessSpec, lease: isolation.SlotLease) -> ProcessSpec:
        """The run's uid, its own group as primary, the pool's group as the only other one. The start
        task runs with the pool's group as primary, so what it leaves is the pool's to read."""
        if self._pool_gid is None:
            return spec.evolve(run_as=lease.user, uid=lease.uid, gid=lease.gid, groups=())
        if lease is self._start_lease:
            return spec.evolve(run_as=lease.user, uid=lease.uid, gid=self._pool_gid, groups=())
        return spec.evolve(
            run_as=lease.user, uid=lease.uid, gid=lease.gid, groups=(self._pool_gid,)
        )

    def lease_ready(self) -> bool:
        """A task user can be had without blocking (see `lease_now`)."""
        return self.slot_users is None or bool(self._idle_leases)

    def lease_now(
        self,
        directory: str,
        elevated: bool,
        mode: int,
        keep: bool = False,
        fresh: tuple[str, ...] = (),
    ) -> isolation.SlotLease | None:
        """(worker thread, or inline when `lease_ready()` and `fresh`) A task user for one run,
        owning `directory` (recursively: a retry's files too; only the `fresh` entries below it when
        it was just made). `keep`: the start task, whose user stays reserved (the same one on every
        retry and reboot) and whose directory belongs to the pool group: the pool's tasks read it,
        none writes."""
        if elevated:
            return None
        if self.slot_users is None:
            self._give_to_task_user(directory, fresh)
            return None
        reuse = keep and self._start_lease is not None
        if reuse:
            lease = self._start_lease
        elif not keep and self._idle_leases:
            lease = self._idle_leases.pop()
        else:
            lease = self.slot_users.acquire()
        assert lease is not None
        lease.tmp_base = self.tmp_watch.baseline()
        gid = self._pool_gid if keep and self._pool_gid is not None else lease.gid
        try:
            if fresh:
                os.lchown(directory, lease.uid, gid)
                for name in fresh:
                    os.lchown(os.path.join(directory, name), lease.uid, gid)
            else:
                isolation.chown_tree(directory, lease.uid, gid)
            os.chmod(directory, mode)
            if keep and os.path.isdir(os.path.join(directory, "wd")):
                os.chmod(
                    os.path.join(directory, "wd"), mode
                )  # its working dir: the pool's to read too
        except BaseException:
            if not reuse:
                self._park(lease)  # nothing ran as it
            raise
        if keep:
            self._start_lease = lease
        return lease

    def _give_to_task_user(self, directory: str, fresh: tuple[str, ...]) -> None:
        """`--task-user NAME` (one fixed user for every task): the task's directory is that user's,
        so the task can enter and write its working directory (the launcher enters it as the task's
        user, as the task itself would)."""
        if not self.task_user or os.geteuid() != 0:
            return
        ids = lookup_user(self.task_user)
        if ids is None or ids == (0, 0):
            return  # an unknown user fails the launch with its own message
        if fresh:
            os.lchown(directory, *ids)
            for name in fresh:
                os.lchown(os.path.join(directory, name), *ids)
        else:
            isolation.chown_tree(directory, *ids)

    def keep_lease(self, lease: isolation.SlotLease) -> None:
        """The start task's run is over; its user stays reserved (see `lease_now`)."""
        if lease is not self._start_lease:
            self._release_later(lease)

    async def return_lease(self, lease: isolation.SlotLease | None, directory: str) -> None:
        """The run is over (its process tree is dead): the next task given this uid must not read
        the directory, so its top goes back to root, 0700. One chown + chmod: on the event loop,
        a thread hop would cost more. What else the uid left is swept before it is free again."""
        if lease is None:
            return
        try:
            _hand_back(directory)
        finally:
            self._release_later(lease)

    def _release_later(self, lease: isolation.SlotLease) -> None:
        try:
            if self._nursery is None:
                raise RuntimeError("no nursery")
            if (
                self.slot_users is not None
                and self.sandbox.caps.layout.usable  # else its leftover processes must be killed
                and self.tmp_watch.unchanged(lease.tmp_base)
                and not _ipc_sweep.owned(lease.uid)  # no directory shows those
                and not _keyrings.used(lease.uid)  # nor these
            ):
                self._park(lease)  # nothing to sweep: no Trio task, no thread
                return
            self._nursery.start_soon(self._sweep_and_release, lease, True)
        except RuntimeError:  # not running, or shutting down
            lease.release()  # stays "dirty": the next holder sweeps

    def _park(self, lease: isolation.SlotLease) -> None:
        """Keep a swept task user for the next task (its lock file still says "dirty": should the
        agent die while a task runs as it, the next holder sweeps)."""
        if self.slot_users is not None and lease is not self._start_lease:
            self._idle_leases.append(lease)
        else:
            lease.release()

    def _release_idle_leases(self) -> None:
        leases, self._idle_leases = self._idle_leases, []
        for lease in leases:
            lease.release(clean=True)

    async def _sweep_and_release(self, lease: isolation.SlotLease, park: bool = False) -> None:
        """Remove what the uid left in /tmp, /dev/shm...; kill its processes where no cgroup held
        the tree (a cgroup's tree is gone by now, and a task cannot leave its cgroup). `park`: keep
        the user for the next task instead of releasing it (`_release_later` has parked the ones
        with nothing to sweep already)."""
        clean = False
        try:
            with trio.CancelScope(shield=True):
                await self._sweeps.sweep(lease)
            clean = True
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("leftovers of task user %s not removed: %s", lease.user, exc)
        finally:
            if clean and park:
                self._park(lease)
            else:
                lease.release(clean=clean)

    def drop_pool_group_at_exit(self) -> None:
        """The agent stops: its group goes (a restarted agent makes it again when it rejoins), so
        an agent whose root is then deleted leaves no group behind. Its task processes are gone.
        Its nftables table too: nothing listens on those ports any more, and a TVM given the block
        next must admit its own members."""
        self._release_idle_leases()
        name, self._pool_group, self._pool_gid = self._pool_group, "", None
        if name:
            self._drop_pool_group(name)
        fence, self.fence = self.fence, None
        if isinstance(fence, str):
            _remove_table(fence)

    async def _leave_pool_group(self) -> None:
        """The TVM leaves the pool: the start task's user is swept and freed, the group deleted."""
        lease, self._start_lease = self._start_lease, None
        if lease is not None:
            await self._sweep_and_release(lease)
        self._release_idle_leases()
        name, self._pool_group, self._pool_gid = self._pool_group, "", None
        if name:
            await trio.to_thread.run_sync(self._drop_pool_group, name)

    # ------------------------------------------------------------------ port fence

    def describe_ports(self) -> list[str]:
        """At start: how a communicating pool's port block will be fenced here."""
        if os.geteuid() == 0 and nft_available():
            return ["nftables available: a communicating pool's ports admit pool members only"]
        listen = _gate_address()
        try:
            usable = not ipaddress.ip_address(listen).is_loopback
        except ValueError:
            usable = False
        if usable:
            return [
                f"nftables unavailable: a user-space gate on {listen} fences pool ports "
                "(tasks must bind 127.0.0.1)"
            ]
        return [
            "DEGRADED: ports unfenced: nftables unavailable and no non-loopback address for the "
            "user-space gate (set TVM_AGENT_IP)"
        ]

    def _nft_table(self) -> str:
        return "tvm_" + hashlib.sha256(self.agent_id.encode()).hexdigest()[:16]

    def _fence_lock(self) -> trio.Lock:
        if self._fence_lock_obj is None:
            self._fence_lock_obj = trio.Lock()
        return self._fence_lock_obj

    async def setup_fence(self, msg: pm.JoinPool) -> None:
        await self._teardown_fence()
        self.ports_unfenced = False
        if not msg.port_range_low:
            return
        self._fence_range = (msg.port_range_low, msg.port_range_high)
        if os.geteuid() == 0 and await trio.to_thread.run_sync(nft_available):
            table = self._nft_table()
            await trio.to_thread.run_sync(self._claim_table, table)
            self.fence = table
            if await self._sync_fence(force=True):
                log.info(
                    "ports %d-%d: nftables table %s admits pool members only",
                    *self._fence_range,
                    self.fence,
                )
                return
            await self._teardown_fence()  # nft refused: the gate below still closes the range
        # Fail closed: without nftables the gate listens on the address the coordinator gives the
        # pool as ours (TVM_AGENT_IP, else the primary address), so outsiders meet the gate.
        listen = _gate_address()
        try:
            gate = PortGate(
                range(msg.port_range_low, msg.port_range_high + 1),
                self._current_members(),
                listen_host=listen,
            )
            if self._nursery is None:
                raise OSError("the agent is not running")
            await self._nursery.start(self._run_gate, gate)
        except (OSError, ValueError) as exc:
            self.ports_unfenced = True
            log.warning(
                "DEGRADED: ports unfenced: ports %d-%d admit anyone (nftables unavailable, user-space "
                "gate on %s impossible: %s)",
                *self._fence_range,
                listen,
                exc,
            )
            return
        self.fence = gate
        gate.update_members(self._current_members())  # lists that arrived while it was binding
        log.info(
            "ports %d-%d: nftables unavailable; user-space gate on %s admits pool members only "
            "(tasks bind 127.0.0.1)",
            *self._fence_range,
            listen,
        )

    async def _run_gate(self, gate: PortGate, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._gate_scope = scope
            await gate.serve(task_status=task_status)

    async def _sync_fence(self, force: bool = False) -> bool:
        """Bring the nft table to the newest member list (one update at a time); False if nft refused."""
        async with self._fence_lock():
            if not isinstance(self.fence, str) or (
                self._fence_applied == self._fence_generation and not force
            ):
                return True
            generation = self._fence_generation
            members = self._current_members()
            v4 = [a for a in members if ":" not in a]
            v6 = [a for a in members if ":" in a]
            ruleset = render_nft_ruleset(self.fence, *self._fence_range, v4, v6)
            try:
                await trio.to_thread.run_sync(apply_nft, ruleset)
            except NftError as exc:
                log.error("cannot update the port fence: %s", exc)
                return False
            self._fence_applied = generation
            return True

    def _current_members(self) -> list[str]:
        """The newest list, if it is for the pool this TVM is in now (else closed: nobody)."""
        if self._fence_pool and (self.tvm is None or self._fence_pool != self.tvm.pool):
            return []
        return self._fence_members

    def on_pool_members(self, addresses: list[str], pool: str = "") -> None:
        """A PoolMembers message, handled in arrival order (not in a Trio task of its own: their
        start order is not the message order, and a stale list could land last)."""
        good = []
        for a in addresses:
            try:
                ipaddress.ip_address(a)
                good.append(a)
            except ValueError:
                log.warning("ignoring pool member %r: not an IP address", a)
        self._fence_members = good
        self._fence_pool = pool
        self._fence_generation += 1
        if isinstance(self.fence, PortGate):
            self.fence.update_members(self._current_members())
        elif isinstance(self.fence, str) and self._nursery is not None:
            self._nursery.start_soon(self._sync_fence)

    def _claim_table(self, table: str) -> None:
        """(worker thread) Remove the fence tables of agents that died without removing theirs
        (once per agent), and record this agent as the owner of `table`."""
        if not self._swept:
            self._swept = True
            try:
                for gone in nftowners.sweep():
                    log.warning("removed nftables table %s: its agent ended without it", gone)
            except (OSError, NftError) as exc:
                log.warning("cannot look for the fence tables of ended agents: %s", exc)
        try:
            nftowners.record_owner(table)
        except OSError as exc:  # the fence still works; only a sweep after a crash misses it
            log.warning(
                "cannot record this agent as the owner of nftables table %s: %s", table, exc
            )

    async def _teardown_fence(self) -> None:
        fence, self.fence = self.fence, None
        if isinstance(fence, str):
            async with self._fence_lock():  # not under an update still running
                await trio.to_thread.run_sync(_remove_table, fence)
        elif isinstance(fence, PortGate) and self._gate_scope is not None:
            self._gate_scope.cancel()

    async def teardown(self) -> None:
        with trio.CancelScope(shield=True):
            await self._leave_pool_group()
            await self._teardown_fence()
            # _fence_members stay: a PoolMembers for the next pool may already have arrived
            # (setup_fence drops a list that belongs to another pool).
            if self.node_users is not None:
                await self.node_users.remove_all()


def _drop_group_and_note(root: str, name: str) -> None:
    """(blocking) Delete pool group `name`, then the note in `root` that names it (kept if the
    group could not be deleted: the next try finds it). The directories the group was given go
    back to root first: a gid left on them would let the next group given that number in."""
    _hand_back_group_dirs(root)
    try:
        isolation.remove_group(name)
    except (OSError, ValueError) as exc:
        log.warning("pool group %s not removed: %s", name, exc)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(root, POOL_GROUP_FILE))


def drop_noted_pool_group(root: str) -> None:
    """(blocking) The pool group noted in an agent's `root` that the agent could not delete
    itself (killed outright), for whoever removes what it left; only a name of ours is deleted."""
    name = _read_small(os.path.join(root, POOL_GROUP_FILE))
    if name.startswith(isolation.POOL_GROUP_PREFIX):
        _drop_group_and_note(root, name)


def _remove_table(table: str) -> None:
    """(blocking) The agent's nftables table and the record that it owns it."""
    try:
        remove_nft(table)
        nftowners.forget_owner(table)
    except (NftError, OSError) as exc:
        log.warning("cannot remove nftables table %s: %s", table, exc)


def _gate_address() -> str:
    """The address the coordinator publishes for this agent (see metrics.host_facts)."""
    return os.environ.get("TVM_AGENT_IP") or primary_ip()


def _hand_back_group_dirs(root: str) -> None:
    for name, mode in (
        ("certs", 0o700),
        ("start", 0o700),
        ("shared", SHARED_GROUP_MODE),
        ("tasks", TASKS_GROUP_MODE),
    ):
        path = os.path.join(root, name)
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and st.st_gid != 0:
                os.lchown(path, 0, 0)
                os.chmod(path, mode)
        except FileNotFoundError:
            pass


def _hand_back(directory: str) -> None:
    try:
        os.chown(directory, 0, 0)
        os.chmod(directory, 0o700)
    except FileNotFoundError:
        pass  # deleted meanwhile (DeleteTaskFiles)


def _read_small(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def _write_small(path: str, value: str) -> None:
    fd = os.open(
        path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.replace(path + ".tmp", path)
