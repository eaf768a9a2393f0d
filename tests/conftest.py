import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

from tests import harness  # noqa: E402


@pytest.fixture(autouse=True)
def _close_sync_clients() -> Iterator[None]:
    yield
    harness.close_sync_clients()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """One private PostgreSQL server for the whole run (each test takes its own database)."""
    from tests import pgcluster

    reason = pgcluster.unavailable()
    if reason:
        pytest.skip(reason)
    cluster = pgcluster.PgCluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request: Any, tmp_path: Any) -> Iterator[Callable[[str], Any]]:
    """`open_store(name)` opens the coordinator store called `name` (the same name again: the same
    store, reopened), on SQLite in tmp_path or on a database of the private PostgreSQL server."""
    from coordinator.runtime.journal import SqliteStore

    urls: dict[str, str] = {}
    opened: list[Any] = []

    def factory(name: str = "c.db") -> Any:
        if request.param == "sqlite":
            store: Any = SqliteStore(str(tmp_path / name))
        else:
            from coordinator.runtime.pgstore import PostgresStore

            cluster = request.getfixturevalue("pg_cluster")
            if name not in urls:
                urls[name] = cluster.new_database()
            store = PostgresStore(urls[name])
        opened.append(store)
        return store

    yield factory
    for store in opened:
        try:
            store.close()
        except Exception:  # noqa: BLE001 - closed by the test already
            pass


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """Agents the tests killed outright left their port-fence tables and their host-wide records
    (a later agent's sweep removes those it finds; nothing removes the last ones): the host keeps
    no table or record of a test's agent."""
    import shutil

    if os.geteuid() != 0:
        return
    try:
        basetemp = str(session.config._tmp_path_factory.getbasetemp())
    except Exception:  # noqa: BLE001 - no temporary directory plugin: no roots of its own
        basetemp = "/nonexistent"
    _sweep_agent_records(basetemp)
    if shutil.which("nft") is None:
        return
    from tvmagent import nftowners

    try:
        nftowners.sweep()
    except Exception as exc:  # the run's result stands; say what was left
        print(f"\nnftables tables of ended test agents not removed: {exc}", file=sys.stderr)


def _sweep_agent_records(basetemp: str) -> None:
    """Records of the run's killed agents: their roots under the run's temporary directory count as
    deleted (pytest keeps them a while); the records' directory goes when nothing else is in it."""
    from tvmagent import leftovers

    try:
        leftovers.sweep(gone=lambda root: root.startswith(os.path.realpath(basetemp) + os.sep))
        for d in (leftovers.RECORDS_DIR, os.path.dirname(leftovers.RECORDS_DIR)):
            os.rmdir(d)
    except OSError:
        pass  # not made, or records of agents outside this run: theirs to keep
