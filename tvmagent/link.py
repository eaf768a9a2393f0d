"""The agent's link shell: connect (with backoff), handshake, read, write, heartbeat.

One `LinkSession` for the agent's whole life, so a completion survives any number of reconnects until
the coordinator acknowledges it. What a message means is the agent's business (`on_message`); this
module only moves frames.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
from collections.abc import Callable
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from protocol import SUBPROTOCOL, LinkSession, ProtocolError, agent_codec
from protocol import messages as pm

from .state import rejected_for_good
from .wsclient import WsClient, open_websocket

log = logging.getLogger("tvm.agent")

# A TaskStarted waits this long for a frame to share (a short task's TaskCompleted) before it goes alone.
LAZY_SEND_S = 0.02
# A link that stayed up this long resets the reconnect backoff when it drops.
STABLE_LINK_S = 1.0
# While `hold()` says nobody waits for them, messages wait this long for more to share their frame.
HOLD_S = 0.005


class AgentRejected(Exception):
    pass


def agent_url(url: str) -> str:
    if url.startswith("http://"):
        url = "ws://" + url[len("http://") :]
    elif url.startswith("https://"):
        url = "wss://" + url[len("https://") :]
    if not url.rstrip("/").endswith("/agent"):
        url = url.rstrip("/") + "/agent"
    return url


class Link:
    """`hello()` builds the Hello of each attempt; `on_welcome(reply)` runs once the coordinator
    accepted it (before any message of that connection); `on_message(msg)` for each message in order;
    `heartbeat()` the periodic Heartbeat; `on_acks()` whenever acknowledgements may have arrived;
    `hold()` whether what is queued may wait HOLD_S for more to share its frame."""

    def __init__(
        self,
        url: str,
        agent_id: str,
        ssl_context: ssl.SSLContext | None,
        max_backoff: float,
        hello: Callable[[], pm.Hello],
        on_welcome: Callable[[pm.Welcome], None],
        on_message: Callable[[pm.Msg], None],
        heartbeat: Callable[[], pm.Msg],
        on_acks: Callable[[], None],
        hold: Callable[[], bool] = lambda: False,
    ) -> None:
        # Several coordinators (URL1,URL2: an active one and standbys): on a failed or lost link
        # the next one is tried at once; a whole round without success backs off.
        self.urls = [agent_url(u.strip()) for u in url.split(",") if u.strip()]
        self.url = self.urls[0]
        self.agent_id = agent_id
        self.ssl_context = ssl_context
        self.max_backoff = max_backoff
        self.session = LinkSession(agent_codec())
        self.wake = trio.Event()
        self._lazy_wake = trio.Event()
        self._held_starts: dict[str, pm.TaskStarted] = {}  # task key -> its held TaskStarted
        self._ws: WsClient | None = None  # the open connection, while its writer runs
        self.connected = trio.Event()
        self.coordinator_heartbeat = 0.0  # the last Welcome's heartbeat interval (reconnect cap)
        self._hello = hello
        self._on_welcome = on_welcome
        self._on_message = on_message
        self._heartbeat_msg = heartbeat
        self._on_acks = on_acks
        self._hold = hold

    def send(self, msg: pm.Msg, now: bool = False) -> int:
        """Queue `msg` for the writer, which lets the messages of the same moment share a frame.
        `now`: nothing else is coming this moment (e.g. the agent's last running task ended), so
        the frame is written here and then, without the two scheduling rounds of the writer."""
        if isinstance(msg, pm.TaskCompleted):
            # It carries the start time: a TaskStarted still held back says nothing more.
            self._held_starts.pop(msg.key, None)
        seq = self.session.send(msg)
        ws = self._ws
        if now and ws is not None and ws.can_send_now():
            frame = self.session.next_frame()
            if frame is None or ws.send_now(frame):
                return seq
        self.wake.set()
        return seq

    @property
    def http_base(self) -> str:
        return (
            self.url.replace("ws://", "http://")
            .replace("wss://", "https://")
            .rsplit("/agent", 1)[0]
        )

    def _next_url(self) -> bool:
        """Move to the next coordinator URL; True when that starts a new round of the list."""
        i = (self.urls.index(self.url) + 1) % len(self.urls)
        self.url = self.urls[i]
        return i == 0

    def send_lazily(self, msg: pm.TaskStarted) -> None:
        """A TaskStarted need not travel alone, nor at all for a task that ends quickly: it is held
        for up to LAZY_SEND_S, dropped when the task's TaskCompleted (which carries the start time)
        is sent first, else queued then. One message and one frame per short task."""
        self._held_starts[msg.key] = msg
        self._lazy_wake.set()

    async def lazy_sender(self) -> None:
        while True:
            await self._lazy_wake.wait()
            self._lazy_wake = trio.Event()
            await trio.sleep(LAZY_SEND_S)
            held, self._held_starts = self._held_starts, {}
            for msg in held.values():
                self.session.send(msg)
            self.wake.set()

    async def connect_loop(self) -> None:
        backoff = 0.1
        while True:
            attempt_started = trio.current_time()
            try:
                await self._connection()
                backoff = 0.1
            except Exception as exc:  # noqa: BLE001 - classified below
                leaf = _first_leaf(exc)
                if isinstance(leaf, AgentRejected):
                    raise leaf from None
                if not isinstance(leaf, _RETRYABLE):
                    raise
                if (
                    self.connected.is_set()
                    and trio.current_time() - attempt_started >= STABLE_LINK_S
                ):
                    # A link that worked for a while: come back fast (a restarted coordinator waits
                    # for its agents only a heartbeat timeout), not after the backoff of old failures.
                    backoff = 0.1
                if self.connected.is_set():
                    log.warning(
                        "link to %s lost: %s; reconnecting in %.1f s",
                        self.url,
                        _describe(leaf),
                        backoff,
                    )
                else:
                    log.warning(
                        "cannot reach the coordinator at %s: %s; retrying in %.1f s",
                        self.url,
                        _describe(leaf),
                        backoff,
                    )
            self.connected = trio.Event()
            self._on_acks()
            self.session.connection_lost()
            if len(self.urls) > 1 and not self._next_url():
                await trio.sleep(0.05)  # another coordinator to try (a standby may be active now)
                continue
            await trio.sleep(backoff * (0.5 + random.random()))
            backoff = next_backoff(backoff, self.max_backoff, self.coordinator_heartbeat)

    async def _connection(self) -> None:
        codec = self.session.codec
        if self.url.startswith("wss://"):
            await self._tls_preflight()  # trio-websocket turns TLS errors into a bare timeout
        async with open_websocket(
            self.url,
            SUBPROTOCOL,
            connect_timeout=10,
            disconnect_timeout=5,
            max_message_size=64 * 1024 * 1024,
            ssl_context=self.ssl_context,
        ) as ws:
            await ws.send_message(codec.encode(self._hello()))
            with trio.fail_after(15):
                first = await ws.get_message()
                reply = codec.decode_handshake(first.encode() if isinstance(first, str) else first)
            if isinstance(reply, pm.Reject):
                log.error("coordinator refused this agent: %s: %s", reply.code, reply.message)
                if rejected_for_good(reply.code):
                    raise AgentRejected(f"{reply.code}: {reply.message}")
                raise ProtocolError(reply.message)
            if not isinstance(reply, pm.Welcome):
                raise ProtocolError("expected welcome")
            self._on_welcome(reply)
            log.info("connected to %s as %s", self.url, self.agent_id)
            self.coordinator_heartbeat = reply.heartbeat_interval
            self.connected.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, ws)
                nursery.start_soon(self._heartbeat, reply.heartbeat_interval)
                while True:
                    data = await ws.get_message()
                    if isinstance(data, str):
                        raise ProtocolError("text frame from coordinator")
                    only_runs = True
                    received = self.session.receive_frame(data)
                    self._on_acks()  # acks may have arrived (drain waits for them)
                    for r in received:
                        self.session.confirm(r.seq)
                        self._on_message(r.msg)
                        only_runs = only_runs and isinstance(r.msg, pm.RunTask)
                    if only_runs:
                        # Nobody waits for the acknowledgement of a RunTask: it rides on the task's
                        # TaskStarted/TaskCompleted frame instead of costing both sides a frame of its
                        # own. Anything else (Ping: the coordinator times the link) is acked now.
                        self._lazy_wake.set()
                    else:
                        self.wake.set()

    async def _writer(self, ws: WsClient) -> None:
        self._ws = ws
        try:
            while True:
                frame = self.session.next_frame()
                if frame is None:
                    await ws.flush()  # what a `send(now=True)` could not write at once
                    await self.wake.wait()
                    self.wake = trio.Event()
                    # Let the other runnable Trio tasks (completions of the same moment) add their
                    # messages first: one frame for the lot instead of one each.
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    if self._hold():
                        await trio.sleep(HOLD_S)
                    continue
                await ws.send_message(frame)
        finally:
            self._ws = None

    async def _heartbeat(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            self.send(self._heartbeat_msg())

    async def _tls_preflight(self) -> None:
        """One TLS handshake before the websocket so a certificate problem is logged as such
        (ssl.SSLCertVerificationError, an OSError: the connect loop retries and says why)."""
        parts = urlsplit(self.url)
        ctx = self.ssl_context or ssl.create_default_context()
        with trio.fail_after(10):
            stream = await trio.open_ssl_over_tcp_stream(
                parts.hostname or "", parts.port or 443, ssl_context=ctx
            )
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                if isinstance(exc.__cause__, OSError):
                    raise exc.__cause__ from None
                raise
            finally:
                await trio.aclose_forcefully(stream)


_RETRYABLE = (OSError, HandshakeError, ConnectionClosed, trio.TooSlowError, ProtocolError)


def next_backoff(backoff: float, max_backoff: float, coordinator_heartbeat: float) -> float:
    """Double the reconnect delay up to `max_backoff` — but once a coordinator told us its heartbeat
    interval, retry at least that often: a restarted coordinator waits one heartbeat timeout (four
    intervals) for its agents before it re-places their tasks elsewhere."""
    cap = max_backoff
    if coordinator_heartbeat > 0:
        cap = min(cap, max(0.1, coordinator_heartbeat))
    return min(backoff * 2, cap)


def _first_leaf(exc: BaseException) -> BaseException:
    """Trio nurseries wrap errors in groups; the link cares about the first real one."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _rejection(exc: ConnectionRejected) -> str:
    """An HTTP answer instead of a websocket: its status and the service's error code/message
    (a standby coordinator says so in its body)."""
    try:
        detail = json.loads(exc.body or b"{}")
        said = f"{detail.get('code', '')}: {detail.get('message', '')}"
    except (ValueError, AttributeError):
        said = (exc.body or b"").decode(errors="replace")
    return f"HTTP {exc.status_code} {said}".strip()[:300]


def _describe(exc: BaseException) -> str:
    """One line naming the real cause: trio-websocket wraps e.g. "connection refused" in a bare
    HandshakeError, so follow the cause chain down to the OS error."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    text = ""
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRejected):
            return _rejection(cause)
        if isinstance(cause, OSError) and cause.strerror:
            return f"{text or type(exc).__name__}: {cause.strerror}"[:200]
        if isinstance(cause, OSError) and not text:
            text = str(cause)  # e.g. "all attempts to connect to host:port failed"
        if isinstance(cause, BaseExceptionGroup) and cause.exceptions:
            cause = cause.exceptions[0]
            continue
        cause = cause.__cause__ or cause.__context__
    text = text or str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
