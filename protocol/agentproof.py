"""The agent's proof of its credential (HMAC-SHA256), made by the agent and checked by the coordinator.

proof = HMAC-SHA256(credential, "<agent_id>\\n<t>") with t the agent's clock in milliseconds; HTTP
requests use "<agent_id>\\n<t>\\nhttp" (``purpose="http"``) so an overheard HTTP proof cannot open a link.
"""

from __future__ import annotations

import hashlib
import hmac


def agent_proof(credential: str, agent_id: str, t_ms: int, purpose: str = "") -> str:
    text = f"{agent_id}\n{t_ms}" + (f"\n{purpose}" if purpose else "")
    return hmac.new(credential.encode(), text.encode(), hashlib.sha256).hexdigest()
