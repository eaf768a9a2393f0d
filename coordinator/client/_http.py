"""The client's plumbing: calls, pages, errors, credentials and the resource-group base."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, quote, urlsplit

import httpx2
import msgspec

from coordinator.common import models as m

_enc = msgspec.json.Encoder()


class BatchError(Exception):
    """An error answered by the service (or a transport failure, code `ConnectionFailed`)."""

    def __init__(
        self, status: int, code: str, message: str, values: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.values = values or {}


@dataclass
class _Call:
    method: str
    path: str
    body: Any = None
    params: dict[str, str] | None = None
    parse: Callable[[httpx2.Response], Any] | None = None
    headers: dict[str, str] | None = None
    raw: bytes | None = None


@dataclass
class _Page:
    items: list[Any]
    next_link: str | None


def _list(typ: type) -> Callable[[httpx2.Response], Any]:
    """A list answer: one page and its odata.nextLink, which `_call` follows until the last page."""
    dec = msgspec.json.Decoder(dict[str, list[typ] | str | None])  # type: ignore[valid-type]

    def parse(r: httpx2.Response) -> _Page:
        body = dec.decode(r.content)
        link = body.get("odata.nextLink")
        return _Page(list(body.get("value") or []), link if isinstance(link, str) else None)

    return parse


def _next_call(call: _Call, link: str) -> _Call:
    """The same list call with the query of the server's nextLink (its $skiptoken among them). The path
    stays the client's own, so an endpoint behind a path prefix or a proxy keeps working."""
    params = dict(parse_qsl(urlsplit(link).query, keep_blank_values=True))
    return replace(call, params=params)


_T = TypeVar("_T")


def _one(typ: type[_T]) -> Callable[[httpx2.Response], _T]:
    dec = msgspec.json.Decoder(typ)
    return lambda r: dec.decode(r.content)


def _seg(name: str) -> str:
    return quote(name, safe="")


def _error_from(resp: httpx2.Response) -> BatchError:
    try:
        body = msgspec.json.decode(resp.content, type=m.ErrorBody)
        return BatchError(
            resp.status_code, body.code, body.message.value, {v.key: v.value for v in body.values}
        )
    except (msgspec.DecodeError, msgspec.ValidationError):
        code = resp.headers.get("x-tvm-error-code") or f"HTTP{resp.status_code}"
        return BatchError(resp.status_code, code, resp.text[:200] or code)


def _credentials(
    endpoint: str | None, account: str | None, key: str | None
) -> tuple[str, str, str]:
    endpoint = endpoint or os.environ.get("TVM_ENDPOINT", "")
    account = account or os.environ.get("TVM_ACCOUNT", "")
    key = key or os.environ.get("TVM_KEY", "")
    missing = [
        n
        for n, v in (("TVM_ENDPOINT", endpoint), ("TVM_ACCOUNT", account), ("TVM_KEY", key))
        if not v
    ]
    if missing:
        raise BatchError(
            0,
            "MissingCredentials",
            "set " + ", ".join(missing) + " (tvm up prints them) or pass them",
        )
    try:
        base64.b64decode(key, validate=True)
    except ValueError:
        raise BatchError(
            0,
            "InvalidCredentials",
            "the account key is not base64: copy it whole from the TVM_KEY line `tvm up` "
            "prints (or `tvm keys regenerate` printed)",
        ) from None
    return endpoint.rstrip("/"), account, key


def _endpoint_path(endpoint: str) -> str:
    """The endpoint's path prefix; a clear BatchError (not a traceback) when it is not an http(s) URL."""
    try:
        parts = urlsplit(endpoint)
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError as exc:
        raise BatchError(
            0, "InvalidEndpoint", f"endpoint {endpoint!r} is not a valid URL: {exc}"
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BatchError(
            0, "InvalidEndpoint", f"endpoint {endpoint!r} must look like http://HOST:PORT"
        )
    return parts.path.rstrip("/")


if TYPE_CHECKING:
    from ._client import _Base


class _Group:
    def __init__(self, client: _Base) -> None:
        self._c = client
