"""`tvm store migrate`: copy a coordinator's SQLite state into an empty PostgreSQL store."""

from __future__ import annotations

import os
from collections.abc import Callable

from coordinator.core import Write

from .filestore import local_blobs
from .journal import META_KIND, SqliteStore
from .pgblobs import PgBlobs
from .pgstore import PostgresStore

BATCH = 5000


class MigrateError(RuntimeError):
    pass


def migrate(
    state_dir: str, url: str, progress: Callable[[int], None] | None = None
) -> tuple[int, int, int]:
    """Copy every object and meta row of STATE_DIR/coordinator.db, and every uploaded file of
    STATE_DIR/files, into the (empty) store at `url`; returns (objects, meta rows, files). The
    source is only read. Nothing is written to a store that
    already holds objects or an account (refused: it belongs to another coordinator)."""
    db = os.path.join(state_dir, "coordinator.db")
    if not os.path.exists(db):
        raise MigrateError(f"{db} does not exist: nothing to migrate")
    src = SqliteStore(db)
    try:
        dst = PostgresStore(url)
    except Exception:
        src.close()
        raise
    try:
        if dst.get_meta("key1"):
            raise MigrateError(
                f"{dst.path} already holds a coordinator's state: migrate into an empty database"
            )
        if not dst.acquire(60.0):
            raise MigrateError(f"a coordinator is running on {dst.path}: stop it first")
        meta = src.all_meta()
        token_file = os.path.join(state_dir, "join-token")
        if os.path.exists(token_file) and not meta.get("join_token_plain"):
            # Coordinators sharing a store all hand out the join token: it moves into the store.
            with open(token_file) as f:
                meta["join_token_plain"] = f.read().strip()
        writes: list[Write] = []
        objects = 0
        for kind, key, body in src.load():
            writes.append(Write(kind, key, body))
            objects += 1
            if len(writes) >= BATCH:
                dst.apply(writes)
                writes = []
                if progress is not None:
                    progress(objects)
        files = _copy_files(os.path.join(state_dir, "files"), url)
        # The meta rows go in the last batch, so a store with an account key is a complete copy
        # (an interrupted migration left none, and can be run again: its rows are overwritten).
        dst.apply(writes + [Write(META_KIND, k, v.encode()) for k, v in meta.items()])
        if progress is not None:
            progress(objects)
        dst.release()
        return objects, len(meta), files
    finally:
        src.close()
        dst.close()


def _copy_files(root: str, url: str) -> int:
    if not os.path.isdir(root):
        return 0
    names = local_blobs(root)
    if not names:
        return 0
    blobs = PgBlobs(url)
    try:
        for name in names:
            # A file store only keeps blobs whose hash was checked: copied as they are.
            blobs.save(name, os.path.join(root, name[:2], name[2:4], name))
    finally:
        blobs.close()
    return len(names)
