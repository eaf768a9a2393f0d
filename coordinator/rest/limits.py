"""Limits on what an outsider can make the coordinator hold: request bodies, uploads, JSON nesting,
`Content-MD5`, and websocket messages before an agent has authenticated.

Bodies are read only after the request's signature was checked from its headers (SharedKey signs
Content-Length, Content-MD5 and Content-Type, not the body), so an unsigned request costs no memory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

from coordinator.common.errors import ApiError, bad_request

# JSON bodies. Azure refuses an add-collection over 1 MB; ours may carry more (up to 100 tasks with
# long environments), so it gets more room than the other operations.
MAX_JSON_BODY = 4 * 1024 * 1024
MAX_COLLECTION_BODY = 16 * 1024 * 1024
# `POST /files` streams to disk; the default is a disk bound, configurable (`max_upload_size`).
DEFAULT_MAX_UPLOAD = 4 * 1024 * 1024 * 1024
# The first message on /agent (the hello) before the agent has authenticated. A hello lists the
# agent's running and unacknowledged tasks (up to 4 per core, keys up to ~200 characters): 2,048
# such entries are about 450 KB, so a busy large host still fits.
MAX_PRE_AUTH_MESSAGE = 512 * 1024
# Sent by the agent endpoint once the hello is accepted: the connection gets the full message limit.
WS_AUTHENTICATED = "tvm.websocket.authenticated"


def json_body_limit(path: str) -> int:
    return MAX_COLLECTION_BODY if path.endswith("/addtaskcollection") else MAX_JSON_BODY


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "RequestBodyTooLarge",
        f"the request body is larger than the limit of {limit} bytes",
        limit=str(limit),
    )


def _declared_length(headers: dict[str, str], limit: int) -> None:
    """Refuse at once a body whose declared length is over the limit (nothing is read)."""
    value = headers.get("content-length", "").strip()
    if value.isdigit() and int(value) > limit:
        raise _too_large(limit)


def expected_md5(headers: dict[str, str]) -> bytes | None:
    """The digest a `Content-MD5` header declares (base64 of 16 bytes), or None when absent."""
    value = headers.get("content-md5", "").strip()
    if not value:
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != 16:
        raise bad_request(
            "InvalidHeaderValue",
            f"Content-MD5 must be the base64 of a 16-byte MD5 digest, not {value[:64]!r}",
            HeaderName="Content-MD5",
            HeaderValue=value[:64],
        )
    return digest


def check_md5(expected: bytes | None, md5: Any) -> None:
    if expected is not None and md5.digest() != expected:
        raise bad_request(
            "Md5Mismatch",
            "the MD5 of the request body does not match its Content-MD5 header",
            HeaderName="Content-MD5",
        )


async def read_body(receive: Callable, headers: dict[str, str], limit: int) -> bytes:
    """The whole body, at most `limit` bytes (413 beyond), checked against `Content-MD5` if sent."""
    _declared_length(headers, limit)
    expected = expected_md5(headers)
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not msg.get("more_body"):
            break
    body = b"".join(chunks)
    if expected is not None:
        check_md5(expected, hashlib.md5(body, usedforsecurity=False))
    return body


class BodyStream:
    """A request body delivered chunk by chunk (for uploads): at most `limit` bytes (413 beyond),
    checked against `Content-MD5` at its end, before the caller commits anything."""

    def __init__(self, receive: Callable, headers: dict[str, str], limit: int) -> None:
        _declared_length(headers, limit)
        self._receive = receive
        self._limit = limit
        self._expected = expected_md5(headers)
        self._md5 = hashlib.md5(usedforsecurity=False)
        self.size = 0

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        while True:
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                raise ApiError(
                    400,
                    "IncompleteRequestBody",
                    "the client went away before the body was complete",
                )
            chunk = msg.get("body", b"")
            self.size += len(chunk)
            if self.size > self._limit:
                raise _too_large(self._limit)
            if chunk:
                self._md5.update(chunk)
                yield chunk
            if not msg.get("more_body"):
                break
        check_md5(self._expected, self._md5)


def decode_depth_error() -> ApiError:
    """A JSON body nested deeper than the decoder's recursion limit (msgspec raises RecursionError)."""
    return bad_request(
        "InvalidRequestBody", "the JSON body is nested too deeply", reason="JsonNestingTooDeep"
    )


# --------------------------------------------------------------------------- websocket (hypercorn)

_ws_patched = False


def patch_websocket_limits() -> None:
    """hypercorn applies one message limit to a whole websocket connection and buffers a message up
    to it before the application sees anything. Start every connection at MAX_PRE_AUTH_MESSAGE; the
    application raises it to the configured limit by sending WS_AUTHENTICATED. An over-limit message
    closes the connection with 1009 and a reason saying the limit."""
    global _ws_patched
    if _ws_patched:
        return
    from hypercorn.protocol.ws_stream import WSStream
    from wsproto.events import CloseConnection

    original_init = WSStream.__init__
    original_send = WSStream.app_send
    original_event = WSStream._send_wsproto_event

    def __init__(self: WSStream, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.tvm_full_limit = self.buffer.max_length  # type: ignore[attr-defined]
        self.buffer.max_length = min(MAX_PRE_AUTH_MESSAGE, self.buffer.max_length)

    async def app_send(self: WSStream, message: Any) -> None:
        if message is not None and message.get("type") == WS_AUTHENTICATED:
            self.buffer.max_length = self.tvm_full_limit  # type: ignore[attr-defined]
            return
        await original_send(self, message)

    async def _send_wsproto_event(self: WSStream, event: Any) -> None:
        if isinstance(event, CloseConnection) and event.code == 1009 and not event.reason:
            limit = self.buffer.max_length
            stage = " before authentication" if limit < self.tvm_full_limit else ""  # type: ignore[attr-defined]
            event = CloseConnection(code=1009, reason=f"message larger than {limit} bytes{stage}")
        await original_event(self, event)

    WSStream.__init__ = __init__  # type: ignore[method-assign]
    WSStream.app_send = app_send  # type: ignore[method-assign]
    WSStream._send_wsproto_event = _send_wsproto_event  # type: ignore[method-assign]
    _ws_patched = True
