"""Host facts and resource samples read from /proc (for registration and autoscale metrics)."""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass

from protocol.hostio import primary_ip


def _mem_total() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def host_facts(root: str) -> dict[str, object]:
    return {
        "hostname": socket.gethostname(),
        "ip_address": os.environ.get("TVM_AGENT_IP") or primary_ip(),
        "cores": os.cpu_count() or 1,
        "memory_bytes": _mem_total(),
        "disk_bytes": shutil.disk_usage(root).total,
    }


@dataclass
class Sample:
    cpu_percent: float = 0.0
    memory_used: int = 0
    disk_used: int = 0
    net_rx: int = 0
    net_tx: int = 0


class HostSampler:
    def __init__(self, root: str) -> None:
        self.root = root
        self._last_cpu: tuple[int, int] | None = None

    def _cpu(self) -> float:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return 0.0
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        total = sum(fields)
        prev, self._last_cpu = self._last_cpu, (idle, total)
        if prev is None or total == prev[1]:
            return 0.0
        return max(0.0, min(100.0, 100.0 * (1 - (idle - prev[0]) / (total - prev[1]))))

    def sample(self) -> Sample:
        s = Sample(cpu_percent=self._cpu())
        try:
            with open("/proc/meminfo") as f:
                info = {
                    line.split(":")[0]: int(line.split()[1]) * 1024
                    for line in f
                    if line.split()[1:]
                }
            s.memory_used = info.get("MemTotal", 0) - info.get("MemAvailable", 0)
        except (OSError, ValueError):
            pass
        try:
            s.disk_used = shutil.disk_usage(self.root).used
        except OSError:
            pass
        try:
            with open("/proc/net/dev") as f:
                for line in f.readlines()[2:]:
                    name, data = line.split(":", 1)
                    if name.strip() == "lo":
                        continue
                    cols = data.split()
                    s.net_rx += int(cols[0])
                    s.net_tx += int(cols[8])
        except (OSError, ValueError, IndexError):
            pass
        return s
