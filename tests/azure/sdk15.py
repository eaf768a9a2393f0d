"""Shared pieces of the tests that drive Microsoft's `azure-batch` 15.1.0, unmodified, against a
real `tvm up`: the `up` and `client` fixtures, unique ids, a polling wait, the Ubuntu pool the
Azure quickstart creates, and the wait for a pool's nodes to be idle."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from azure.batch import BatchClient
from azure.batch import models as bm
from azure.core.credentials import AzureNamedKeyCredential

from tests.tvmup import TvmUp, tvm_up


def up_fixture(agents: int) -> Any:
    """A module's `up` fixture: one `tvm up` with `agents` agents for all its tests."""

    @pytest.fixture(scope="module")
    def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TvmUp]:
        with tvm_up(Path(tmp_path_factory.mktemp("tvmup")), agents) as t:
            yield t

    return up


def batch_client(up: TvmUp) -> BatchClient:
    return BatchClient(up.endpoint, AzureNamedKeyCredential(up.account, up.key))


def client_fixture(scope: Literal["function", "module"] = "function") -> Any:
    """A module's `client` fixture: a `BatchClient` on its `up`, closed after use."""

    @pytest.fixture(scope=scope)
    def client(up: TvmUp) -> Iterator[BatchClient]:
        c = batch_client(up)
        yield c
        c.close()

    return client


def uid(prefix: str) -> str:
    """An id no concurrent run on this host takes."""
    return f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def wait(cond: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll `cond` until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def ubuntu_pool(pool_id: str, nodes: int = 0, **kw: Any) -> bm.BatchPoolCreateOptions:
    """The pool of Azure's quickstart: Ubuntu 22.04 on STANDARD_D2S_V3."""
    return bm.BatchPoolCreateOptions(
        id=pool_id,
        vm_size="STANDARD_D2S_V3",
        target_dedicated_nodes=nodes,
        virtual_machine_configuration=bm.VirtualMachineConfiguration(
            image_reference=bm.BatchVmImageReference(
                publisher="canonical",
                offer="0001-com-ubuntu-server-jammy",
                sku="22_04-lts",
                version="latest",
            ),
            node_agent_sku_id="batch.node.ubuntu 22.04",
        ),
        **kw,
    )


def idle_nodes(client: BatchClient, pool_id: str, nodes: int, what: str) -> list[bm.BatchNode]:
    """Wait until the pool lists `nodes` nodes, all idle, and return them."""

    def idle() -> list[bm.BatchNode] | None:
        got = list(client.list_nodes(pool_id))
        ok = len(got) == nodes and all(n.state == bm.BatchNodeState.IDLE for n in got)
        return got if ok else None

    result: list[bm.BatchNode] = wait(idle, what)
    return result
