"""List paging: `maxresults` (1..1,000, default 1,000) and `odata.nextLink` with an opaque `$skiptoken`.

Without it a job of 100k tasks answered 32 MB in one body, built on the event loop. A page is cut
from the resource's records first; only the page is turned into wire views. Lists keep their
creation order; the token names the last item sent (and its position), so the next page resumes
right after it even when earlier items were deleted meanwhile.
"""

from __future__ import annotations

import base64
import contextvars
import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode

from coordinator.common.errors import bad_request

T = TypeVar("T")
MAX_RESULTS = 1000
SKIP_TOKEN = "$skiptoken"

# (scheme, host, path, raw query) of the request being answered; set by the HTTP entry point so a
# handler can build its nextLink without every route passing them along.
REQUEST: contextvars.ContextVar[tuple[str, str, str, str]] = contextvars.ContextVar("tvm_request")


def max_results(query: dict[str, str]) -> int:
    raw = next((v for k, v in query.items() if k.lower() == "maxresults"), None)
    if raw is None:
        return MAX_RESULTS
    try:
        n = int(raw.strip())
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_RESULTS or not raw.strip().isdigit():
        raise bad_request(
            "InvalidQueryParameterValue",
            f"maxresults must be a whole number from 1 to {MAX_RESULTS}, got {raw!r}",
            field="maxresults",
            value=raw,
        )
    return n


def _encode_token(offset: int, last: str) -> str:
    raw = json.dumps({"o": offset, "k": last}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str) -> tuple[int, str]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset, last = data["o"], data["k"]
        if not isinstance(offset, int) or offset < 0 or not isinstance(last, str):
            raise ValueError
        return offset, last
    except (ValueError, TypeError, KeyError, RecursionError):
        raise bad_request(
            "InvalidQueryParameterValue",
            f"{SKIP_TOKEN} is not a token this service handed out (take it from odata.nextLink)",
            field=SKIP_TOKEN,
        ) from None


def _start(items: Sequence[T], key: Callable[[T], str], offset: int, last: str) -> int:
    if 0 < offset <= len(items) and key(items[offset - 1]) == last:
        return offset
    for i, item in enumerate(
        items
    ):  # earlier items were deleted (or added): find the last one sent
        if key(item) == last:
            return i + 1
    return min(offset, len(items))  # the last item sent is gone too: resume at its position


def page(
    items: Sequence[T], query: dict[str, str], key: Callable[[T], str]
) -> tuple[list[T], str | None]:
    """The page of `items` this request asks for, and the nextLink to the following one (or None)."""
    limit = max_results(query)
    token = query.get(SKIP_TOKEN)
    start = _start(items, key, *_decode_token(token)) if token else 0
    chunk = list(items[start : start + limit])
    if start + limit >= len(items) or not chunk:
        return chunk, None
    return chunk, _next_link(_encode_token(start + len(chunk), key(chunk[-1])))


def _next_link(token: str) -> str:
    scheme, host, path, raw_query = REQUEST.get(("http", "localhost", "/", ""))
    params = [(k, v) for k, v in parse_qsl(raw_query, keep_blank_values=True) if k != SKIP_TOKEN]
    params.append((SKIP_TOKEN, token))
    return f"{scheme}://{host}{path}?{urlencode(params)}"


def listing(
    items: Sequence[T], query: dict[str, str], key: Callable[[T], str], view: Callable[[T], Any]
) -> dict[str, Any]:
    """The list body: `{"value": [...], "odata.nextLink": ...}` (the link only when more follow)."""
    chunk, link = page(items, query, key)
    body: dict[str, Any] = {"value": [view(x) for x in chunk]}
    if link is not None:
        body["odata.nextLink"] = link
    return body
