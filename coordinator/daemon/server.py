"""Run a coordinator: service + REST/websocket server on one port (hypercorn, Trio worker)."""

from __future__ import annotations

import functools
import logging
import os
import socket
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from coordinator.core import (
    MAX_ACTIVE_JOBS,
    MAX_POOLS,
    MAX_TASKS,
    MAX_TASKS_PER_JOB,
    AutoscaleTiming,
)
from coordinator.rest.app import make_app
from coordinator.rest.dispatch import Dispatcher
from coordinator.rest.limits import DEFAULT_MAX_UPLOAD, patch_websocket_limits
from coordinator.runtime import httpdirect, tcplean
from coordinator.runtime.filestore import FileStore
from coordinator.runtime.pgstore import PostgresStore, is_postgres_url
from coordinator.runtime.service import CoordinatorService
from coordinator.runtime.statedir import make_private_dir

from .gcpolicy import server_gc
from .standby import LeaseKeeper, StandbyApp, SwitchApp, wait_for_lease

log = logging.getLogger("tvm.coordinator")


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class RunningCoordinator:
    """Handle given to `task_status.started()`: endpoint, account, key, token, service."""

    def __init__(self, service: CoordinatorService, app: Dispatcher, endpoint: str) -> None:
        self.service = service
        self.app = app
        self.endpoint = endpoint
        self.account = service.account
        self.key = service.keys[0]
        self.join_token = service.join_token
        self.public_url = endpoint  # what other machines dial (`--public-url`)

    @property
    def agent_url(self) -> str:
        return self.endpoint.replace("http://", "ws://").replace("https://", "wss://") + "/agent"


async def run_coordinator(
    state_dir: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    account: str = "tvm",
    heartbeat_timeout: float = 30.0,
    join_token: str | None = None,
    max_pool_size: int = 1000,
    max_tasks_per_job: int = MAX_TASKS_PER_JOB,
    max_tasks: int = MAX_TASKS,
    max_pools: int = MAX_POOLS,
    max_active_jobs: int = MAX_ACTIVE_JOBS,
    provisioner: Any = None,
    autoscale_timing: AutoscaleTiming | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    port_range: tuple[int, int, int] | None = None,
    max_agent_frame: int = 64 * 1024 * 1024,
    max_upload_size: int = DEFAULT_MAX_UPLOAD,
    clock: Any = None,
    tvm_root_dir: str | None = None,
    link_grace: float = 5.0,
    unknown_tvm_timeout: float = 120.0,
    unusable_after_failures: int = 3,
    store: str | None = None,
    lease_ttl: float = 10.0,
    standby_poll: float = 1.0,
    on_standby: Any = None,
    provisioners: Any = None,
    public_url: str = "",
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """`provisioner`: None (pools use only agents that register by themselves), "local" (the embedded
    LocalProvisioner starts `python -m tvmagent` processes under STATE_DIR/agents), or a factory
    `(agent_url, join_token) -> Provisioner`. Its agents are stopped when the coordinator stops.

    `autoscale_timing` (tests): shorter autoscale sample period, visibility delay and evaluation
    interval bounds (see `AutoscaleTiming`), so a test runs hours of autoscale in seconds while
    heartbeats and timeouts keep the real clock. `tvm_root_dir`: where the local provisioner puts
    its agents' TVM roots (`LocalProvisioner`). `link_grace`, `unknown_tvm_timeout`,
    `unusable_after_failures`: TVM healing (coordinator/core/healing.py). `provisioners`: the
    config's `[provisioner]` section (`provisioners.config.ProvisionersConfig`): pools naming one
    are filled by it. `public_url`: the URL other machines reach this coordinator at (printed join
    command, agents started elsewhere).

    `store`: a `postgresql://` URL instead of STATE_DIR/coordinator.db. Several coordinators may
    share it: each listens at once, answering as a standby (daemon/standby.py) until it holds the
    store's lease (`lease_ttl` seconds, polled every `standby_poll`); `task_status.started` is
    called once it is active, `on_standby(endpoint, account, key, join_token)` before that, once
    the store has an account."""
    sock = bind_socket(host, port)
    try:
        with server_gc():
            async with trio.open_nursery() as nursery:
                # The arguments travel as one dict: the active part may start only after a wait.
                await _run(nursery, sock, locals(), task_status)
    finally:
        sock.close()


async def _run(
    nursery: trio.Nursery, sock: socket.socket, a: dict[str, Any], task_status: Any
) -> None:
    config = Config()
    # Larger frames close the link (1009); before the hello is accepted the limit is far smaller
    # (MAX_PRE_AUTH_MESSAGE, see patch_websocket_limits).
    config.websocket_max_message_size = a["max_agent_frame"]
    if a["tls_cert"]:
        config.certfile = a["tls_cert"]
        config.keyfile = a["tls_key"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.graceful_timeout = 1.0
    shared = None
    switch = None
    if is_postgres_url(a["store"]):
        shared = await trio.to_thread.run_sync(PostgresStore, a["store"])
        switch = SwitchApp(StandbyApp())
        await nursery.start(_serve, switch, config, sock)
        on_account = None
        if a["on_standby"] is not None:
            url = _endpoint(sock, a["host"], a["tls_cert"])
            on_account = functools.partial(a["on_standby"], url)
        waited = await wait_for_lease(shared, a["lease_ttl"], a["standby_poll"], on_account)
        log.warning("this coordinator is active on %s (waited %.1f s)", shared.path, waited)
    try:
        await _serve_active(nursery, sock, a, config, shared, switch, task_status)
    finally:
        if shared is not None:
            shared.close()  # (closing twice is harmless: the service closes it when active)


async def _serve_active(
    nursery: trio.Nursery,
    sock: socket.socket,
    a: dict[str, Any],
    config: Config,
    shared: Any,
    switch: SwitchApp | None,
    task_status: Any,
) -> None:
    state_dir, host, tls_cert = a["state_dir"], a["host"], a["tls_cert"]
    clock, port_range, autoscale_timing = a["clock"], a["port_range"], a["autoscale_timing"]
    provisioner, tvm_root_dir = a["provisioner"], a["tvm_root_dir"]
    provisioners, public_url = a["provisioners"], a["public_url"]
    service = CoordinatorService(
        state_dir,
        account=a["account"],
        heartbeat_timeout=a["heartbeat_timeout"],
        join_token=a["join_token"],
        max_pool_size=a["max_pool_size"],
        max_tasks_per_job=a["max_tasks_per_job"],
        max_tasks=a["max_tasks"],
        max_pools=a["max_pools"],
        max_active_jobs=a["max_active_jobs"],
        store=shared,
        **({"clock": clock} if clock is not None else {}),
    )  # issue 6: tests' fake time
    replica = None
    if shared is not None:  # uploads kept in the shared store too: a successor serves them
        from coordinator.runtime.pgblobs import PgBlobs

        replica = await trio.to_thread.run_sync(PgBlobs, shared.url)
    files = FileStore(make_private_dir(os.path.join(state_dir, "files")), replica)
    app = make_app(service, files, max_upload_size=a["max_upload_size"])
    endpoint = _endpoint(sock, host, tls_cert)
    service.endpoint = endpoint
    if port_range is not None:  # (low, high, per TVM) for communicating pools (issue 8)
        from protocol.ports import PortRangeConfig

        service.core.port_range = PortRangeConfig(*port_range)
    service.core.account_url = endpoint
    service.core.link_grace = a["link_grace"]
    service.core.unknown_tvm_timeout = a["unknown_tvm_timeout"]
    service.core.unusable_after_failures = a["unusable_after_failures"]
    if autoscale_timing is not None:
        service.core.autoscale_timing = autoscale_timing
    prov: Any = None
    local_ws = endpoint.replace("https://", "wss://").replace("http://", "ws://") + "/agent"
    # agents on other machines dial the public URL (`--public-url`); local ones this endpoint
    public_ws = (public_url or endpoint).rstrip("/")
    public_ws = public_ws.replace("https://", "wss://").replace("http://", "ws://") + "/agent"
    if provisioner is not None:
        agent_ws = local_ws
        if provisioner == "local":
            from coordinator.runtime.provisioner import LocalProvisioner

            prov = LocalProvisioner(
                state_dir, agent_ws, service.join_token, tvm_root_dir=tvm_root_dir
            )
        else:
            prov = provisioner(agent_ws, service.join_token)
        service.set_provisioner(prov)
    if provisioners is not None and provisioners.named:
        from coordinator.runtime.provisioners import build_hub

        prov = build_hub(service, provisioners, prov, public_ws, state_dir)
        service.set_provisioner(prov)
    keeper = None
    if shared is not None:
        keeper = LeaseKeeper(shared, a["lease_ttl"])
        service.fence = keeper.check
    try:
        async with trio.open_nursery() as inner:
            await inner.start(service.run)
            if keeper is not None:
                inner.start_soon(keeper.run)
            if switch is not None:
                switch.target = app
            else:
                await nursery.start(_serve, app, config, sock)
            if hasattr(prov, "run"):  # per-pool provisioners' loops
                inner.start_soon(prov.run)
            log.info(
                "coordinator listening on %s (restored state in %.2f s)",
                endpoint,
                service.restore_seconds,
            )
            rc = RunningCoordinator(service, app, endpoint)
            rc.public_url = public_url.rstrip("/") or endpoint
            task_status.started(rc)
    finally:
        if prov is not None:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(prov.stop_all)
        if shared is not None:
            try:
                shared.release()  # a standby takes over at once instead of after the TTL
            except Exception:  # noqa: BLE001 - fenced or unreachable: it expires by itself
                log.warning("could not give the store's lease up; it expires by itself")
        service.close()
        if replica is not None:
            replica.close()


def _endpoint(sock: socket.socket, host: str, tls_cert: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    # TLS: https:// for REST and wss:// for agents on the same port.
    return f"{'https' if tls_cert else 'http'}://{shown}:{sock.getsockname()[1]}"


async def _serve(
    app: Dispatcher,
    config: Config,
    sock: socket.socket,
    task_status: Any = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled. If hypercorn's server task ever dies of an internal error (it has
    crashed on a send race, see `_patch_hypercorn`), log it and serve again on the same socket:
    agents reconnect and resend, clients retry, the coordinator's state is untouched."""
    _patch_hypercorn()
    patch_websocket_limits()
    httpdirect.install()
    tcplean.install()
    status = _StartedOnce(task_status)
    while True:
        # hypercorn wraps the fd in its own socket object and closes it: give it a duplicate.
        config.bind = [f"fd://{os.dup(sock.fileno())}"]
        try:
            await serve(app, config, task_status=status)  # type: ignore[arg-type]
        except Exception:
            if not status.done:
                raise  # failing to start (bad certificate, ...) is the caller's error
            log.exception("the HTTP/websocket server failed; serving again")
            await trio.sleep(0.1)
            continue
        return


class _StartedOnce:
    """Pass `started()` to the real task status the first time only (restarts are silent)."""

    def __init__(self, task_status: Any) -> None:
        self._status = task_status
        self.done = False

    def started(self, value: Any = None) -> None:
        if not self.done:
            self.done = True
            self._status.started(value)


_patched = False


def _patch_hypercorn() -> None:
    """hypercorn 0.17/0.18 (trio) races `_close()`'s unlocked `send_eof()` against a locked
    `send_all()` when a websocket closes while a frame is going out; the BusyResourceError escapes
    and tears down the whole server. Treat it like the broken connection it is."""
    global _patched
    if _patched:
        return
    from hypercorn.events import Closed
    from hypercorn.trio.tcp_server import TCPServer

    original = TCPServer.protocol_send

    async def protocol_send(self: TCPServer, event: Any) -> None:
        try:
            await original(self, event)
        except trio.BusyResourceError:
            await self.protocol.handle(Closed())

    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    _patched = True
