"""Join tokens reach an agent through its environment (`TVM_AGENT_TOKEN`), a 0600 file
(`--token-file`, or `token-file` in the config) or its 0600 config file, never through a command
line: `ps` shows command lines to every user, tasks included."""

from __future__ import annotations

import os
import stat


class TokenError(Exception):
    """A token source that is missing, empty or readable by others."""


def check_private_file(path: str, what: str) -> os.stat_result:
    """Refuse a secret-bearing file that its group or other users may read or write."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise TokenError(f"{what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise TokenError(f"{what} {path} is not a regular file")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise TokenError(
            f"{what} {path} is readable or writable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): it holds a secret, make it 0600 (chmod 600 {path})"
        )
    return st


def read_token_file(path: str) -> str:
    """The token in `path` (first line, surrounding blanks dropped); the file must be 0600 or
    narrower. systemd's `LoadCredential=` files qualify."""
    check_private_file(path, "token file")
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenError(f"token file {path}: cannot read it: {exc}") from None
    if not token:
        raise TokenError(f"token file {path} is empty")
    return token


COMMAND_LINE_REFUSED = (
    "the join token is not accepted on the command line (every user, tasks included, "
    "can read command lines with ps): set TVM_AGENT_TOKEN in the environment or pass "
    "--token-file PATH (a 0600 file)"
)


def file_sets_key(path: str | None, key: str) -> bool:
    """True when the TOML config file at `path` sets `key` (then it must be a private file)."""
    if not path:
        return False
    import msgspec

    try:
        with open(path, "rb") as f:
            return key in msgspec.toml.decode(f.read())
    except (OSError, msgspec.DecodeError):
        return False  # the config loader reports unreadable or malformed files itself


def resolve_token(token: str, token_file: str, config_path: str | None, key: str = "token") -> str:
    """The token from the environment/config (`token`) or from `token_file`, after refusing a
    config file that holds it but is readable by others."""
    if token and file_sets_key(config_path, key):
        check_private_file(config_path or "", "config file")
    if token_file:
        if token:
            raise TokenError(f"give the token once: both {key} and {key}-file are set")
        return read_token_file(token_file)
    return token
