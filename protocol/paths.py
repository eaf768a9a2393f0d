"""Validation of user-supplied relative paths (resource files, task file APIs).

Pure: no filesystem access. The coordinator calls this at add time so bad paths are rejected
before anything is stored; the agent calls it again before writing and additionally re-checks the
resolved path on disk (symlinks cannot be judged from the string alone).
"""

from __future__ import annotations

import re

MAX_PATH_LENGTH = 1024
# Linux NAME_MAX; a longer component would only fail later with a less helpful OSError.
MAX_COMPONENT_LENGTH = 255

_DRIVE = re.compile(r"[A-Za-z]:")


def validate_relative_path(p: str) -> str:
    """Return `p` normalised ("a//./b/" -> "a/b", "a\\b" -> "a/b"), or raise ValueError.

    Rejected: non-strings, empty or "."-only paths, absolute paths (leading "/" or "\\", Windows
    drive letters), ".." components, NUL bytes, paths over 1024 characters and components over
    255 bytes. Backslashes are treated as separators because clients written for Windows pools
    send "dir\\file"; treating them as ordinary characters would let "..\\x" through the ".."
    check and surprise a later Windows-aware consumer.
    """
    if not isinstance(p, str):
        raise ValueError(f"path must be a string, not {type(p).__name__}")
    if p == "":
        raise ValueError("path is empty")
    if "\x00" in p:
        raise ValueError("path contains a NUL byte")
    if len(p) > MAX_PATH_LENGTH:
        raise ValueError(f"path is {len(p)} characters long; the limit is {MAX_PATH_LENGTH}")
    unified = p.replace("\\", "/")
    if unified.startswith("/"):
        raise ValueError(f"path {p!r} is absolute; it must be relative to the task directory")
    if _DRIVE.match(unified):
        raise ValueError(f"path {p!r} starts with a drive letter; it must be relative")
    parts: list[str] = []
    for part in unified.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise ValueError(f"path {p!r} contains a '..' component and could escape its directory")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_COMPONENT_LENGTH:
            raise ValueError(f"path {p!r} has a component longer than {MAX_COMPONENT_LENGTH} bytes")
        parts.append(part)
    if not parts:
        raise ValueError(f"path {p!r} names no file (only '.' or separators)")
    return "/".join(parts)
