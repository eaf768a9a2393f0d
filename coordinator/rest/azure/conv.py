"""The wire conventions every Azure Batch client relies on (api-version 2024-02-01.19.0 / 2025-06-01).

Errors `{odata.metadata, code, message {lang, value}, values [{key, value}]}` with Azure's codes,
`request-id` / `client-request-id`, `DataServiceVersion: 3.0`, `ETag` and `Last-Modified` (RFC 1123)
on resources, and the conditional headers (`If-Match`, `If-None-Match`, `If-Modified-Since`,
`If-Unmodified-Since`): a failed read condition answers 304, a failed write condition 412
`ConditionNotMet`.
"""

from __future__ import annotations

import hashlib
import uuid
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

import msgspec

from coordinator.common.errors import ApiError
from coordinator.rest.dispatch import Response

API_VERSIONS = frozenset({"2024-02-01.19.0", "2025-06-01"})
_json = msgspec.json.Encoder()
_CONTENT_TYPE = b"application/json;odata=minimalmetadata"

# The core's codes where Azure's modern API names the thing differently (a workitem is a job, a TVM
# is a compute node).
_CODES = {
    "WorkItemNotFound": "JobNotFound",
    "WorkItemExists": "JobExists",
    "TVMNotFound": "NodeNotFound",
    "InvalidRequestBody": "InvalidRequestBody",
    "TVMUnreachable": "NodeNotReachable",
    "StoreUnavailable": "ServerBusy",  # Azure's 503 code; its SDKs retry it
}
# The core's value keys and Azure's (clients read `PropertyName` to show the bad field).
_KEYS = {"field": "PropertyName", "value": "PropertyValue", "name": "Name", "reason": "Reason"}


def query_get(query: dict[str, str], name: str) -> str | None:
    """A query parameter, its name compared case-insensitively (`maxresults`, `timeOut`, ...)."""
    low = name.lower()
    return next((v for k, v in query.items() if k.lower() == low), None)


def base_url(headers: dict[str, str], scheme: str = "http") -> str:
    return f"{scheme}://{headers.get('host', 'localhost')}"


def metadata_url(base: str, entity: str) -> str:
    return f"{base}/$metadata#{entity}"


def std_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """`request-id` on every answer; `client-request-id` echoed when the client asks for it."""
    out = [
        (b"request-id", str(uuid.uuid4()).encode()),
        (b"dataserviceversion", b"3.0"),
    ]
    crid = headers.get("client-request-id")
    if crid and headers.get("return-client-request-id", "").lower() == "true":
        out.append((b"client-request-id", crid.encode("latin-1")))
    return out


def http_date(ts: float) -> str:
    from datetime import UTC, datetime

    return format_datetime(datetime.fromtimestamp(int(ts), UTC), usegmt=True)


def etag_of(view: dict[str, Any]) -> str:
    """A strong validator from the resource's own properties (the counters Azure leaves out of its
    ETag are left out here too): it changes exactly when the resource changes."""
    stable = {k: v for k, v in view.items() if k not in _VOLATILE}
    digest = hashlib.blake2b(_json.encode(stable), digest_size=7).hexdigest().upper()
    return f"0x8D{digest}"


_VOLATILE = frozenset(
    {
        "eTag",
        "lastModified",
        "odata.metadata",
        "currentDedicatedNodes",
        "allocationState",
        "allocationStateTransitionTime",
        "resizeErrors",
        "stats",
        "autoScaleRun",
    }
)


def json_response(
    status: int,
    body: Any,
    headers: dict[str, str],
    *,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> Response:
    hdrs = [(b"content-type", _CONTENT_TYPE), *std_headers(headers), *(extra or [])]
    return Response(status, _json.encode(body) if body is not None else b"", hdrs)


def empty(
    status: int, headers: dict[str, str], extra: list[tuple[bytes, bytes]] | None = None
) -> Response:
    return Response(status, b"", [*std_headers(headers), *(extra or [])])


def resource_headers(etag: str, last_modified: float) -> list[tuple[bytes, bytes]]:
    return [(b"etag", etag.encode()), (b"last-modified", http_date(last_modified).encode())]


def created(headers: dict[str, str], url: str, etag: str, last_modified: float) -> Response:
    """201 with an empty body, `Location` and `DataServiceId` naming the new resource."""
    loc = url.encode()
    return empty(
        201,
        headers,
        [(b"location", loc), (b"dataserviceid", loc), *resource_headers(etag, last_modified)],
    )


def azure_error(exc: ApiError, base: str, headers: dict[str, str]) -> Response:
    code = _CODES.get(exc.code, exc.code)
    if exc.status == 304:  # Not Modified never has a body
        return empty(304, headers)
    body = {
        "odata.metadata": metadata_url(
            base, "Microsoft.Azure.Batch.Protocol.Entities.Container.errors/@Element"
        ),
        "code": code,
        "message": {"lang": "en-us", "value": exc.message},
        "values": [{"key": _KEYS.get(k, k), "value": v} for k, v in exc.values.items()],
    }
    resp = json_response(exc.status, body, headers)
    resp.headers.append((b"x-ms-error-code", code.encode()))  # HEAD answers have no body
    if exc.retry_after is not None:
        resp.headers.append((b"retry-after", str(exc.retry_after).encode()))
    return resp


def invalid(prop: str, value: object, why: str) -> ApiError:
    """400 `InvalidPropertyValue` naming the property, as Azure answers a value it refuses."""
    return ApiError(
        400, "InvalidPropertyValue", why, field=prop, value="" if value is None else value
    )


def _parse_http_date(text: str, name: str) -> float:
    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        raise ApiError(
            400, "InvalidHeaderValue", f"{name} is not an RFC 1123 date: {text!r}", HeaderName=name
        ) from None


def _tags(header: str) -> set[str]:
    """ETags of a conditional header; clients send them quoted (`"0x8D..."`), some bare."""
    return {t.strip().removeprefix("W/").strip('"') for t in header.split(",")}


def check_conditions(
    headers: dict[str, str], etag: str, last_modified: float, *, read: bool
) -> None:
    """Refuse the request when a conditional header does not hold (before any change)."""
    status = 304 if read else 412
    fail = ApiError(status, "ConditionNotMet", "The condition specified was not met.")
    if_match = headers.get("if-match")
    if if_match is not None and if_match.strip() != "*":
        if etag not in _tags(if_match):
            raise ApiError(412, "ConditionNotMet", "The condition specified was not met.")
    if_none = headers.get("if-none-match")
    if if_none is not None:
        tags = _tags(if_none)
        if "*" in tags or etag in tags:
            raise fail
    lm = int(last_modified)
    since = headers.get("if-modified-since")
    if since is not None and lm <= _parse_http_date(since, "If-Modified-Since"):
        raise fail
    unmod = headers.get("if-unmodified-since")
    if unmod is not None and lm > _parse_http_date(unmod, "If-Unmodified-Since"):
        raise ApiError(412, "ConditionNotMet", "The condition specified was not met.")
