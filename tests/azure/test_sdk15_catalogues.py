"""Catalogues and statistics with Microsoft's `azure-batch` 15.1.0, unmodified, against a real
`tvm up`: supported images (and a `$filter` on verificationType), pool node counts, pool usage
metrics from TVM time, applications (none); and the operations that do not apply to a TVM,
each answered with its documented error code rather than a 404."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from azure.batch import BatchClient
from azure.batch import models as bm
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from tests.azure import sdk15
from tests.azure.sdk15 import idle_nodes, ubuntu_pool, uid

up = sdk15.up_fixture(1)
client = sdk15.client_fixture("module")


@pytest.fixture(scope="module")
def pool(client: BatchClient) -> Iterator[tuple[str, str]]:
    """A pool with one idle node: (pool id, node id)."""
    pool_id = uid("cat-pool")
    client.create_pool(ubuntu_pool(pool_id, 1))
    try:
        nodes = idle_nodes(client, pool_id, 1, "an idle node")
        yield pool_id, str(nodes[0].id)
    finally:
        client.begin_delete_pool(pool_id, polling_interval=1).result()


def _code(exc: pytest.ExceptionInfo[HttpResponseError]) -> tuple[int | None, str | None]:
    return exc.value.status_code, exc.value.error.code if exc.value.error else None


def test_supported_images_and_verification_filter(client: BatchClient) -> None:
    images = list(client.list_supported_images())
    assert images
    assert {i.os_type for i in images} == {bm.OSType.LINUX}
    verified = list(client.list_supported_images(filter="verificationType eq 'verified'"))
    unverified = list(client.list_supported_images(filter="verificationType eq 'unverified'"))
    assert verified
    assert {i.verification_type for i in verified} == {bm.ImageVerificationType.VERIFIED}
    assert all(i.verification_type == bm.ImageVerificationType.UNVERIFIED for i in unverified)
    assert len(verified) + len(unverified) == len(images)
    assert any(i.node_agent_sku_id == "batch.node.ubuntu 22.04" for i in verified)
    with pytest.raises(HttpResponseError) as bad:
        list(client.list_supported_images(filter="verificationType eq"))
    assert _code(bad) == (400, "InvalidQueryParameterValue")


def test_pool_node_counts(client: BatchClient, pool: tuple[str, str]) -> None:
    pool_id, _ = pool
    counts = list(client.list_pool_node_counts(filter=f"poolId eq '{pool_id}'"))
    assert [c.pool_id for c in counts] == [pool_id]
    dedicated = counts[0].dedicated
    assert dedicated is not None
    assert (dedicated.idle, dedicated.total, dedicated.running) == (1, 1, 0)
    low = counts[0].low_priority
    assert low is not None
    assert low.total == 0
    assert pool_id in {c.pool_id for c in client.list_pool_node_counts()}


def test_pool_usage_metrics_from_tvm_time(client: BatchClient, pool: tuple[str, str]) -> None:
    pool_id, _ = pool
    created = client.get_pool(pool_id).creation_time
    assert created is not None
    time.sleep(1.0)  # some TVM time to count
    now = dt.datetime.now(dt.UTC)
    # An end after now asks for the half hour in progress as well, counted up to now.
    rows = [
        r
        for r in client.list_pool_usage_metrics(
            start_time=now - dt.timedelta(hours=1), end_time=now + dt.timedelta(hours=1)
        )
        if r.pool_id == pool_id
    ]
    assert rows
    for r in rows:
        assert r.vm_size == "standard_d2s_v3"
        assert r.end_time - r.start_time == dt.timedelta(minutes=30)
        assert r.start_time.minute in (0, 30)
        assert r.start_time.second == 0
    filtered = list(
        client.list_pool_usage_metrics(
            start_time=now - dt.timedelta(hours=1),
            end_time=now + dt.timedelta(hours=1),
            filter=f"poolId eq '{pool_id}'",
        )
    )
    assert {r.pool_id for r in filtered} == {pool_id}
    hours = sum(r.total_core_hours for r in rows)
    elapsed = (dt.datetime.now(dt.UTC) - created).total_seconds() / 3600
    assert 0 < hours <= 64 * elapsed  # no more cores than the biggest local size, for as long
    # Without times: only the last complete half hour (which this young pool may not have).
    last = list(client.list_pool_usage_metrics())
    assert len({r.start_time for r in last}) <= 1
    with pytest.raises(HttpResponseError) as bad:
        list(client.list_pool_usage_metrics(start_time=now, end_time=now - dt.timedelta(hours=1)))
    assert _code(bad) == (400, "InvalidQueryParameterValue")


def test_applications_are_an_empty_catalogue(client: BatchClient) -> None:
    assert list(client.list_applications()) == []
    with pytest.raises(ResourceNotFoundError) as nf:
        client.get_application("no-such-app")
    assert _code(nf) == (404, "ApplicationNotFound")


def test_operations_that_do_not_apply_answer_with_codes(
    client: BatchClient, pool: tuple[str, str]
) -> None:
    pool_id, node = pool
    calls: list[tuple[Callable[[], Any], str]] = [
        (
            lambda: client.begin_start_node(pool_id, node, polling_interval=1).result(),
            "OperationInvalidForCurrentState",
        ),
        (
            lambda: client.begin_deallocate_node(
                pool_id,
                node,
                # without options this SDK version fails before sending (no content type)
                bm._models.BatchNodeDeallocateOptions(node_deallocate_option="requeue"),
                polling_interval=1,
            ).result(),
            "OperationInvalidForCurrentState",
        ),
        (
            lambda: client.upload_node_logs(
                pool_id,
                node,
                bm.UploadBatchServiceLogsOptions(
                    container_url="https://example.invalid/c", start_time=dt.datetime.now(dt.UTC)
                ),
            ),
            "InvalidRestAPIForAccountSetting",
        ),
        (
            lambda: list(client.list_node_extensions(pool_id, node)),
            "InvalidRestAPIForAccountSetting",
        ),
        (
            lambda: client.get_node_extension(pool_id, node, "CustomScript"),
            "InvalidRestAPIForAccountSetting",
        ),
    ]
    for call, code in calls:
        with pytest.raises(HttpResponseError) as exc:
            call()
        assert _code(exc) == (409, code)
        assert exc.value.error is not None
        assert exc.value.error.message
    # The node is untouched by all of that.
    assert client.get_node(pool_id, node).state == bm.BatchNodeState.IDLE
    with pytest.raises(ResourceNotFoundError) as nf:
        client.begin_start_node(pool_id, "no-such-node", polling_interval=1).result()
    assert _code(nf) == (404, "NodeNotFound")
