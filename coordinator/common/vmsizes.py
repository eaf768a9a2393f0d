"""Azure VM size names and the Linux images the agents stand in for (the Azure Batch API's view).

Pure data and lookups. A pool created through the Azure API names an Azure size
(`STANDARD_D2S_V3`, `standard_d2_v2`, `Standard_A1_v2`, ...; case-insensitive as the service is);
`to_local` maps it by cores and memory onto the coordinator's own catalogue (`small`, `medium`,
`large`, `extralarge` and each agent's real size), `to_azure` goes back for echoing a pool that was
created with a local size. `SUPPORTED_IMAGES` is the fixed `/supportedimages` catalogue in the
2025-06-01 shape; `check_image` refuses what the agents cannot stand in for (Windows) with a 400
`InvalidPropertyValue` naming the property.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ApiError


@dataclass(frozen=True, slots=True)
class AzureVmSize:
    name: str  # as Azure spells it, e.g. Standard_D2s_v3
    cores: int
    memory_mib: int


def _gib(x: float) -> int:
    return int(x * 1024)


def _series(
    pattern: str, rows: Iterable[tuple[int | str, int, float]]
) -> list[tuple[str, int, int]]:
    """`pattern` with `{}` replaced by each row's size number: (name, cores, memory MiB)."""
    return [(pattern.format(n), cores, _gib(mem)) for n, cores, mem in rows]


def _ratio(
    patterns: Sequence[str], counts: Iterable[int], gib_per_core: float
) -> list[tuple[str, int, int]]:
    """A family whose size number is its core count and memory a fixed multiple of it."""
    counts = list(counts)
    return [(p.format(c), c, _gib(c * gib_per_core)) for p in patterns for c in counts]


_D_V2: list[tuple[int | str, int, float]] = [
    (1, 1, 3.5),
    (2, 2, 7),
    (3, 4, 14),
    (4, 8, 28),
    (5, 16, 56),
]
_D_V2_MEM: list[tuple[int | str, int, float]] = [
    (11, 2, 14),
    (12, 4, 28),
    (13, 8, 56),
    (14, 16, 112),
    (15, 20, 140),
]
_F_V1: list[tuple[int | str, int, float]] = [
    (1, 1, 2),
    (2, 2, 4),
    (4, 4, 8),
    (8, 8, 16),
    (16, 16, 32),
]
_B: list[tuple[int | str, int, float]] = [
    ("1ls", 1, 0.5),
    ("1s", 1, 1),
    ("1ms", 1, 2),
    ("2s", 2, 4),
    ("2ms", 2, 8),
    ("4ms", 4, 16),
    ("8ms", 8, 32),
    ("12ms", 12, 48),
    ("16ms", 16, 64),
    ("20ms", 20, 80),
]
_E_COUNTS = (2, 4, 8, 16, 20, 32, 48, 64)

_ROWS: list[tuple[str, int, int]] = [
    # Classic names (Cloud Services era) and the A-series they equal; the seed's own sizes
    # (small..extralarge) are exactly A1..A4.
    ("ExtraSmall", 1, 768),
    ("Standard_A0", 1, 768),
    ("Standard_A1", 1, 1792),
    ("Standard_A2", 2, 3584),
    ("Standard_A3", 4, 7168),
    ("Standard_A4", 8, 14336),
    ("Standard_A5", 2, 14336),
    ("Standard_A6", 4, 28672),
    ("Standard_A7", 8, 57344),
    ("Basic_A0", 1, 768),
    ("Basic_A1", 1, 1792),
    ("Basic_A2", 2, 3584),
    ("Basic_A3", 4, 7168),
    ("Basic_A4", 8, 14336),
    # Av2
    ("Standard_A1_v2", 1, _gib(2)),
    ("Standard_A2_v2", 2, _gib(4)),
    ("Standard_A4_v2", 4, _gib(8)),
    ("Standard_A8_v2", 8, _gib(16)),
    ("Standard_A2m_v2", 2, _gib(16)),
    ("Standard_A4m_v2", 4, _gib(32)),
    ("Standard_A8m_v2", 8, _gib(64)),
    # D / DS v1 and v2
    *_series("Standard_D{}", _D_V2[:4]),
    *_series("Standard_DS{}", _D_V2[:4]),
    *_series("Standard_D{}", _D_V2_MEM[:4]),
    *_series("Standard_DS{}", _D_V2_MEM[:4]),
    *_series("Standard_D{}_v2", _D_V2),
    *_series("Standard_DS{}_v2", _D_V2),
    *_series("Standard_D{}_v2", _D_V2_MEM),
    *_series("Standard_DS{}_v2", _D_V2_MEM),
    # D v3..v5 (4 GiB per core), with their s / d / ds / a / as / ads variants
    *_ratio(("Standard_D{}_v3", "Standard_D{}s_v3"), (2, 4, 8, 16, 32, 48, 64), 4),
    *_ratio(
        (
            "Standard_D{}_v4",
            "Standard_D{}s_v4",
            "Standard_D{}d_v4",
            "Standard_D{}ds_v4",
            "Standard_D{}a_v4",
            "Standard_D{}as_v4",
        ),
        (2, 4, 8, 16, 32, 48, 64),
        4,
    ),
    *_ratio(
        (
            "Standard_D{}_v5",
            "Standard_D{}s_v5",
            "Standard_D{}d_v5",
            "Standard_D{}ds_v5",
            "Standard_D{}as_v5",
            "Standard_D{}ads_v5",
        ),
        (2, 4, 8, 16, 32, 48, 64, 96),
        4,
    ),
    # E v3..v5 (8 GiB per core; E64 v3 is 432 GiB, E64 v4 504 GiB)
    *_ratio(
        ("Standard_E{}_v3", "Standard_E{}s_v3", "Standard_E{}_v4", "Standard_E{}s_v4"),
        _E_COUNTS[:-1],
        8,
    ),
    ("Standard_E64_v3", 64, _gib(432)),
    ("Standard_E64s_v3", 64, _gib(432)),
    ("Standard_E64_v4", 64, _gib(504)),
    ("Standard_E64s_v4", 64, _gib(504)),
    *_ratio(
        (
            "Standard_E{}_v5",
            "Standard_E{}s_v5",
            "Standard_E{}d_v5",
            "Standard_E{}ds_v5",
            "Standard_E{}as_v5",
            "Standard_E{}ads_v5",
        ),
        _E_COUNTS,
        8,
    ),
    # F, Fs (2 GiB per core) and Fs v2
    *_series("Standard_F{}", _F_V1),
    *_series("Standard_F{}s", _F_V1),
    *_ratio(("Standard_F{}s_v2",), (2, 4, 8, 16, 32, 48, 64, 72), 2),
    # B (burstable)
    *_series("Standard_B{}", _B),
]

AZURE_VM_SIZES: dict[str, AzureVmSize] = {
    name.lower(): AzureVmSize(name, cores, mem) for name, cores, mem in _ROWS
}


def azure_size(name: str) -> AzureVmSize | None:
    """The Azure size of this name, any letter case (`STANDARD_D2S_V3`, `standard_d2s_v3`)."""
    if not isinstance(name, str):
        return None
    return AZURE_VM_SIZES.get(name.strip().lower())


def max_task_slots(cores: int) -> int:
    """Azure's limit on `taskSlotsPerNode`: 4 x the size's cores, at most 256."""
    return min(4 * cores, 256)


# The local catalogue as `Store.vm_sizes()` gives it: name -> (cores, memory MiB, ...).
Catalogue = Mapping[str, Sequence[Any]]


def to_local(name: str, catalogue: Catalogue) -> str | None:
    """The local size a pool of this size runs as, or None for a name neither side knows.

    A local name is itself. An Azure size maps to the smallest local size (by cores, then memory)
    with at least its cores and memory, so tasks get at least what Azure would give them and a
    `taskSlotsPerNode` of up to 4 x its cores stays valid; an Azure size bigger than every local
    one maps to the biggest.
    """
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    if key in catalogue:
        return key
    size = AZURE_VM_SIZES.get(key)
    if size is None or not catalogue:
        return None
    ordered = sorted(catalogue.items(), key=lambda kv: (int(kv[1][0]), int(kv[1][1]), kv[0]))
    for local, spec in ordered:
        if int(spec[0]) >= size.cores and int(spec[1]) >= size.memory_mib:
            return local
    return ordered[-1][0]


# The families echoed for local sizes, in order of preference: classic A (the seed's sizes are
# A1..A4 exactly), then Av2, Dsv3 and Esv3.
def _echo_order() -> list[str]:
    classic = [f"standard_a{n}" for n in range(8)]
    av2 = [k for k in AZURE_VM_SIZES if k.startswith("standard_a") and k.endswith("_v2")]
    dsv3 = [k for k in AZURE_VM_SIZES if k.startswith("standard_d") and k.endswith("s_v3")]
    esv3 = [k for k in AZURE_VM_SIZES if k.startswith("standard_e") and k.endswith("s_v3")]
    return classic + av2 + dsv3 + esv3


_ECHO_ORDER = _echo_order()
_ECHO_RANK = {k: i for i, k in enumerate(_ECHO_ORDER)}


def to_azure(local: str, catalogue: Catalogue) -> str:
    """The Azure size name (lower case, as the service echoes it) for a local size: an Azure size
    of exactly its cores and memory if one exists, else the smallest with at least both (from the
    classic A, Av2, Dsv3 and Esv3 families clients know); the name itself when it is already an
    Azure name, unknown, or bigger than them all."""
    key = local.strip().lower()
    if key in AZURE_VM_SIZES:
        return key
    spec = catalogue.get(key)
    if spec is None:
        return key
    cores, memory = int(spec[0]), int(spec[1])
    candidates = [
        AZURE_VM_SIZES[k]
        for k in _ECHO_ORDER
        if AZURE_VM_SIZES[k].cores >= cores and AZURE_VM_SIZES[k].memory_mib >= memory
    ]
    if not candidates:
        return key
    exact = [s for s in candidates if s.cores == cores and s.memory_mib == memory]
    pool = exact or candidates
    best = min(pool, key=lambda s: (s.cores, s.memory_mib, _ECHO_RANK[s.name.lower()]))
    return best.name.lower()


# ------------------------------------------------------------------------------ supported images


def _image(
    sku_id: str,
    publisher: str,
    offer: str,
    sku: str,
    end_of_life: str | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "nodeAgentSKUId": sku_id,
        "imageReference": {"publisher": publisher, "offer": offer, "sku": sku, "version": "latest"},
        "osType": "linux",
        # No container runtime on the agents: DockerCompatible is never claimed.
        "capabilities": [],
        "verificationType": "verified",
    }
    if end_of_life is not None:
        out["batchSupportEndOfLife"] = end_of_life
    return out


# batchSupportEndOfLife: the distribution's end of standard support, where it is past.
_FOCAL_EOL = "2025-04-30T00:00:00Z"
SUPPORTED_IMAGES: tuple[dict[str, Any], ...] = (
    _image(
        "batch.node.ubuntu 20.04",
        "Canonical",
        "0001-com-ubuntu-server-focal",
        "20_04-lts",
        _FOCAL_EOL,
    ),
    _image(
        "batch.node.ubuntu 20.04",
        "microsoft-azure-batch",
        "ubuntu-server-container",
        "20-04-lts",
        _FOCAL_EOL,
    ),
    _image("batch.node.ubuntu 22.04", "Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts"),
    _image(
        "batch.node.ubuntu 22.04", "Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts-gen2"
    ),
    _image("batch.node.ubuntu 24.04", "Canonical", "ubuntu-24_04-lts", "server"),
    _image("batch.node.debian 11", "Debian", "debian-11", "11"),
    _image("batch.node.debian 11", "Debian", "debian-11", "11-gen2"),
    _image("batch.node.debian 12", "Debian", "debian-12", "12"),
    _image("batch.node.debian 12", "Debian", "debian-12", "12-gen2"),
    _image("batch.node.el 8", "almalinux", "almalinux-x86_64", "8-gen2"),
    _image("batch.node.el 9", "almalinux", "almalinux-x86_64", "9-gen2"),
    _image("batch.node.el 9", "resf", "rockylinux-x86_64", "9-base"),
)

NODE_AGENT_SKUS: frozenset[str] = frozenset(i["nodeAgentSKUId"] for i in SUPPORTED_IMAGES)
_WINDOWS_PUBLISHERS = ("microsoftwindowsserver", "microsoftwindowsdesktop", "microsoftvisualstudio")
_CUSTOM_IMAGE_KEYS = ("virtualMachineImageId", "sharedGalleryImageId", "communityGalleryImageId")


def supported_images() -> list[dict[str, Any]]:
    """A fresh copy of the catalogue (callers may filter and project it)."""
    return [
        {**i, "imageReference": dict(i["imageReference"]), "capabilities": list(i["capabilities"])}
        for i in SUPPORTED_IMAGES
    ]


def normal_sku(node_agent_sku_id: str) -> str:
    """The catalogue's spelling of a node agent SKU (lower case, single spaces)."""
    return " ".join(node_agent_sku_id.split()).lower()


def _invalid(prop: str, value: object, reason: str) -> ApiError:
    return ApiError(
        400,
        "InvalidPropertyValue",
        f"The value provided for {prop} is invalid: {reason}",
        PropertyName=prop,
        PropertyValue=value,
    )


def _missing(prop: str) -> ApiError:
    return ApiError(400, "MissingRequiredProperty", f"{prop} is required", PropertyName=prop)


def check_image(
    image_reference: Any,
    node_agent_sku_id: Any,
    prefix: str = "virtualMachineConfiguration",
) -> None:
    """Refuse an image the agents cannot stand in for, naming the property (400
    `InvalidPropertyValue`, or `MissingRequiredProperty`). Any Linux image reference is accepted
    (marketplace, custom or gallery images all run as the agent's own system); the node agent SKU
    must be one of `NODE_AGENT_SKUS`, any letter case."""
    sku_prop = f"{prefix}.nodeAgentSKUId"
    if node_agent_sku_id is None or (
        isinstance(node_agent_sku_id, str) and not node_agent_sku_id.strip()
    ):
        raise _missing(sku_prop)
    if not isinstance(node_agent_sku_id, str):
        raise _invalid(sku_prop, node_agent_sku_id, "must be a string")
    sku = normal_sku(node_agent_sku_id)
    if "windows" in sku:
        raise _invalid(sku_prop, node_agent_sku_id, "Windows nodes are not supported, only Linux")
    if sku not in NODE_AGENT_SKUS:
        raise _invalid(
            sku_prop,
            node_agent_sku_id,
            "unknown node agent SKU; supported: " + ", ".join(sorted(NODE_AGENT_SKUS)),
        )
    ref_prop = f"{prefix}.imageReference"
    if image_reference is None:
        raise _missing(ref_prop)
    if not isinstance(image_reference, Mapping):
        raise _invalid(ref_prop, image_reference, "must be an object")
    publisher = image_reference.get("publisher")
    if isinstance(publisher, str) and publisher.strip().lower() in _WINDOWS_PUBLISHERS:
        raise _invalid(
            f"{ref_prop}.publisher", publisher, "Windows images are not supported, only Linux"
        )
    if any(
        isinstance(image_reference.get(k), str) and image_reference[k] for k in _CUSTOM_IMAGE_KEYS
    ):
        return
    for key in ("publisher", "offer", "sku"):
        value = image_reference.get(key)
        if not isinstance(value, str) or not value.strip():
            raise _invalid(
                f"{ref_prop}.{key}",
                value,
                "give publisher, offer and sku, or virtualMachineImageId",
            )
