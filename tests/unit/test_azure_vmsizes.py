"""Azure VM size names onto the local catalogue and back; the /supportedimages catalogue."""

from __future__ import annotations

from typing import Any

import pytest

from coordinator.common.errors import ApiError
from coordinator.common.vmsizes import (
    AZURE_VM_SIZES,
    NODE_AGENT_SKUS,
    SUPPORTED_IMAGES,
    azure_size,
    check_image,
    max_task_slots,
    normal_sku,
    supported_images,
    to_azure,
    to_local,
)
from coordinator.core.records import VM_SIZES

# The catalogue as Store.vm_sizes() gives it: the built-ins plus a registered agent's real size.
LOCAL: dict[str, tuple[int, int, int, str]] = {k: (*v, "builtin") for k, v in VM_SIZES.items()}
WITH_AGENT = {**LOCAL, "native-2c-16000m": (2, 16000, 0, "agent")}


@pytest.mark.parametrize(
    ("name", "cores", "memory_gib"),
    [
        ("STANDARD_D2S_V3", 2, 8),
        ("standard_d2_v2", 2, 7),
        ("Standard_A1_v2", 1, 2),
        ("Standard_DS3_v2", 4, 14),
        ("Standard_D4ds_v5", 4, 16),
        ("Standard_E8s_v3", 8, 64),
        ("Standard_E64_v3", 64, 432),
        ("Standard_F4s_v2", 4, 8),
        ("Standard_F2", 2, 4),
        ("Standard_B2ms", 2, 8),
        ("Standard_B1ls", 1, 0.5),
        ("standard_a1", 1, 1.75),
        ("  Standard_D2s_v3 ", 2, 8),
    ],
)
def test_azure_sizes_case_insensitive(name: str, cores: int, memory_gib: float) -> None:
    size = azure_size(name)
    assert size is not None
    assert size.cores == cores
    assert size.memory_mib == int(memory_gib * 1024)
    assert max_task_slots(size.cores) == min(4 * cores, 256)


def test_unknown_sizes() -> None:
    assert azure_size("Standard_Z99_v9") is None
    assert azure_size("") is None
    assert azure_size(5) is None  # type: ignore[arg-type]
    assert to_local("Standard_Z99_v9", LOCAL) is None
    assert to_local(None, LOCAL) is None  # type: ignore[arg-type]
    assert to_local("Standard_D2s_v3", {}) is None


def test_table_is_consistent() -> None:
    assert len(AZURE_VM_SIZES) > 200
    for key, size in AZURE_VM_SIZES.items():
        assert key == size.name.lower()
        assert size.cores >= 1
        assert size.memory_mib >= 512
    # the seed's sizes are the classic A1..A4 exactly
    for local, azure in (("small", "a1"), ("medium", "a2"), ("large", "a3"), ("extralarge", "a4")):
        s = AZURE_VM_SIZES["standard_" + azure]
        assert (s.cores, s.memory_mib) == VM_SIZES[local][:2]


@pytest.mark.parametrize(
    ("azure", "local"),
    [
        ("Standard_A1", "small"),
        ("Standard_A2", "medium"),
        ("Standard_A3", "large"),
        ("Standard_A4", "extralarge"),
        ("Standard_B1s", "small"),  # 1 core 1 GiB fits in small
        ("Standard_A1_v2", "medium"),  # 2 GiB does not fit small's 1.75 GiB
        ("standard_d2_v2", "large"),  # 2 cores 7 GiB: large (4 cores 7 GiB) is the first to fit
        ("STANDARD_D2S_V3", "extralarge"),
        ("Standard_E64s_v3", "extralarge"),  # bigger than all: the biggest
        ("medium", "medium"),  # a local name is itself, any case
        ("LARGE", "large"),
    ],
)
def test_to_local_picks_the_smallest_covering_size(azure: str, local: str) -> None:
    assert to_local(azure, LOCAL) == local


def test_to_local_uses_agent_sizes() -> None:
    # a registered 2-core 16 GB machine covers D2s_v3 and comes before the 4-core built-in
    assert to_local("Standard_D2s_v3", WITH_AGENT) == "native-2c-16000m"
    assert to_local("Standard_D4s_v3", WITH_AGENT) == "extralarge"


@pytest.mark.parametrize(
    ("local", "azure"),
    [
        ("small", "standard_a1"),
        ("medium", "standard_a2"),
        ("large", "standard_a3"),
        ("extralarge", "standard_a4"),
        ("native-2c-16000m", "standard_a2m_v2"),
        ("Standard_D2s_v3", "standard_d2s_v3"),  # already Azure: echoed lower-case
        ("unknown-size", "unknown-size"),
    ],
)
def test_to_azure(local: str, azure: str) -> None:
    assert to_azure(local, WITH_AGENT) == azure


def test_to_azure_round_trips_through_to_local() -> None:
    for local in LOCAL:
        assert to_local(to_azure(local, LOCAL), LOCAL) == local
    huge = {"native-512c-9000000m": (512, 9_000_000, 0, "agent")}
    assert to_azure("native-512c-9000000m", huge) == "native-512c-9000000m"


def test_supported_images_shape() -> None:
    images = supported_images()
    assert len(images) == len(SUPPORTED_IMAGES) >= 8
    keys = {"nodeAgentSKUId", "imageReference", "osType", "capabilities", "verificationType"}
    for img in images:
        assert keys <= set(img)
        assert set(img) <= keys | {"batchSupportEndOfLife"}
        assert img["osType"] == "linux"
        assert img["verificationType"] in ("verified", "unverified")
        assert img["nodeAgentSKUId"].startswith("batch.node.")
        assert set(img["imageReference"]) == {"publisher", "offer", "sku", "version"}
    skus = {i["nodeAgentSKUId"] for i in images}
    assert {"batch.node.ubuntu 20.04", "batch.node.ubuntu 22.04", "batch.node.el 9"} <= skus
    assert skus == NODE_AGENT_SKUS
    # callers get a copy: changing it does not change the catalogue
    images[0]["imageReference"]["sku"] = "changed"
    images[0]["capabilities"].append("x")
    assert supported_images()[0]["imageReference"]["sku"] != "changed"
    assert supported_images()[0]["capabilities"] == []


def _ubuntu() -> dict[str, Any]:
    return {
        "publisher": "Canonical",
        "offer": "0001-com-ubuntu-server-focal",
        "sku": "20_04-lts",
        "version": "latest",
    }


def test_check_image_accepts_linux() -> None:
    check_image(_ubuntu(), "batch.node.ubuntu 20.04")
    check_image(_ubuntu(), "Batch.Node.Ubuntu  20.04")
    check_image({"virtualMachineImageId": "/subscriptions/x/images/y"}, "batch.node.el 9")
    check_image(
        {"publisher": "almalinux", "offer": "almalinux-x86_64", "sku": "9-gen2"}, "batch.node.el 9"
    )
    assert normal_sku(" Batch.Node.Ubuntu   22.04 ") == "batch.node.ubuntu 22.04"


@pytest.mark.parametrize(
    ("ref", "sku", "code", "prop"),
    [
        (_ubuntu(), "batch.node.windows amd64", "InvalidPropertyValue", "nodeAgentSKUId"),
        (_ubuntu(), "batch.node.centos 6", "InvalidPropertyValue", "nodeAgentSKUId"),
        (_ubuntu(), None, "MissingRequiredProperty", "nodeAgentSKUId"),
        (_ubuntu(), "  ", "MissingRequiredProperty", "nodeAgentSKUId"),
        (_ubuntu(), 7, "InvalidPropertyValue", "nodeAgentSKUId"),
        (None, "batch.node.ubuntu 20.04", "MissingRequiredProperty", "imageReference"),
        ("ubuntu", "batch.node.ubuntu 20.04", "InvalidPropertyValue", "imageReference"),
        (
            {"publisher": "MicrosoftWindowsServer", "offer": "WindowsServer", "sku": "2019"},
            "batch.node.ubuntu 20.04",
            "InvalidPropertyValue",
            "imageReference.publisher",
        ),
        (
            {"publisher": "Canonical", "offer": "x"},
            "batch.node.ubuntu 20.04",
            "InvalidPropertyValue",
            "imageReference.sku",
        ),
    ],
)
def test_check_image_refuses_with_the_property(ref: Any, sku: Any, code: str, prop: str) -> None:
    with pytest.raises(ApiError) as e:
        check_image(ref, sku)
    assert e.value.status == 400
    assert e.value.code == code
    assert e.value.values["PropertyName"] == "virtualMachineConfiguration." + prop
    assert prop in e.value.message
