"""Shared pieces of the raw-HTTP Azure route tests."""

from __future__ import annotations

from typing import Any

import httpx2

AV = "api-version=2025-06-01"
IMAGE = {
    "imageReference": {"publisher": "canonical", "offer": "ubuntu-24_04-lts", "sku": "server"},
    "nodeAgentSKUId": "batch.node.ubuntu 24.04",
}


def pool_body(pool_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": pool_id,
        "vmSize": "Standard_D2s_v3",
        "virtualMachineConfiguration": dict(IMAGE),
        "targetDedicatedNodes": 0,
        **extra,
    }


def azure_err(r: httpx2.Response, status: int, code: str, prop: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert body["code"] == code, body
    assert body["odata.metadata"].endswith(
        "/$metadata#Microsoft.Azure.Batch.Protocol.Entities.Container.errors/@Element"
    )
    assert body["message"]["lang"] == "en-us"
    assert body["message"]["value"]
    values = {v["key"]: v["value"] for v in body.get("values", [])}
    if prop is not None:
        assert values.get("PropertyName") == prop, body
    assert r.headers["request-id"]
    return body
