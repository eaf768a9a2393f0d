"""Uploaded files kept in the PostgreSQL store too, so that the coordinator that takes over serves
every file its predecessor acknowledged.

Each coordinator keeps its own copy of a blob under its state directory (`FileStore`), as with
SQLite; with a shared store the upload's 201 also waits until the blob is committed here, and a
coordinator that is asked for a blob it has not seen fetches it from here, checks its hash and
keeps it. Blobs are content-addressed and never change, so writes are idempotent and need no
lease check: a fenced-out coordinator that writes one late writes the same bytes.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

CHUNK = 1 << 20  # rows of 1 MiB: a large file never has to fit in one statement or in memory

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tvm_blobs (
        sha256  TEXT PRIMARY KEY,
        size    BIGINT NOT NULL,
        created TIMESTAMPTZ NOT NULL DEFAULT now())""",
    """CREATE TABLE IF NOT EXISTS tvm_blob_chunks (
        sha256 TEXT NOT NULL,
        seq    INT NOT NULL,
        data   BYTEA NOT NULL,
        PRIMARY KEY (sha256, seq))""",
)

T = TypeVar("T")


class PgBlobs:
    """The blob half of a PostgreSQL store; blocking calls, made from worker threads."""

    def __init__(self, url: str, *, connect_timeout: float = 10.0) -> None:
        import psycopg

        from .pgstore import Connection, StoreUnreachable, connect_error, redact

        self._error: Any = psycopg.Error
        try:
            self._conn = Connection(url, redact(url), connect_timeout)
        except psycopg.Error as exc:
            raise StoreUnreachable(
                f"cannot connect to {redact(url)}: {connect_error(url, exc)}"
            ) from exc
        self._lock = threading.Lock()  # one connection, several upload threads
        db = self._conn.db
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(7419002)")
            for stmt in _SCHEMA:
                db.execute(stmt)

    def close(self) -> None:
        self._conn.close()

    def _call(self, fn: Callable[[Any], T]) -> T:
        """Run `fn(connection)` under the lock (once more on a new connection if the server
        dropped the old one: blobs never change, so every call may run twice); a database error
        becomes an OSError (EIO), which the upload route answers with 503 StoreUnavailable and the
        download route with 503 as well."""
        with self._lock:
            try:
                return self._conn.run(fn)
            except self._error as exc:
                raise OSError(errno.EIO, f"the PostgreSQL store failed: {_line(exc)}") from exc

    def save(self, sha256: str, path: str) -> None:
        """Copy the verified blob at `path` into the store (nothing if it is there already)."""

        def go(db: Any) -> None:
            with db.transaction(), db.cursor() as cur:
                cur.execute("SELECT 1 FROM tvm_blobs WHERE sha256 = %s", (sha256,))
                if cur.fetchone() is not None:
                    return
                size = 0
                with open(path, "rb") as f:
                    seq = 0
                    while chunk := f.read(CHUNK):
                        cur.execute(
                            "INSERT INTO tvm_blob_chunks(sha256, seq, data) VALUES (%s, %s, %s)"
                            " ON CONFLICT DO NOTHING",
                            (sha256, seq, chunk),
                        )
                        seq += 1
                        size += len(chunk)
                # Last, in the same transaction: a listed blob always has all its chunks.
                cur.execute(
                    "INSERT INTO tvm_blobs(sha256, size) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                    (sha256, size),
                )

        self._call(go)

    def fetch(self, sha256: str, write: Callable[[bytes], object]) -> bool:
        """Hand the blob's bytes to `write` in order; False when the store does not hold it."""

        def go(db: Any) -> bool:
            with db.cursor() as cur:
                cur.execute("SELECT size FROM tvm_blobs WHERE sha256 = %s", (sha256,))
                if cur.fetchone() is None:
                    return False
                seq = 0
                while True:
                    cur.execute(
                        "SELECT data FROM tvm_blob_chunks WHERE sha256 = %s AND seq = %s",
                        (sha256, seq),
                    )
                    row = cur.fetchone()
                    if row is None:
                        return True
                    write(row[0])
                    seq += 1

        return self._call(go)

    def list(self) -> list[tuple[str, int, datetime]]:
        def go(db: Any) -> list[tuple[str, int, datetime]]:
            rows = db.execute(
                "SELECT sha256, size, created FROM tvm_blobs ORDER BY sha256"
            ).fetchall()
            return [(str(s), int(n), c) for s, n, c in rows]

        return self._call(go)


def _line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
