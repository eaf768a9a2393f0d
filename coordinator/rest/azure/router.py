"""The Azure Batch routes beside the seed's, on the same port: chosen by `api-version`.

A request carrying `api-version=2024-02-01.19.0` or `2025-06-01` is answered here (Azure's shapes,
codes and headers); any other request goes to the seed's routes exactly as before. A path only the
Azure API has (`/jobs`, `/pools/{id}/nodes`, ...) without a supported api-version is a 400 naming it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from coordinator.common.errors import ApiError, bad_request
from coordinator.rest import paging
from coordinator.rest.dispatch import Dispatcher, Handler, Response

from . import odata
from .conv import API_VERSIONS, azure_error, json_response, metadata_url, query_get

T = TypeVar("T")


def base() -> str:
    scheme, host, _, _ = paging.REQUEST.get(("http", "localhost", "/", ""))
    return f"{scheme}://{host}"


class AzureApi:
    def __init__(self, app: Dispatcher) -> None:
        self.app = app
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []

    def route(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern + "$"), handler))

    def wants(self, query: dict[str, str]) -> bool:
        return query.get("api-version") in API_VERSIONS

    def matches(self, path: str) -> bool:
        return any(p.match(path) for _, p, _ in self._routes)

    def check_version(self, query: dict[str, str]) -> None:
        given = query.get("api-version")
        if given is None:
            raise ApiError(
                400,
                "MissingRequiredQueryParameter",
                "the query parameter api-version is required "
                f"(supported: {', '.join(sorted(API_VERSIONS))})",
                QueryParameterName="api-version",
            )
        raise ApiError(
            400,
            "InvalidQueryParameterValue",
            f"api-version {given!r} is not supported (supported: {', '.join(sorted(API_VERSIONS))})",
            QueryParameterName="api-version",
            QueryParameterValue=given,
        )

    async def handle(
        self, method: str, path: str, body: bytes, query: dict[str, str], headers: dict[str, str]
    ) -> Response:
        check_timeout(query)
        for meth, pattern, handler in self._routes:
            if meth != method:
                continue
            match = pattern.match(path)
            if match:
                return await handler(body=body, query=query, headers=headers, **match.groupdict())
        if any(p.match(path) for _, p, _ in self._routes):
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")
        raise ApiError(
            404, "InvalidUri", f"the requested URI does not represent any resource: {path}"
        )

    def error(self, exc: ApiError, headers: dict[str, str]) -> Response:
        return azure_error(exc, base(), headers)


def check_timeout(query: dict[str, str]) -> None:
    """`timeOut`: accepted (every operation here answers well within it) but must be a number."""
    raw = query_get(query, "timeout")
    if raw is not None and not (raw.strip().isdigit() and int(raw) >= 1):
        raise bad_request(
            "InvalidQueryParameterValue",
            f"timeOut must be a whole number of seconds, got {raw!r}",
            QueryParameterName="timeOut",
            QueryParameterValue=raw,
        )


def listing(
    items: Sequence[T],
    query: dict[str, str],
    headers: dict[str, str],
    *,
    kind: str,
    entity: str,
    key: Callable[[T], str],
    view: Callable[[T], dict[str, Any]],
    view_key: str = "id",
) -> Response:
    """One page of a list: `$filter` over the resources' JSON, `$select`, `maxresults`, and an
    absolute `odata.nextLink` with a skip token (the filter and select stay in the link)."""
    flt_text = query_get(query, "$filter")
    sel_text = query_get(query, "$select")
    exp_text = query_get(query, "$expand")
    flt = odata.parse_filter(flt_text, odata.FILTER_PROPERTIES.get(kind)) if flt_text else None
    sel = odata.parse_select(sel_text) if sel_text else None
    if exp_text:
        odata.parse_expand(exp_text)
    if flt is not None:
        views = [v for v in (view(x) for x in items) if flt(v)]
        chunk, link = paging.page(views, query, lambda v: str(v.get(view_key, "")))
    else:
        page_items, link = paging.page(items, query, key)
        chunk = [view(x) for x in page_items]
    if sel is not None:
        chunk = [sel.apply(v) for v in chunk]
    body: dict[str, Any] = {"odata.metadata": metadata_url(base(), entity), "value": chunk}
    if link is not None:
        body["odata.nextLink"] = link
    return json_response(200, body, headers)


def select_one(view: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
    sel_text = query_get(query, "$select")
    exp_text = query_get(query, "$expand")
    if exp_text:
        odata.parse_expand(exp_text)
    return odata.parse_select(sel_text).apply(view) if sel_text else view
