"""Provisioners chosen per pool. The hub stands where the coordinator expects one provisioner
(`service.provisioner`): pools whose metadata names a configured provisioner (or all pools, with
`[provisioner] default`) are filled by that plugin, the others by the fallback (the local
provisioner of `tvm up`, or none).

A plugin is blocking code behind `start(n, size) -> names` / `stop(name)` (run in worker threads,
one call at a time per plugin), plus:
  `take_problems() -> [(code, message)]`  what went wrong since the last call (a host unreachable)
  `poll() -> [(name, why)]`                agents whose backing ended (a Slurm job finished)
  `paused -> str`, `resume()`             a plugin that stopped trying, and why
  `adopt(name) -> bool`                    take back an agent it started before a restart
  `idle_stop_after`, `register_timeout`   seconds
The hub's loop, per plugin, every POLL_S or when the core asks: counts how many agents the plugin's
pools lack beyond those on their way (started, not yet registered) and those free, starts the rest,
reports failures as the pools' resize errors, and stops agents that stay free while no pool of the
plugin needs them (shrink). Agents are named by their plugin; the agent id is that name.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Protocol

import trio

from .config import POOL_METADATA_KEY

if TYPE_CHECKING:
    from coordinator.core.records import PoolRec

    from ..service import CoordinatorService

log = logging.getLogger("tvm.coordinator")

POLL_S = 1.0
# an agent of a plugin disconnected this long is given up (stopped, wiped, forgotten)
LOST_AFTER_S = 300.0


class Plugin(Protocol):
    name: str
    idle_stop_after: float
    register_timeout: float | None
    joined: set[
        str
    ]  # agents that registered (the hub tells; a Slurm job that ends later is no failure)
    size_cores: dict[str, int]  # VM size -> cores (the hub tells)

    @property
    def paused(self) -> str: ...
    def start(self, n: int, size: str) -> list[str]: ...
    def stop(self, name: str) -> None: ...
    def stop_all(self) -> None: ...
    def poll(self) -> list[tuple[str, str]]: ...
    def take_problems(self) -> list[tuple[str, str]]: ...
    def resume(self) -> None: ...
    def adopt(self, name: str) -> bool: ...


def pool_provisioner(pool: PoolRec, default: str) -> str:
    for item in pool.spec.metadata or ():
        if item.name == POOL_METADATA_KEY:
            return item.value
    return default


class ProvisionerHub:
    def __init__(
        self,
        service: CoordinatorService,
        plugins: dict[str, Plugin],
        default: str = "",
        fallback: Any = None,
    ) -> None:
        self.service = service
        self.plugins = plugins
        self.default = default
        self.fallback = fallback
        self._wake = {name: trio.Event() for name in plugins}
        self._started: dict[str, dict[str, float]] = {name: {} for name in plugins}
        self._idle: dict[str, float] = {}
        self._retiring: dict[str, list[str]] = {name: [] for name in plugins}
        self.lost_after = LOST_AFTER_S
        # the core keeps each plugin's agents for the pools that name it (and only for them)
        service.core.store.provisioner_names = frozenset(plugins)
        service.core.store.default_provisioner = default

    # ------------------------------------------------------------------ what the service calls

    def start(self, n: int, size: str = "small") -> list[str]:
        """Agents not for any pool in particular (`tvm up --agents N`): the fallback's."""
        return self.fallback.start(n, size) if self.fallback is not None else []

    def start_pool(self, pool: str, n: int, size: str) -> list[str]:
        rec = self.service.core.pools.get(pool)
        name = pool_provisioner(rec, self.default) if rec is not None else self.default
        if not name:
            return self.fallback.start(n, size) if self.fallback is not None else []
        if name not in self.plugins:
            self._failed(
                pool,
                "UnknownProvisioner",
                f"the pool's metadata names provisioner {name!r}, which the coordinator's"
                f" configuration does not define (defined: {', '.join(sorted(self.plugins)) or 'none'})",
            )
            return []
        self._wake[name].set()  # its loop counts what is missing and starts it
        return []

    def exited(self) -> list[tuple[str, str]]:
        exited = getattr(self.fallback, "exited", None)
        return exited() if exited is not None else []

    def stop(self, name: str) -> None:
        for pname, started in self._started.items():
            if name in started:
                self.plugins[pname].stop(name)
                return
        if self.fallback is not None:
            self.fallback.stop(name)

    def retire(self, name: str, reason: str) -> None:
        """A retired agent (core/healing.py): its plugin stops it from its loop (stopping blocks),
        as on shrink; the fallback's agents are the fallback's to stop."""
        for pname, started in self._started.items():
            if started.pop(name, None) is not None:
                self._idle.pop(name, None)
                self._retiring[pname].append(name)
                self._wake[pname].set()
                return
        retire = getattr(self.fallback, "retire", None)
        if retire is not None:
            retire(name, reason)

    def stop_all(self) -> None:
        if self.fallback is not None:
            self.fallback.stop_all()
        for plugin in self.plugins.values():
            try:
                plugin.stop_all()
            except Exception:  # one broken plugin must not leave the others' agents running
                log.exception("provisioner %s failed to stop its agents", plugin.name)

    # ------------------------------------------------------------------ loops

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for name in self.plugins:
                nursery.start_soon(self._loop, name)
            nursery.start_soon(self._unknown_names)

    async def _unknown_names(self) -> None:
        """Pools naming a provisioner nobody defined (the core's request for them may be folded
        into an earlier one): their resize says so."""
        while True:
            await trio.sleep(POLL_S)
            core = self.service.core
            for pool in list(core.pools.values()):
                name = pool_provisioner(pool, self.default)
                if (
                    name
                    and name not in self.plugins
                    and pool.state == "active"
                    and pool.resize_error is None
                    and pool.target > len(core.store.members(pool.spec.name))
                ):
                    self.start_pool(pool.spec.name, 0, pool.spec.vm_size)

    async def _loop(self, pname: str) -> None:
        while True:
            with trio.move_on_after(POLL_S):
                await self._wake[pname].wait()
            self._wake[pname] = trio.Event()
            try:
                await self._round(pname)
            except Exception:  # a broken plugin must not take the coordinator down
                log.exception("provisioner %s failed", pname)
            self._dispatch()

    def _dispatch(self) -> None:
        core = self.service.core
        core.schedule()
        self.service._dispatch(core.take_effects())

    def _failed(self, pool: str, code: str, message: str) -> None:
        rec = self.service.core.pools.get(pool)
        if rec is not None and rec.resize_error != (code, message):
            log.warning("pool %s: %s: %s", pool, code, message)
        self.service.core.provision_failed(pool, code, message)
        self._dispatch()

    async def _round(self, pname: str) -> None:
        plugin = self.plugins[pname]
        core = self.service.core
        started = self._started[pname]
        now = time.monotonic()
        retiring, self._retiring[pname] = self._retiring[pname], []
        for name in retiring:
            log.info("provisioner %s: stopping retired agent %s", pname, name)
            await trio.to_thread.run_sync(plugin.stop, name)
        for name, why in await trio.to_thread.run_sync(plugin.poll):
            started.pop(name, None)
            self._idle.pop(name, None)
            if name in core.agents:
                log.warning("agent %s: %s", name, why)
                core.agent_exited(name, why)
                core.forget_agent(name)
        pools = sorted(
            (
                p
                for p in core.pools.values()
                if p.state == "active" and pool_provisioner(p, self.default) == pname
            ),
            key=lambda p: (p.created, p.spec.name),
        )
        if plugin.paused and any(
            p.resize_error is None and p.target > len(core.store.members(p.spec.name))
            for p in pools
        ):
            plugin.resume()  # a pool was resized again since the pause set its resize error
        for name in core.agents:
            # an agent this plugin started before a coordinator restart: its again to stop
            if name not in started and name.startswith(f"{pname}-") and plugin.adopt(name):
                started[name] = now
        plugin.joined.update(n for n in started if n in core.agents)
        plugin.size_cores = {k: v[0] for k, v in core.vm_sizes().items()}
        for name in list(started):
            # an agent whose link is gone for good (its host rebooted, the process died): the
            # core has requeued its tasks and replaces its TVM; its leftovers are stopped here
            a = core.agents.get(name)
            gone = a.disconnected_at if a is not None and not a.connected else None
            if gone is not None and core.clock() - gone > self.lost_after:
                log.warning("provisioner %s: agent %s lost: stopped and wiped", pname, name)
                started.pop(name)
                self._idle.pop(name, None)
                core.forget_agent(name)
                self._dispatch()
                await trio.to_thread.run_sync(plugin.stop, name)
        on_way = []
        for name, when in list(started.items()):
            if name in core.agents:
                continue
            if plugin.register_timeout is not None and now - when > plugin.register_timeout:
                started.pop(name)
                log.warning("agent %s did not join within %g s: stopped", name, now - when)
                await trio.to_thread.run_sync(plugin.stop, name)
                continue
            on_way.append(name)
        free = [
            n
            for n in started
            if (a := core.agents.get(n)) is not None and a.connected and a.tvm is None
        ]
        available = len(on_way) + len(free)
        for pool in pools:
            short = max(0, pool.target - len(core.store.members(pool.spec.name)))
            if pool.resize_error is not None:
                short = 0  # a failed resize stays where it is until the pool is resized again
            take = min(short, available)
            available -= take
            need = short - take
            if need <= 0:
                continue
            if plugin.paused:
                self._failed(pool.spec.name, "ProvisionerPaused", plugin.paused)
                continue
            names = await trio.to_thread.run_sync(plugin.start, need, pool.spec.vm_size)
            for name in names:
                started[name] = time.monotonic()
            if names:
                log.info(
                    "provisioner %s started %s for pool %s", pname, ", ".join(names), pool.spec.name
                )
            for code, message in plugin.take_problems():
                self._failed(pool.spec.name, code, message)
            if plugin.paused:
                self._failed(pool.spec.name, "ProvisionerPaused", plugin.paused)
        for code, message in plugin.take_problems():  # found by poll, no pool was growing
            for pool in pools:
                if pool.alloc_state == "resizing":
                    self._failed(pool.spec.name, code, message)
        # Shrink: agents free for longer than idle-stop-after that no pool took are stopped.
        surplus = available
        for name in free:
            self._idle.setdefault(name, now)
        for name in list(self._idle):
            # only this plugin's agents: another plugin's free agent keeps its idle time
            if name in started and name not in free:
                del self._idle[name]
        for name in sorted(free, key=lambda n: self._idle[n]):
            if surplus <= 0:
                break
            if now - self._idle[name] < plugin.idle_stop_after:
                continue
            surplus -= 1
            agent = core.agents.get(name)
            if agent is None or not agent.connected or agent.tvm is not None:
                continue
            log.info("provisioner %s: stopping idle agent %s", pname, name)
            core.forget_agent(name)
            self._dispatch()
            started.pop(name, None)
            self._idle.pop(name, None)
            await trio.to_thread.run_sync(plugin.stop, name)
