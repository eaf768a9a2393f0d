"""The agent's own identity towards the coordinator: its credential and the proofs made with it.

At its first start the agent makes up a random credential and keeps it in a private 0600 file
(written and fsynced before it is ever sent). Its first Hello carries the credential with the join
token; the coordinator stores it before answering, so there is no moment in which the join token
alone could claim this agent id. Every Hello proves possession (HMAC over the agent id and the
time); HTTP requests to the coordinator's file store carry a proof bound to "http".
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from protocol.agentproof import agent_proof

CREDENTIAL_FILE = "agent-credential"

# Reject codes after which retrying cannot help: the agent stops and says why.
FATAL_REJECTS = frozenset(
    {
        "InvalidJoinToken",
        "ProtocolVersionMismatch",
        "AgentRevoked",
        "InvalidAgentCredential",
        "JoinTokenExpired",
        "JoinTokenUsed",
        "AgentRetired",  # its TVM was lost and replaced: the provisioner stops it anyway
    }
)


class AgentIdentity:
    def __init__(
        self,
        agent_id: str,
        read_private: Callable[[str], str],
        write_private: Callable[[str, str], None],
    ) -> None:
        self.agent_id = agent_id
        self.credential = read_private(CREDENTIAL_FILE)
        if not self.credential:
            # Durable before the first Hello: a crash after enrolment must not lose it.
            self.credential = secrets.token_urlsafe(32)
            write_private(CREDENTIAL_FILE, self.credential)
        # Until a Welcome shows the coordinator knows the credential, every Hello offers it (a lost
        # Welcome is harmless: the coordinator stored it first, and ignores it for an enrolled id).
        self._welcomed = False

    def hello_fields(self) -> dict[str, object]:
        t = int(time.time() * 1000)
        fields: dict[str, object] = {
            "proof": agent_proof(self.credential, self.agent_id, t),
            "proof_time": t,
        }
        if not self._welcomed:
            fields["credential"] = self.credential
        return fields

    def welcomed(self) -> None:
        self._welcomed = True

    def http_headers(self) -> dict[str, str]:
        t = int(time.time() * 1000)
        return {
            "X-TVM-Agent-Id": self.agent_id,
            "X-TVM-Agent-Proof-Time": str(t),
            "X-TVM-Agent-Proof": agent_proof(self.credential, self.agent_id, t, "http"),
        }
