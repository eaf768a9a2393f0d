"""Sans-IO link session: sequencing, batching, acknowledgement and resend after reconnect.

A session outlives websocket connections. Every message gets a sequence number; frames carry a
cumulative ack of what the sender has *confirmed* (the coordinator confirms only after its journal
commit, so an acked completion is durable). On reconnect each side tells the other the highest
sequence it received, and everything after that is sent again; duplicates are dropped by sequence.

No I/O here: the shell feeds `receive_frame(bytes)` and writes whatever `next_frame()` returns.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import msgspec

from .codec import MessageCodec, ProtocolError, UnknownMessage
from .messages import Frame, Msg, Unsupported

# Keep frames well under the websocket limit; a frame is one syscall and ~35 µs of server CPU,
# so fill it as much as this allows (python-ecosystem §1).
MAX_FRAME_BYTES = 256 * 1024
MAX_UNACKED = 1_000_000


@dataclass
class Received:
    seq: int
    msg: Msg


@dataclass
class LinkSession:
    codec: MessageCodec
    session_id: str = ""
    _next_seq: int = 1
    _unacked: deque[tuple[int, bytes]] = field(default_factory=deque)
    _sent_upto: int = 0  # highest seq written on the current connection
    received: int = 0  # highest contiguous seq received from the peer
    confirmed: int = 0  # highest seq the application has confirmed (what we ack)
    _acked_on_wire: int = 0
    peer_acked: int = 0

    # ------------------------------------------------------------------ sending

    def send(self, msg: Msg) -> int:
        """Queue a message; returns its sequence number."""
        if len(self._unacked) >= MAX_UNACKED:
            raise ProtocolError("peer is not acknowledging messages", close_code=4008)
        seq = self._next_seq
        self._next_seq += 1
        self._unacked.append((seq, self.codec.encode(msg)))
        return seq

    def has_messages(self) -> bool:
        """Messages, not only an acknowledgement, wait to be written."""
        return self._sent_upto < self._next_seq - 1

    def has_output(self) -> bool:
        return self._sent_upto < self._next_seq - 1 or self._acked_on_wire < self.confirmed

    def next_frame(self) -> bytes | None:
        """The next frame to write, or None when nothing (not even an ack) is pending."""
        if not self.has_output():
            return None
        msgs: list[msgspec.Raw] = []
        size = 0
        first = self._sent_upto + 1
        for seq, data in self._iter_from(first):
            if msgs and size + len(data) > MAX_FRAME_BYTES:
                break
            msgs.append(msgspec.Raw(data))
            size += len(data)
            self._sent_upto = seq
        self._acked_on_wire = self.confirmed
        frame = Frame(first=first if msgs else 0, ack=self.confirmed, msgs=msgs)
        return self.codec.encode(frame)

    def _iter_from(self, first: int):  # noqa: ANN202 - internal generator
        if not self._unacked:
            return
        base = self._unacked[0][0]
        start = max(0, first - base)
        for i in range(start, len(self._unacked)):
            yield self._unacked[i]

    def pending(self) -> list[bytes]:
        """Encoded messages sent but not yet acknowledged by the peer (resent on resume)."""
        return [data for _, data in self._unacked]

    @property
    def unacked_count(self) -> int:
        return len(self._unacked)

    # ------------------------------------------------------------------ receiving

    def receive_frame(self, data: bytes) -> list[Received]:
        """Decode one frame; returns the new messages in order (duplicates dropped).

        Raises ProtocolError for malformed input. A message of an unknown type is answered with
        `Unsupported` and skipped, never fatal.
        """
        frame = self.codec.decode_frame(data)
        self._handle_ack(frame.ack)
        if frame.msgs and frame.first <= 0:
            raise ProtocolError("frame with messages but no sequence number")
        # A malformed message fails the whole frame: none of it counts as received, or a resumed
        # session would tell the peer not to resend messages that were never applied.
        before = (self.received, self.confirmed)
        try:
            return self._receive(frame)
        except ProtocolError:
            self.received, self.confirmed = before
            raise

    def _receive(self, frame: Frame) -> list[Received]:
        out: list[Received] = []
        for i, raw in enumerate(frame.msgs):
            seq = frame.first + i
            if seq <= self.received:
                continue  # resent duplicate
            if seq != self.received + 1:
                raise ProtocolError(f"sequence gap: expected {self.received + 1}, got {seq}")
            self.received = seq
            try:
                msg = self.codec.decode_message(raw)
            except UnknownMessage as exc:
                self.send(Unsupported(type=exc.type_name))
                self.confirm(seq)
                continue
            out.append(Received(seq, msg))
        return out

    def _handle_ack(self, ack: int) -> None:
        if ack >= self._next_seq:
            raise ProtocolError(f"ack {ack} for a message never sent")
        if ack > self.peer_acked:
            self.peer_acked = ack
        while self._unacked and self._unacked[0][0] <= ack:
            self._unacked.popleft()

    def confirm(self, seq: int) -> None:
        """The application has durably handled everything up to `seq`: acknowledge it."""
        if seq > self.confirmed:
            self.confirmed = min(seq, self.received)

    # ------------------------------------------------------------------ connections

    def connection_lost(self) -> None:
        """Everything not acknowledged will be sent again on the next connection."""
        self._sent_upto = self.peer_acked
        self._acked_on_wire = 0

    def resume(self, peer_received: int) -> None:
        """Reconnected to the same peer session: resend what it has not received."""
        self._handle_ack(min(peer_received, self._next_seq - 1))
        self._sent_upto = max(self.peer_acked, peer_received)
        self._acked_on_wire = 0

    def restart(self, session_id: str) -> int:
        """The peer lost its session (it restarted): renumber what is still unacknowledged.

        Returns how much every pending sequence number went down (new = old - shift)."""
        shift = self._unacked[0][0] - 1 if self._unacked else 0
        pending = [data for _, data in self._unacked]
        self._unacked.clear()
        self.session_id = session_id
        self._next_seq = 1
        self._sent_upto = 0
        self.received = 0
        self.confirmed = 0
        self._acked_on_wire = 0
        self.peer_acked = 0
        for data in pending:
            self._unacked.append((self._next_seq, data))
            self._next_seq += 1
        return shift
