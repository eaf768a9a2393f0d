"""Intra-pool port fences: the nftables "pool members only" fence, and a user-space gate for
nodes where nftables cannot be used. (The blocks themselves, ``PortRangeConfig`` and
``allocate_tvm_range``, are protocol/ports.py: the coordinator allocates what the agent fences.)

* As root, the agent keeps its own nftables table (``inet <table>``) that resets TCP and
  drops UDP to the TVM's block from any source that is not a pool member. Loopback traffic
  is allowed: the fence is against the network, local isolation is the sandbox's job.
  The whole table is replaced in one ``nft -f`` transaction on each membership change.
* Without nftables, ``PortGate`` does the same in user space (see its docstring for the
  exact scheme). It costs a proxy hop; it is a fallback.

``render_nft_ruleset`` and ``parse_members`` are pure. The nft
functions block (subprocess); call them from ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio

from protocol.ports import MAX_PORT

_TABLE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_NFT_TIMEOUT = 30.0

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# ----------------------------------------------------------------------- members


def parse_members(members: Iterable[str], version: int | None = None) -> list[IPNetwork]:
    """Addresses or CIDR networks, collapsed (nft interval sets refuse overlaps).

    ``version`` 4 or 6 requires every entry to be of that family."""
    if isinstance(members, str):
        raise ValueError("members must be a list of addresses, not a single string")
    nets: list[IPNetwork] = []
    for entry in members:
        try:
            net = ipaddress.ip_network(entry.strip() if isinstance(entry, str) else entry)
        except (ValueError, TypeError):
            raise ValueError(
                f"pool member {entry!r} is not an IP address or network (CIDR with no host bits)"
            ) from None
        if version is not None and net.version != version:
            raise ValueError(f"pool member {entry!r} is not an IPv{version} address")
        nets.append(net)
    v4 = [n for n in nets if n.version == 4]
    v6 = [n for n in nets if n.version == 6]
    return [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]


# ------------------------------------------------------------------------ nftables


class NftError(RuntimeError):
    """nft is missing or refused a command; the message includes nft's own error."""


def render_nft_ruleset(
    table: str,
    port_low: int,
    port_high: int,
    members_v4: list[str],
    members_v6: list[str],
    *,
    allow_loopback: bool = True,
) -> str:
    """An ``nft -f`` script that atomically (re)creates ``table inet <table>``.

    The leading ``table``/``delete table`` pair makes the script work whether or not the
    table exists, and nft applies the file as one transaction.
    """
    _check_table(table)
    for name, port in (("port_low", port_low), ("port_high", port_high)):
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= MAX_PORT:
            raise ValueError(f"{name} must be a port number 1-{MAX_PORT}, got {port!r}")
    if port_low > port_high:
        raise ValueError(f"port_low {port_low} is greater than port_high {port_high}")
    v4 = parse_members(members_v4, 4)
    v6 = parse_members(members_v6, 6)
    ports = str(port_low) if port_low == port_high else f"{port_low}-{port_high}"
    lines = [
        f"table inet {table}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        *_render_set("members_v4", "ipv4_addr", v4),
        *_render_set("members_v6", "ipv6_addr", v6),
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy accept;",
    ]
    if allow_loopback:
        lines.append('\t\tiifname "lo" accept')
    lines += [
        f"\t\ttcp dport {ports} ip saddr != @members_v4 counter reject with tcp reset",
        f"\t\ttcp dport {ports} ip6 saddr != @members_v6 counter reject with tcp reset",
        f"\t\tudp dport {ports} ip saddr != @members_v4 counter drop",
        f"\t\tudp dport {ports} ip6 saddr != @members_v6 counter drop",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _render_set(name: str, kind: str, nets: list[IPNetwork]) -> list[str]:
    out = [f"\tset {name} {{", f"\t\ttype {kind}", "\t\tflags interval"]
    if nets:
        items = [str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n) for n in nets]
        out.append(f"\t\telements = {{ {', '.join(items)} }}")
    out.append("\t}")
    return out


def _check_table(table: str) -> None:
    if not isinstance(table, str) or not _TABLE_NAME.fullmatch(table):
        raise ValueError(
            f"nft table name {table!r} must be a letter followed by up to 63 letters, "
            "digits or underscores"
        )


def _nft(args: list[str], stdin: str | None, netns: str | None) -> subprocess.CompletedProcess:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    try:
        return subprocess.run(
            [*prefix, "nft", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_NFT_TIMEOUT,
            check=False,
        )
    except FileNotFoundError as e:
        raise NftError(
            f"cannot run {e.filename}: not installed (Debian: nftables, iproute2)"
        ) from None
    except subprocess.TimeoutExpired:
        raise NftError(f"nft did not finish within {_NFT_TIMEOUT:.0f} s") from None


def apply_nft(ruleset: str, *, netns: str | None = None) -> None:
    """Load ``ruleset`` with ``nft -f -`` (one atomic transaction); ``netns`` runs it in
    that named network namespace."""
    done = _nft(["-f", "-"], ruleset, netns)
    if done.returncode != 0:
        raise NftError(f"nft refused the ruleset: {done.stderr.strip() or done.returncode}")


def remove_nft(table: str, *, netns: str | None = None) -> None:
    """Delete ``table inet <table>``; no error when it does not exist."""
    _check_table(table)
    apply_nft(f"table inet {table}\ndelete table inet {table}\n", netns=netns)


def nft_available(*, netns: str | None = None) -> bool:
    """True when nft is installed and this process may use it (CAP_NET_ADMIN)."""
    if shutil.which("nft") is None:
        return False
    try:
        return _nft(["list", "tables"], None, netns).returncode == 0
    except NftError:
        return False


# ------------------------------------------------------------------------ PortGate


class PortGate:
    """User-space "pool members only" gate for a TVM's ports (fallback for nftables).

    Scheme: for every port ``p`` in ``ports`` the gate listens on ``listen_host:p`` and,
    for a peer whose IP is a member, opens ``upstream_host:(p + port_offset)`` and copies
    bytes both ways (half-closes are passed on). A non-member is accepted and immediately
    reset (RST), so its client sees a refused/reset connection and never a byte from the task.

    Default deployment: ``listen_host`` is the node's address (the one pool members use)
    and the task binds ``127.0.0.1:p``, so the advertised port numbers stay the same and a
    task that binds ``0.0.0.0:p`` fails loudly (EADDRINUSE) instead of bypassing the gate.
    To listen on a wildcard address instead, give a non-zero ``port_offset`` and tell tasks
    to bind ``127.0.0.1:p+offset``. Loopback peers are not special: list them if wanted.

    ``update_members`` swaps the member set atomically and cuts open connections of peers
    that are no longer members.
    """

    def __init__(
        self,
        ports: Iterable[int],
        members: Iterable[str],
        *,
        listen_host: str,
        upstream_host: str = "127.0.0.1",
        port_offset: int = 0,
        backlog: int = 128,
    ) -> None:
        wanted = list(ports)
        if not wanted:
            raise ValueError("the port gate needs at least one port")
        for p in wanted:
            if not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= MAX_PORT:
                raise ValueError(f"gate port {p!r} is not a port number 1-{MAX_PORT}")
            if not 1 <= p + port_offset <= MAX_PORT:
                raise ValueError(f"gate port {p} + offset {port_offset} is not a valid port")
        self.ports = sorted(set(wanted))
        listen_ip = _ip_or_wildcard(listen_host, "listen_host")
        upstream_ip = _ip_or_wildcard(upstream_host, "upstream_host")
        if upstream_ip is None:
            raise ValueError("upstream_host must be a concrete address such as 127.0.0.1")
        if port_offset == 0 and (listen_ip is None or listen_ip == upstream_ip):
            raise ValueError(
                f"listen_host {listen_host!r} with port_offset 0 would take the ports the task "
                f"must bind on {upstream_host}; listen on the node's address or set port_offset"
            )
        self.listen_host = listen_host
        self.upstream_host = upstream_host
        self.port_offset = port_offset
        self._backlog = backlog
        self._members: _MemberSet = _MemberSet(parse_members(members))
        self._open: dict[int, tuple[IPAddress, trio.CancelScope]] = {}
        self._next_id = 0
        self.accepted = 0  # member connections spliced to the task
        self.refused = 0  # non-member connections reset
        self.upstream_failures = 0  # member connections reset because the task was not listening

    @property
    def members(self) -> list[str]:
        return [str(n) for n in self._members.nets]

    def update_members(self, members: Iterable[str]) -> None:
        new = _MemberSet(parse_members(members))  # raises before anything changes
        self._members = new
        for peer, scope in list(self._open.values()):
            if not new.allows(peer):
                scope.cancel()

    async def serve(
        self, *, task_status: trio.TaskStatus[list[int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on every port, report them via ``task_status`` and serve until cancelled.
        Raises OSError naming the port when one cannot be bound (nothing is left open)."""
        listeners = await self._bind_all()
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(list(self.ports))

    async def _bind_all(self) -> list[trio.SocketListener]:
        family = socket.AF_INET6 if ":" in self.listen_host else socket.AF_INET
        listeners: list[trio.SocketListener] = []
        try:
            for port in self.ports:
                sock = trio.socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    await sock.bind((self.listen_host, port))
                    sock.listen(self._backlog)
                except OSError as e:
                    sock.close()
                    raise OSError(
                        e.errno,
                        f"port gate cannot listen on {self.listen_host}:{port}: {e.strerror}",
                    ) from None
                listeners.append(trio.SocketListener(sock))
        except BaseException:
            for listener in listeners:
                listener.socket.close()
            raise
        return listeners

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            peer = _normalize(ipaddress.ip_address(client.socket.getpeername()[0]))
            port = client.socket.getsockname()[1]
        except OSError:  # the peer already went away (ENOTCONN); nothing to serve
            await trio.aclose_forcefully(client)
            return
        if not self._members.allows(peer):
            self.refused += 1
            _reset(client)
            return
        try:
            upstream = await trio.open_tcp_stream(self.upstream_host, port + self.port_offset)
        except OSError:
            self.upstream_failures += 1
            _reset(client)
            return
        self.accepted += 1
        conn_id = self._next_id
        self._next_id += 1
        with trio.CancelScope() as scope:
            self._open[conn_id] = (peer, scope)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, client, upstream, scope)
                    nursery.start_soon(_pump, upstream, client, scope)
            finally:
                del self._open[conn_id]
        if scope.cancelled_caught:  # membership revoked or one side broke: cut both ends
            _reset(client)
            _reset(upstream)
        else:
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(upstream)


@dataclass(frozen=True, slots=True)
class _MemberSet:
    nets: list[IPNetwork]
    hosts: frozenset[IPAddress] = field(init=False)
    ranges: tuple[IPNetwork, ...] = field(init=False)

    def __post_init__(self) -> None:
        hosts = frozenset(n.network_address for n in self.nets if n.prefixlen == n.max_prefixlen)
        object.__setattr__(self, "hosts", hosts)
        ranges = tuple(n for n in self.nets if n.prefixlen != n.max_prefixlen)
        object.__setattr__(self, "ranges", ranges)

    def allows(self, ip: IPAddress) -> bool:
        return ip in self.hosts or any(ip in net for net in self.ranges)


async def _pump(src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
    try:
        async for chunk in src:
            await dst.send_all(chunk)
        await dst.send_eof()  # pass the half-close on; the other direction keeps going
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        scope.cancel()


def _reset(stream: trio.SocketStream) -> None:
    """Close with RST (linger 0) so the peer gets a clear failure, not a clean EOF."""
    sock = stream.socket
    if sock.fileno() == -1:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _normalize(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
    return ip


def _ip_or_wildcard(host: str, name: str) -> IPAddress | None:
    if host in ("", "0.0.0.0", "::"):
        return None
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{name} {host!r} must be a literal IP address") from None
