"""What the core asks the shell to do: typed instructions, collected in an `Outbox`.

The core never performs I/O. Each command or event leaves instructions here; the Trio shell takes
them with `take()` (`CoordinatorState.take_effects()`) and carries them out: journal writes first
(one barrier per batch), then sends, closes, provisioning requests and agents to stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from protocol import messages as pm

ENCODER = msgspec.msgpack.Encoder()  # records go to the journal as msgpack


@dataclass(slots=True)
class Write:
    """One journal change: put `body` at (kind, key); None deletes; prefix deletes a key range."""

    kind: str
    key: str
    body: bytes | None
    prefix: bool = False


class Send(msgspec.Struct, frozen=True, gc=False):
    """Send `msg` to the agent `agent_id` (dropped if it is not connected: it reconciles on hello)."""

    agent_id: str
    msg: pm.Msg


class Close(msgspec.Struct, frozen=True, gc=False):
    """Close the agent's link with this websocket close code and reason."""

    agent_id: str
    code: int
    reason: str


class Provision(msgspec.Struct, frozen=True, gc=False):
    """Ask the provisioner for `count` more agents of `vm_size` (for `pool`: it may name its own)."""

    count: int
    vm_size: str
    pool: str = ""


class Retire(msgspec.Struct, frozen=True, gc=False):
    """Stop the agent `agent_id` for good through the provisioner that started it: its TVM was
    lost and left its pool, and a replacement is on its way (healing.py)."""

    agent_id: str
    reason: str


@dataclass
class Effects:
    writes: list[Write] = field(default_factory=list)
    sends: list[Send] = field(default_factory=list)
    closes: list[Close] = field(default_factory=list)
    provision: list[Provision] = field(default_factory=list)
    retire: list[Retire] = field(default_factory=list)


class Outbox:
    """Collects instructions between two `take()` calls."""

    __slots__ = ("fx",)

    def __init__(self) -> None:
        self.fx = Effects()

    def take(self) -> Effects:
        fx, self.fx = self.fx, Effects()
        return fx

    def put(self, kind: str, key: str, rec: msgspec.Struct) -> None:
        self.fx.writes.append(Write(kind, key, ENCODER.encode(rec)))

    def delete(self, kind: str, key: str, prefix: bool = False) -> None:
        self.fx.writes.append(Write(kind, key, None, prefix))

    def send(self, agent_id: str, msg: pm.Msg) -> None:
        self.fx.sends.append(Send(agent_id, msg))

    def close(self, agent_id: str, code: int, reason: str) -> None:
        self.fx.closes.append(Close(agent_id, code, reason))

    def provision(self, count: int, vm_size: str, pool: str = "") -> None:
        self.fx.provision.append(Provision(count, vm_size, pool))

    def retire(self, agent_id: str, reason: str) -> None:
        self.fx.retire.append(Retire(agent_id, reason))
