"""Agent authentication: join token, per-agent HMAC credential, revocation (issue 8).

* The join token is stored only as its SHA-256 (meta `join_token_sha256`) and compared in constant
  time. Anyone holding it may register a NEW agent id.
* After an agent's first accepted join the coordinator hands it a random credential in Welcome
  (meta `agentcred:<id>` = "pending:<cred>"). The agent stores it (ROOT/agent-credential, 0600)
  and from then on proves possession in every Hello: proof = HMAC-SHA256(cred, "<agent_id>\\n<t>")
  with t its clock in milliseconds. The first valid proof confirms the credential
  ("ok:<cred>"); from then on that agent id is refused with the join token alone, so a stolen join
  token cannot take over an existing agent's TVM. While pending (the Welcome may have been lost)
  the join token is still accepted and a fresh credential issued.
* Replays: t must be within MAX_PROOF_SKEW_S of the coordinator's clock and larger than the last
  t accepted for that agent in this coordinator run.
* Revocation (meta `revoked:<id>` = "1") refuses the agent id for good: its link is closed with
  4003 and every later Hello is answered with Reject(AgentRevoked).

The credential itself has to be kept (not a hash): the coordinator recomputes the HMAC.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

MAX_PROOF_SKEW_S = 300.0


def agent_proof(credential: str, agent_id: str, t_ms: int) -> str:
    return hmac.new(credential.encode(), f"{agent_id}\n{t_ms}".encode(), hashlib.sha256).hexdigest()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Verdict:
    ok: bool
    code: str = ""
    message: str = ""
    new_credential: str = ""  # to send in Welcome


class AgentAuth:
    """Pure decisions over a small key/value store (`get(key) -> str|None`, `put(key, value)`)."""

    def __init__(self, get, put, token_sha256: str) -> None:  # noqa: ANN001 - store accessors
        self._get = get
        self._put = put
        self._token_sha256 = bytes.fromhex(token_sha256)
        self._last_proof: dict[str, int] = {}

    def check_token(self, token: str) -> bool:
        return hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self._token_sha256)

    def authenticate(self, agent_id: str, token: str, proof: str, proof_time_ms: int, now: float) -> Verdict:
        if self._get(f"revoked:{agent_id}"):
            return Verdict(False, "AgentRevoked", f"agent {agent_id!r} was revoked")
        stored = self._get(f"agentcred:{agent_id}") or ""
        state, _, cred = stored.partition(":")
        if cred and proof:
            if abs(now * 1000 - proof_time_ms) > MAX_PROOF_SKEW_S * 1000:
                return Verdict(False, "InvalidAgentCredential",
                               "the agent's proof time is more than 5 minutes from the coordinator's clock")
            if proof_time_ms <= self._last_proof.get(agent_id, 0):
                return Verdict(False, "InvalidAgentCredential", "replayed agent proof")
            if hmac.compare_digest(agent_proof(cred, agent_id, proof_time_ms), proof):
                self._last_proof[agent_id] = proof_time_ms
                if state != "ok":
                    self._put(f"agentcred:{agent_id}", f"ok:{cred}")
                return Verdict(True)
            if state == "ok":
                return Verdict(False, "InvalidAgentCredential", "the agent credential does not match")
        if state == "ok":
            return Verdict(False, "InvalidAgentCredential",
                           f"agent {agent_id!r} has a credential; the join token alone is not accepted for it")
        if not self.check_token(token):
            return Verdict(False, "InvalidJoinToken", "the join token is not valid")
        new = secrets.token_urlsafe(32)
        self._put(f"agentcred:{agent_id}", f"pending:{new}")
        return Verdict(True, new_credential=new)

    def known(self, agent_id: str) -> bool:
        return bool(self._get(f"agentcred:{agent_id}"))

    def revoke(self, agent_id: str) -> None:
        self._put(f"revoked:{agent_id}", "1")
        self._put(f"agentcred:{agent_id}", "")
