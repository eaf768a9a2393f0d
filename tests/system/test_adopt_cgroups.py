"""The agent probes its task cgroups the way tasks get theirs: a host that refuses one is said as
the TVM's unusable reason (instead of every task failing), and the finding clears once the host
is fixed. On this host's real cgroups (where usable) the probe passes and leaves nothing."""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest

from tvmagent import _cgroups, host_health
from tvmagent.sandbox import SandboxCapabilities


def test_a_cgroup_tree_that_refuses_task_cgroups_is_reported_then_cleared(tmp_path: Any) -> None:
    # A v2 base that is a plain directory: what is in the prefix's place decides.
    layout = _cgroups.CgroupLayout(v2_base=str(tmp_path))
    prefix = f"tvm-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    (tmp_path / prefix).write_text("a leftover in the way")
    health = host_health.HostHealth()
    assert host_health.check_cgroups(health, layout, prefix)
    why = health.problems["cgroups"]
    assert why == f"cannot create a task cgroup: {tmp_path / prefix} is not a directory"
    assert health.unusable_reason() == f"cgroups: {why}"
    assert not host_health.check_cgroups(health, layout, prefix)  # unchanged: no new report
    (tmp_path / prefix).unlink()
    assert host_health.check_cgroups(health, layout, prefix)
    assert health.unusable_reason() == ""


def test_no_cgroups_at_all_is_a_degraded_mode_not_a_broken_host() -> None:
    health = host_health.HostHealth()
    assert not host_health.check_cgroups(health, _cgroups.CgroupLayout(), "tvm-x")
    assert health.problems == {}


def test_the_probe_passes_on_this_hosts_cgroups_and_leaves_nothing() -> None:
    layout = SandboxCapabilities.detect().layout
    if not layout.usable:
        pytest.skip("no writable cgroup on this host")
    prefix = f"tvm-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        assert host_health.probe_cgroups(layout, prefix) is None
        for base in [layout.v2_base, *layout.v1_bases.values()]:
            d = os.path.join(base or "", prefix)
            if base and os.path.isdir(d):
                assert not [x for x in os.listdir(d) if x.startswith("probe-")]
    finally:
        for base in {b for b in [layout.v2_base, *layout.v1_bases.values()] if b}:
            d = os.path.join(base, prefix)
            if os.path.isdir(d):
                os.rmdir(d)
