"""Encoding and decoding of protocol messages (msgpack), with clear errors for bad input."""

from __future__ import annotations

from typing import Any

import msgspec

from .messages import AgentMsg, CoordinatorMsg, Frame, HandshakeMsg, Msg


class ProtocolError(Exception):
    """Input that cannot be a valid message: the link that sent it is closed with this reason."""

    def __init__(self, message: str, close_code: int = 4002) -> None:
        super().__init__(message)
        self.message = message
        self.close_code = close_code


class UnknownMessage(Exception):
    """A well-formed message whose type this side does not know (a newer peer)."""

    def __init__(self, type_name: str) -> None:
        super().__init__(type_name)
        self.type_name = type_name


class _Envelope(msgspec.Struct):
    t: str


def _tags(union: Any) -> frozenset[str]:
    return frozenset(cls.__struct_config__.tag for cls in union.__args__)


# msgspec skips unknown fields recursively: a deeply nested value is a RecursionError, not a DecodeError.
_TOO_DEEP = "malformed {}: nested too deeply"
# msgspec checks a string's UTF-8 as it decodes it: invalid bytes are a UnicodeDecodeError.
_BAD = (msgspec.DecodeError, UnicodeDecodeError)


class MessageCodec:
    """Typed encoder/decoder for one direction of a link (built once, reused)."""

    def __init__(self, incoming: Any) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(incoming)
        self._known = _tags(incoming)
        self._frame_decoder = msgspec.msgpack.Decoder(Frame)
        self._handshake_decoder = msgspec.msgpack.Decoder(HandshakeMsg)
        self._envelope = msgspec.msgpack.Decoder(_Envelope)

    def encode(self, obj: Any) -> bytes:
        return self._encoder.encode(obj)

    def decode_frame(self, data: bytes) -> Frame:
        try:
            return self._frame_decoder.decode(data)
        except RecursionError:
            raise ProtocolError(_TOO_DEEP.format("frame")) from None
        except _BAD as exc:
            raise ProtocolError(f"malformed frame: {exc}") from None

    def decode_message(self, raw: msgspec.Raw | bytes) -> Msg:
        try:
            return self._decoder.decode(raw)
        except RecursionError:
            raise ProtocolError(_TOO_DEEP.format("message")) from None
        except _BAD as exc:
            try:
                tag = self._envelope.decode(raw).t
            except (*_BAD, RecursionError):
                raise ProtocolError(f"malformed message: {exc}") from None
            if tag not in self._known:
                raise UnknownMessage(tag) from None
            raise ProtocolError(f"malformed {tag!r} message: {exc}") from None

    def decode_handshake(self, data: bytes) -> Msg:
        try:
            return self._handshake_decoder.decode(data)
        except RecursionError:
            raise ProtocolError(_TOO_DEEP.format("handshake"), close_code=4002) from None
        except _BAD as exc:
            raise ProtocolError(f"malformed handshake: {exc}", close_code=4002) from None


def agent_codec() -> MessageCodec:
    """Codec used by an agent: decodes what the coordinator sends."""
    return MessageCodec(CoordinatorMsg)


def coordinator_codec() -> MessageCodec:
    """Codec used by the coordinator: decodes what agents send."""
    return MessageCodec(AgentMsg)
