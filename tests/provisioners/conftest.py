"""Fixtures of the provisioner tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.provisioners.sshd import NO_SYSTEMD, Sshd, start_sshd, stop


@pytest.fixture
def sshd(tmp_path) -> Iterator[Sshd]:  # noqa: ANN001
    """A private sshd on a loopback port (its own host key, an authorized key), without systemd."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    server, proc = start_sshd(str(tmp_path / "sshd"), wrap=NO_SYSTEMD)
    try:
        yield server
    finally:
        stop(proc)
