"""Azure VM size names <-> the local size catalogue (the table is `coordinator.common.vmsizes`)."""

from __future__ import annotations

from typing import Any

from coordinator.common import vmsizes

from .conv import invalid


def local_vm_size(
    name: str, catalogue: dict[str, tuple[int, int, int, str]], prop: str = "vmSize"
) -> str:
    """The local size a pool of Azure size `name` runs as; a local name is taken as it is.
    `prop`: the property's path in the request, for the error."""
    local = vmsizes.to_local(name, catalogue)
    if local is None:
        raise invalid(
            prop,
            name,
            f"unknown vmSize {name!r}: give an Azure size name (e.g. STANDARD_D2S_V3) "
            "or a local one: " + ", ".join(catalogue),
        )
    return local


def azure_vm_size(local: str, catalogue: dict[str, tuple[int, int, int, str]]) -> str:
    return vmsizes.to_azure(local, catalogue)


def supported_images() -> list[dict[str, Any]]:
    return vmsizes.supported_images()
