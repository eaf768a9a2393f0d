"""A network namespace joined to the host by a veth pair, and an nftables table inside it that cuts
the link to the host (drop or reject; inbound, outbound or both). Names carry the pid and a counter
(host-global: other runs on this host use their own); `close()` removes all of it."""

from __future__ import annotations

import ipaddress
import itertools
import os
import random
import shutil
import subprocess

_seq = itertools.count()


def unavailable() -> str | None:
    """Why namespaces and nftables cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces and nftables need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2 / nftables)"
    probe = f"tvrprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` failed: {r.stderr.strip()}"
    try:
        r = subprocess.run(
            ["ip", "netns", "exec", probe, "nft", "list", "tables"], capture_output=True, text=True
        )
        if r.returncode != 0:
            return f"nft does not work in a namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*cmd: str, stdin: str | None = None) -> None:
    r = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


def _taken() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


class Netns:
    """`ip netns` NAME with lo up and a veth to the host: host end HOST_IP, namespace end NS_IP."""

    def __init__(self) -> None:
        n = next(_seq)
        pid = os.getpid()
        self.name = f"tvrel{pid}n{n}"
        self.host_if = f"tvr{pid}h{n}"[:15]
        self.ns_if = f"tvr{pid}p{n}"[:15]
        self.table = f"tvmcut{pid}n{n}"
        taken = _taken()
        rng = random.Random(pid * 1000 + n)
        for _ in range(1000):
            net = ipaddress.ip_network(
                f"10.{rng.randrange(64, 250)}.{rng.randrange(256)}.{rng.randrange(64) * 4}/30"
            )
            if not any(net.overlaps(t) for t in taken):
                break
        hosts = list(net.hosts())
        self.host_ip, self.ns_ip = str(hosts[0]), str(hosts[1])
        self._made: list[str] = []
        try:
            _run("ip", "netns", "add", self.name)
            self._made.append("netns")
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self._made.append("veth")
            _run("ip", "link", "set", self.ns_if, "netns", self.name)
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            _run("ip", "-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
            _run("ip", "-n", self.name, "link", "set", self.ns_if, "up")
            _run("ip", "-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @property
    def prefix(self) -> list[str]:
        """Run a command inside: `[*ns.prefix, cmd...]`."""
        return ["ip", "netns", "exec", self.name]

    def cut(self, action: str, direction: str) -> None:
        """Cut the namespace's link to the host: `action` drop|reject, `direction` in (host to
        namespace), out (namespace to host) or both."""
        if action not in ("drop", "reject"):
            raise ValueError(f"action {action!r}: drop or reject")
        if direction not in ("in", "out", "both"):
            raise ValueError(f"direction {direction!r}: in, out or both")
        # A TCP reset for TCP (the connection fails at once), ICMP for the rest.
        verdict = "drop" if action == "drop" else "meta l4proto tcp reject with tcp reset; reject"
        rules = []
        if direction in ("in", "both"):
            rules.append(("input", f'iifname "{self.ns_if}" ip saddr {self.host_ip}'))
        if direction in ("out", "both"):
            rules.append(("output", f'oifname "{self.ns_if}" ip daddr {self.host_ip}'))
        lines = [f"table inet {self.table} {{"]
        for hook, match in rules:
            lines.append(f"  chain {hook} {{ type filter hook {hook} priority -10; policy accept;")
            for v in verdict.split("; "):
                lines.append(f"    {match} {v}")
            lines.append("  }")
        lines.append("}")
        _run(*self.prefix, "nft", "-f", "-", stdin="\n".join(lines) + "\n")
        self._made.append("table")

    def heal(self) -> None:
        if "table" in self._made:
            _run(*self.prefix, "nft", "delete", "table", "inet", self.table)
            self._made.remove("table")

    def close(self) -> None:
        if "table" in self._made:
            subprocess.run(
                [*self.prefix, "nft", "delete", "table", "inet", self.table], capture_output=True
            )
        if "veth" in self._made:
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)
        if "netns" in self._made:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        self._made.clear()
