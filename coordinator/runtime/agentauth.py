"""Agent authentication: join tokens, per-agent HMAC credential, revocation.

* Enrolment happens in ONE handshake. A new agent makes up its own random credential, keeps it in a
  0600 file and sends it with a join token in its first Hello (`Hello.credential`, plus a proof made
  with it). The coordinator stores it (meta `agentcred:<id>` = "ok:<cred>") and commits that before
  its Welcome. From then on that agent id is accepted only with a proof from that credential: there
  is no "pending" state in which the join token alone could claim an existing id.
* proof = HMAC-SHA256(cred, "<agent_id>\\n<t>") with t the agent's clock in milliseconds; t must be
  within MAX_PROOF_SKEW_S of the coordinator's clock and larger than the last t accepted for that
  agent in this coordinator run (replays). HTTP requests of an agent (file store) use a proof over
  "<agent_id>\\n<t>\\nhttp" so an overheard HTTP proof cannot open a link.
* Join tokens: the account join token (meta `join_token_sha256`) never expires. Agent tokens
  (`tvm token create`) are "tvmjt.<id>.<secret>", stored as meta `agenttoken:<id>` (the secret's
  SHA-256, expiry, single use): an expired one is refused with JoinTokenExpired, a single-use one
  enrols exactly one agent id (JoinTokenUsed for any other).
* Older agents: an id left "pending:<cred>" by the previous scheme is confirmed by a proof from that
  credential; the join token alone no longer opens it. An agent that offers no credential of its
  own (older than this scheme) gets one in its Welcome, stored as confirmed at once.
* Revocation (meta `revoked:<id>` = "1") refuses the agent id for good.

The credential itself has to be kept (not a hash): the coordinator recomputes the HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from protocol.agentproof import agent_proof as agent_proof

MAX_PROOF_SKEW_S = 300.0
AGENT_TOKEN_PREFIX = "tvmjt."
# What an agent's own credential must look like (it makes it up: 32 random bytes, url-safe base64).
MIN_CREDENTIAL_CHARS = 32
MAX_CREDENTIAL_CHARS = 256


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Verdict:
    ok: bool
    code: str = ""
    message: str = ""
    enrolled: bool = False  # a new agent id was registered by this handshake
    new_credential: str = ""  # for an older agent that did not offer one: sent in its Welcome


@dataclass
class AgentToken:
    """An expiring and/or single-use join token (the secret is stored only as its SHA-256)."""

    id: str
    sha256: str
    created: float
    expires: float = 0.0  # unix seconds; 0: never
    single_use: bool = False
    used_by: str = ""  # the agent id a single-use token enrolled

    def to_json(self) -> str:
        return json.dumps(
            {
                "sha256": self.sha256,
                "created": self.created,
                "expires": self.expires,
                "singleUse": self.single_use,
                "usedBy": self.used_by,
            }
        )

    @classmethod
    def from_json(cls, token_id: str, text: str) -> AgentToken:
        d = json.loads(text)
        return cls(
            token_id,
            d["sha256"],
            d["created"],
            d.get("expires", 0.0),
            d.get("singleUse", False),
            d.get("usedBy", ""),
        )


class AgentAuth:
    """Pure decisions over a small key/value store (`get(key) -> str|None`, `put(key, value)`,
    `items() -> (key, value) pairs`). The caller makes puts durable before acting on a verdict."""

    def __init__(
        self,
        get: Callable[[str], str | None],
        put: Callable[[str, str], None],
        token_sha256: str,
        items: Callable[[], object] | None = None,
    ) -> None:
        self._get = get
        self._put = put
        self._items = items
        self._token_sha256 = bytes.fromhex(token_sha256)
        self._last_proof: dict[str, int] = {}

    def check_token(self, token: str) -> bool:
        """The account join token (never expires; agent tokens are checked by `_check_join`)."""
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._token_sha256)

    # ------------------------------------------------------------------ handshake

    def authenticate(
        self,
        agent_id: str,
        token: str,
        proof: str,
        proof_time_ms: int,
        now: float,
        credential: str = "",
    ) -> Verdict:
        if self.revoked(agent_id):
            return Verdict(False, "AgentRevoked", f"agent {agent_id!r} was revoked")
        stored = self._get(f"agentcred:{agent_id}") or ""
        state, _, cred = stored.partition(":")
        if cred:
            # A known id: only its credential opens it (the join token is not even looked at).
            if not proof:
                return Verdict(
                    False,
                    "InvalidAgentCredential",
                    f"agent {agent_id!r} has a credential; the join token alone is not accepted for it",
                )
            bad = self._check_proof(cred, agent_id, proof, proof_time_ms, now)
            if bad:
                return bad
            self._last_proof[agent_id] = proof_time_ms
            if state != "ok":  # a credential of the previous (two-step) scheme: confirmed now
                self._put(f"agentcred:{agent_id}", f"ok:{cred}")
            return Verdict(True)
        refused = self._check_join(token, agent_id, now)
        if refused:
            return refused
        if not credential:
            # An agent older than this scheme: it gets a credential in the Welcome, stored as
            # confirmed at once (never "pending"), so the join token alone cannot claim the id later.
            # A lost Welcome locks that agent out; it has to enrol again under another id.
            issued = secrets.token_urlsafe(32)
            self._put(f"agentcred:{agent_id}", f"ok:{issued}")
            self._use_token(token, agent_id)
            return Verdict(True, enrolled=True, new_credential=issued)
        if not MIN_CREDENTIAL_CHARS <= len(credential) <= MAX_CREDENTIAL_CHARS:
            return Verdict(
                False,
                "InvalidAgentCredential",
                f"an agent credential is {MIN_CREDENTIAL_CHARS}..{MAX_CREDENTIAL_CHARS} characters",
            )
        bad = self._check_proof(credential, agent_id, proof, proof_time_ms, now)
        if bad:
            return bad
        self._last_proof[agent_id] = proof_time_ms
        self._put(f"agentcred:{agent_id}", f"ok:{credential}")
        self._use_token(token, agent_id)
        return Verdict(True, enrolled=True)

    def _check_proof(
        self, cred: str, agent_id: str, proof: str, t_ms: int, now: float, purpose: str = ""
    ) -> Verdict | None:
        if abs(now * 1000 - t_ms) > MAX_PROOF_SKEW_S * 1000:
            return Verdict(
                False,
                "InvalidAgentCredential",
                "the agent's proof time is more than 5 minutes from the coordinator's clock",
            )
        if not purpose and t_ms <= self._last_proof.get(agent_id, 0):
            return Verdict(False, "InvalidAgentCredential", "replayed agent proof")
        if not hmac.compare_digest(agent_proof(cred, agent_id, t_ms, purpose), proof):
            return Verdict(False, "InvalidAgentCredential", "the agent credential does not match")
        return None

    def _check_join(self, token: str, agent_id: str, now: float) -> Verdict | None:
        """None if `token` may enrol `agent_id` now, else the refusal."""
        if self.check_token(token):
            return None
        rec = self._agent_token(token)
        if rec is None:
            return Verdict(False, "InvalidJoinToken", "the join token is not valid")
        if rec.expires and now >= rec.expires:
            return Verdict(False, "JoinTokenExpired", f"join token {rec.id} has expired")
        if rec.single_use and rec.used_by and rec.used_by != agent_id:
            return Verdict(
                False, "JoinTokenUsed", f"single-use join token {rec.id} already enrolled an agent"
            )
        return None

    def _agent_token(self, token: str) -> AgentToken | None:
        if not token.startswith(AGENT_TOKEN_PREFIX):
            return None
        token_id, _, secret = token[len(AGENT_TOKEN_PREFIX) :].partition(".")
        text = self._get(f"agenttoken:{token_id}") if token_id and secret else None
        if not text:
            return None
        rec = AgentToken.from_json(token_id, text)
        if not hmac.compare_digest(token_hash(secret), rec.sha256):
            return None
        return rec

    def _use_token(self, token: str, agent_id: str) -> None:
        rec = self._agent_token(token)
        if rec is not None and rec.single_use and not rec.used_by:
            rec.used_by = agent_id
            self._put(f"agenttoken:{rec.id}", rec.to_json())

    # ------------------------------------------------------------------ HTTP (file store)

    def check_http_proof(self, agent_id: str, proof: str, proof_time_ms: int, now: float) -> bool:
        """An enrolled, unrevoked agent's proof for an HTTP request (no replay check: the file store
        serves content-addressed, read-only blobs; the proof is bound to the "http" purpose)."""
        if not agent_id or not proof or self.revoked(agent_id):
            return False
        cred = (self._get(f"agentcred:{agent_id}") or "").partition(":")[2]
        return (
            bool(cred)
            and self._check_proof(cred, agent_id, proof, proof_time_ms, now, "http") is None
        )

    # ------------------------------------------------------------------ tokens

    def create_token(
        self, now: float, expires_in_s: float = 0.0, single_use: bool = False
    ) -> tuple[AgentToken, str]:
        """A new agent token; returns its record and the token text (shown once, never stored)."""
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        rec = AgentToken(
            token_id,
            token_hash(secret),
            now,
            now + expires_in_s if expires_in_s else 0.0,
            single_use,
        )
        self._put(f"agenttoken:{token_id}", rec.to_json())
        return rec, f"{AGENT_TOKEN_PREFIX}{token_id}.{secret}"

    def tokens(self) -> list[AgentToken]:
        out = []
        for key, value in self._items() if self._items is not None else ():  # type: ignore[attr-defined]
            if key.startswith("agenttoken:") and value:
                out.append(AgentToken.from_json(key.partition(":")[2], value))
        return sorted(out, key=lambda t: (t.created, t.id))

    def revoke_token(self, token_id: str) -> bool:
        if not self._get(f"agenttoken:{token_id}"):
            return False
        self._put(f"agenttoken:{token_id}", "")
        return True

    # ------------------------------------------------------------------ agents

    def revoked(self, agent_id: str) -> bool:
        return bool(self._get(f"revoked:{agent_id}"))

    def known(self, agent_id: str) -> bool:
        return bool(self._get(f"agentcred:{agent_id}"))

    def revoke(self, agent_id: str) -> None:
        self._put(f"revoked:{agent_id}", "1")
        self._put(f"agentcred:{agent_id}", "")
