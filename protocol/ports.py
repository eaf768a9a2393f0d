"""Port-block arithmetic both sides share: a communicating pool has one configured range
(``PortRangeConfig``), cut into blocks of ``per_tvm`` ports; TVM number ``index`` gets block
``index`` (``allocate_tvm_range``). The coordinator allocates blocks, the agent fences them; both
validate a range the same way. The range must stay outside the kernel's ephemeral range so outgoing
connections never take a task's port (read from /proc unless given).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

MIN_PORT = 1100  # below this are well-known/system ports (the seed's rule)
MAX_PORT = 65535
EPHEMERAL_PATH = "/proc/sys/net/ipv4/ip_local_port_range"
LINUX_DEFAULT_EPHEMERAL = (32768, 60999)


# ------------------------------------------------------------------------- ranges


def read_ephemeral_range(path: str = EPHEMERAL_PATH) -> tuple[int, int]:
    """The kernel's ephemeral port range; the Linux default when the file does not exist
    (not Linux, or /proc not mounted)."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except FileNotFoundError:
        return LINUX_DEFAULT_EPHEMERAL
    parts = text.split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"cannot parse the ephemeral port range in {path}: {text.strip()!r}")
    return int(parts[0]), int(parts[1])


@dataclass(frozen=True, slots=True)
class PortRangeConfig:
    """A pool's port range, ``low``..``high`` inclusive, ``per_tvm`` ports per TVM.

    ``ephemeral`` is the kernel range to stay clear of; ``None`` reads it from /proc
    (pass it explicitly to validate for another host, or in tests).
    """

    low: int
    high: int
    per_tvm: int
    ephemeral: tuple[int, int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("low", "high", "per_tvm"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"port range {name} must be an integer, got {value!r}")
        if self.low < MIN_PORT:
            raise ValueError(f"port range low {self.low} is below the minimum {MIN_PORT}")
        if self.high > MAX_PORT:
            raise ValueError(f"port range high {self.high} is above the maximum {MAX_PORT}")
        if self.low > self.high:
            raise ValueError(f"port range low {self.low} is greater than high {self.high}")
        size = self.high - self.low + 1
        if not 1 <= self.per_tvm <= size:
            raise ValueError(
                f"ports per TVM must be between 1 and the range size {size}, got {self.per_tvm}"
            )
        eph = self.ephemeral if self.ephemeral is not None else read_ephemeral_range()
        if self.low <= eph[1] and eph[0] <= self.high:
            raise ValueError(
                f"port range {self.low}-{self.high} overlaps the kernel ephemeral port range "
                f"{eph[0]}-{eph[1]} (net.ipv4.ip_local_port_range); choose a range outside it"
            )
        object.__setattr__(self, "ephemeral", eph)

    @property
    def capacity(self) -> int:
        """How many TVMs can get a block."""
        return (self.high - self.low + 1) // self.per_tvm


def allocate_tvm_range(config: PortRangeConfig, index: int) -> tuple[int, int]:
    """Block ``index`` of the pool range, inclusive bounds. Distinct indices never overlap."""
    if not isinstance(index, int) or not 0 <= index < config.capacity:
        raise ValueError(
            f"port block index {index!r} is out of range: {config.low}-{config.high} holds "
            f"{config.capacity} blocks of {config.per_tvm} ports"
        )
    low = config.low + index * config.per_tvm
    return low, low + config.per_tvm - 1


def first_free_index(config: PortRangeConfig, used: Iterable[int]) -> int:
    """Lowest block index not in ``used`` (the coordinator keeps ``used`` per pool)."""
    taken = set(used)
    for index in range(config.capacity):
        if index not in taken:
            return index
    raise ValueError(
        f"no free port block: all {config.capacity} blocks of {config.per_tvm} ports in "
        f"{config.low}-{config.high} are in use"
    )
