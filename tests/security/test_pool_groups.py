"""Groups the agent makes (a pool group per membership, a slot user's own group) must each get a gid
no other group has: two groups with one gid would share every file of either. Agents on one host
make them at the same time, and groupadd checks an explicit gid before it takes its lock."""

from __future__ import annotations

import grp
import os
import threading

import pytest

from tvmagent import isolation

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (groupadd)")


def test_groups_made_at_the_same_time_get_gids_of_their_own() -> None:
    names = [f"{isolation.POOL_GROUP_PREFIX}t{os.getpid()}-{i}" for i in range(8)]
    gids: dict[str, int] = {}
    errors: list[BaseException] = []
    go = threading.Barrier(len(names))

    def make(name: str) -> None:
        try:
            go.wait()
            gids[name] = isolation.ensure_group(name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(n,)) for n in names]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert len(set(gids.values())) == len(names)
        for name, gid in gids.items():
            assert grp.getgrnam(name).gr_gid == gid
            assert [g.gr_name for g in grp.getgrall() if g.gr_gid == gid] == [name]
    finally:
        for n in names:
            isolation.remove_group(n)


def test_only_pool_groups_are_deleted() -> None:
    with pytest.raises(ValueError, match="not a pool group"):
        isolation.remove_group("root")
    assert isolation.remove_group(f"{isolation.POOL_GROUP_PREFIX}none{os.getpid()}") is False
