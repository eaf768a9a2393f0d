"""Agent ⇄ coordinator protocol: messages, codec and the sans-IO link session (no I/O here)."""

from .codec import MessageCodec as MessageCodec
from .codec import ProtocolError as ProtocolError
from .codec import agent_codec as agent_codec
from .codec import coordinator_codec as coordinator_codec
from .messages import PROTOCOL_MINOR as PROTOCOL_MINOR
from .messages import PROTOCOL_VERSION as PROTOCOL_VERSION
from .messages import SUBPROTOCOL as SUBPROTOCOL
from .session import LinkSession as LinkSession
from .session import Received as Received
