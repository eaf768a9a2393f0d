"""The two small host helpers both daemons need besides sd_notify (protocol/sdnotify.py): making a
rename durable, and the address peers would reach this host at. The only file and socket calls in
protocol/ besides sd_notify."""

from __future__ import annotations

import os
import socket


def fsync_dir(path: str) -> None:
    """fsync a directory: makes a rename (or a new entry) in it durable; without it a power loss
    can forget the new name."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def primary_ip() -> str:
    """The address peers would use to reach this host (no packet is sent by a UDP connect)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
