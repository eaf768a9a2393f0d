"""What `tvm up` and `tvm coordinator` say about joining other machines: the URL they dial and
the exact command to run there."""

from __future__ import annotations

import shlex
from urllib.parse import urlsplit

from protocol.config import validate_coordinator_url

AGENT_TOKEN_PATH = "/etc/tvm-agent/join-token"


def default_public_url(endpoint: str, host: str) -> str:
    """The URL other machines reach: the endpoint, with a wildcard listen address replaced by this
    host's primary address (0.0.0.0 is not something another machine can dial)."""
    if host not in ("0.0.0.0", "::", ""):
        return endpoint
    from protocol.hostio import primary_ip

    parts = urlsplit(endpoint)
    ip = primary_ip()
    shown = f"[{ip}]" if ":" in ip else ip
    return f"{parts.scheme}://{shown}:{parts.port}"


def check_public_url(url: str) -> str | None:
    """Why `url` cannot be the public URL, or None."""
    if not url.startswith(("http://", "https://")):
        return f"--public-url must be the http(s):// URL clients use, got {url!r}"
    why = validate_coordinator_url(url)
    return f"--public-url {why}" if why else None


def join_command(public_url: str, token_file: str = AGENT_TOKEN_PATH) -> str:
    ws = public_url.rstrip("/").replace("https://", "wss://").replace("http://", "ws://")
    return f"tvm agent --coordinator {shlex.quote(ws + '/agent')} --token-file {shlex.quote(token_file)}"


def join_lines(prog: str, public_url: str, token_source: str) -> list[str]:
    """Lines for stderr: where the token comes from and the command to run on the other machine."""
    return [
        f"{prog}: to join another machine, put a join token in a 0600 file there ({token_source},"
        " or one for a single machine: `tvm token create --single-use --expires PT1H`) and run:",
        f"  {join_command(public_url)}",
    ]
