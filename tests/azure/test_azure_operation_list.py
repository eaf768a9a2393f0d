"""Every operation of the Azure Batch data-plane specification is routed: answered by a handler
(a result, or an Azure error code such as `PoolNotFound`, `OperationInvalidForCurrentState`,
`InvalidRestAPIForAccountSetting`), never the router's `InvalidUri` 404 or `MethodNotAllowed` 405.

The list is the specification's (Azure/azure-rest-api-specs, data-plane Batch, 2025-06-01: the
operations azure-batch 15.1.0 is generated from), plus what the 14.x SDK adds on 2024-02-01.19.0
(certificates, the Windows-only `rdp`). The README's conformance table says what each one does.
"""

from __future__ import annotations

import pytest

from tests.azure.wire import AV
from tests.integration.test_rest_bad_input import Raw, raw_cluster

P = "/pools/nopool"
N = P + "/nodes/nonode"
J = "/jobs/nojob"
T = J + "/tasks/notask"
S = "/jobschedules/nosched"
CERT = "/certificates(thumbprintAlgorithm=sha1,thumbprint=" + "ab" * 20 + ")"

OPERATIONS_2025 = [
    ("GET", "/applications"),
    ("GET", "/applications/noapp"),
    ("GET", "/poolusagemetrics"),
    ("POST", "/pools"),
    ("GET", "/pools"),
    ("DELETE", P),
    ("HEAD", P),
    ("GET", P),
    ("PATCH", P),
    ("POST", P + "/disableautoscale"),
    ("POST", P + "/enableautoscale"),
    ("POST", P + "/evaluateautoscale"),
    ("POST", P + "/resize"),
    ("POST", P + "/stopresize"),
    ("POST", P + "/updateproperties"),
    ("POST", P + "/removenodes"),
    ("GET", "/supportedimages"),
    ("GET", "/nodecounts"),
    ("DELETE", J),
    ("GET", J),
    ("PATCH", J),
    ("PUT", J),
    ("POST", J + "/disable"),
    ("POST", J + "/enable"),
    ("POST", J + "/terminate"),
    ("POST", "/jobs"),
    ("GET", "/jobs"),
    ("GET", J + "/taskcounts"),
    ("POST", J + "/tasks"),
    ("GET", J + "/tasks"),
    ("POST", J + "/addtaskcollection"),
    ("DELETE", T),
    ("GET", T),
    ("PUT", T),
    ("GET", T + "/subtasksinfo"),
    ("POST", T + "/terminate"),
    ("POST", T + "/reactivate"),
    ("DELETE", T + "/files/stdout.txt"),
    ("GET", T + "/files/stdout.txt"),
    ("HEAD", T + "/files/stdout.txt"),
    ("GET", T + "/files"),
    ("POST", N + "/users"),
    ("DELETE", N + "/users/someone"),
    ("PUT", N + "/users/someone"),
    ("GET", N),
    ("POST", N + "/reboot"),
    ("POST", N + "/start"),
    ("POST", N + "/reimage"),
    ("POST", N + "/deallocate"),
    ("POST", N + "/disablescheduling"),
    ("POST", N + "/enablescheduling"),
    ("GET", N + "/remoteloginsettings"),
    ("POST", N + "/uploadbatchservicelogs"),
    ("GET", P + "/nodes"),
    ("GET", N + "/extensions/CustomScript"),
    ("GET", N + "/extensions"),
    ("DELETE", N + "/files/startup/stdout.txt"),
    ("GET", N + "/files/startup/stdout.txt"),
    ("HEAD", N + "/files/startup/stdout.txt"),
    ("GET", N + "/files"),
    ("POST", "/jobschedules"),
    ("GET", "/jobschedules"),
    ("HEAD", S),
    ("GET", S),
    ("PATCH", S),
    ("PUT", S),
    ("DELETE", S),
    ("POST", S + "/disable"),
    ("POST", S + "/enable"),
    ("POST", S + "/terminate"),
    ("GET", S + "/jobs"),
]
OPERATIONS_14 = [
    ("POST", "/certificates"),
    ("GET", "/certificates"),
    ("GET", CERT),
    ("DELETE", CERT),
    ("POST", CERT + "/canceldelete"),
    ("GET", N + "/rdp"),
]


@pytest.fixture
async def api(nursery, tmp_path):
    async with raw_cluster(nursery, tmp_path, agents=0) as (_, raw):
        yield raw


async def test_every_operation_is_routed(api: Raw) -> None:
    unrouted = []
    for version, ops in ((AV, OPERATIONS_2025), ("api-version=2024-02-01.19.0", OPERATIONS_14)):
        for method, path in ops:
            body = {} if method in ("POST", "PUT", "PATCH") else None
            r = await api(method, path, body, query=version)
            code = r.headers.get("x-ms-error-code", "")
            if (
                code in ("InvalidUri", "MethodNotAllowed")
                or r.status_code in (404, 405)
                and not code
            ):
                unrouted.append(f"{method} {path}: {r.status_code} {code}")
    assert unrouted == []
