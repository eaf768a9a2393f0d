"""How many local agents the host's memory holds (`tvm up`, and pools' on-demand agents)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from coordinator.runtime import provisioner
from coordinator.runtime.provisioner import AGENT_MIB, LocalProvisioner, room_for_agents


def test_room_is_the_available_memory_over_an_agents_share(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       24000000 kB\nMemFree:         1000 kB\n"
        f"MemAvailable:   {10 * AGENT_MIB * 1024 + 5} kB\n"
    )
    assert room_for_agents(str(meminfo)) == 10
    meminfo.write_text("MemTotal:       24000000 kB\n")  # an old kernel: no MemAvailable
    assert room_for_agents(str(meminfo)) is None
    assert room_for_agents(str(tmp_path / "missing")) is None


def test_asking_for_more_starts_what_fits_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool short of agents on a full host: none is started past the memory, and the log says
    how many were asked for and how many started (here none: nothing is spawned at all)."""
    monkeypatch.setattr(provisioner, "room_for_agents", lambda: 0)
    prov = LocalProvisioner(
        str(tmp_path / "state"), "ws://127.0.0.1:9/agent", "t", tvm_root_dir=str(tmp_path / "r")
    )
    with caplog.at_level(logging.WARNING, logger="tvm.provisioner"):
        assert prov.start(3) == []
    assert prov.procs == []
    assert "3 local agent(s) asked for, 0 started" in caplog.text
    assert not (tmp_path / "r").exists()
