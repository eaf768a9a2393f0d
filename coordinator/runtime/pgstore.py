"""PostgreSQL store: the same narrow interface as `SqliteStore` (`load`, `apply`, meta rows), over
psycopg 3, plus the lease that makes one coordinator of several the active one.

Durability is PostgreSQL's: a batch is one transaction, and `apply` returns only after COMMIT, which
with the server's default `synchronous_commit=on` means the WAL is flushed. Every batch also
checks, inside its transaction, that this process still holds the lease (`StoreFenced`): a coordinator
that was paused past its lease and came back can never write over the one that took over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote

from coordinator.core import LOAD_ORDER, Write

from .journal import META_KIND, StoreFenced

log = logging.getLogger("tvm.store")
T = TypeVar("T")

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tvm_objects (
        kind TEXT NOT NULL,
        key  TEXT NOT NULL,
        body BYTEA NOT NULL,
        PRIMARY KEY (kind, key))""",
    "CREATE TABLE IF NOT EXISTS tvm_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    # One row: who is active until when (the database's clock decides, not the coordinators').
    """CREATE TABLE IF NOT EXISTS tvm_lease (
        id      INT PRIMARY KEY CHECK (id = 1),
        holder  TEXT NOT NULL,
        expires TIMESTAMPTZ NOT NULL)""",
)

_PUT = (
    "INSERT INTO tvm_objects(kind, key, body) VALUES (%s, %s, %s) "
    "ON CONFLICT (kind, key) DO UPDATE SET body = EXCLUDED.body"
)
_PUT_META = (
    "INSERT INTO tvm_meta(key, value) VALUES (%s, %s) "
    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"
)


class StoreUnreachable(RuntimeError):
    """The database cannot be reached (at start, or for longer than a lease)."""


def is_postgres_url(url: str | None) -> bool:
    return bool(url) and str(url).startswith(("postgresql://", "postgres://"))


# libpq takes a password in the URL's user part or as a `password=` query parameter.
_PASSWORD_PARAM = re.compile(r"(?i)([?&]password=)[^&#]*")


def _passwords(url: str) -> list[str]:
    creds = url.partition("://")[2].partition("/")[0].rpartition("@")[0]
    found = [creds.partition(":")[2]] if ":" in creds else []
    found += [m.group(0).partition("=")[2] for m in _PASSWORD_PARAM.finditer(url)]
    found = [p for p in found if p]
    return sorted({*found, *(unquote(p) for p in found)}, key=len, reverse=True)


def connect_error(url: str, exc: BaseException) -> str:
    """The first line of a connection error without the URL's password: libpq quotes a malformed
    (percent-encoded) password whole in its message."""
    line = _first_line(exc)
    for secret in _passwords(url):
        line = line.replace(secret, "***")
    return line


def has_password(url: str) -> bool:
    creds = url.partition("://")[2].partition("/")[0].rpartition("@")[0]
    return ":" in creds or _PASSWORD_PARAM.search(url) is not None


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    url = _PASSWORD_PARAM.sub(r"\1***", url)
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at or ":" not in creds:
        return url
    return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"


def holder_name() -> str:
    """Who holds the lease: readable in the table, unique per process."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"


class Connection:
    """One psycopg connection (autocommit), made again when the server dropped it (a restart, a
    failover of the database): a statement fails with the server's error while it is down and
    works once it is back, with no coordinator restart. Thread-safe as psycopg's connections are."""

    def __init__(self, url: str, path: str, connect_timeout: float) -> None:
        import psycopg

        self._url = url
        self._path = path
        self._timeout = int(connect_timeout)
        self._dropped: type[Exception] = psycopg.OperationalError
        self._lock = threading.Lock()
        self.db = self._connect()  # psycopg.Error if the server cannot be reached

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self._url, autocommit=True, connect_timeout=self._timeout)

    def live(self) -> Any:
        db = self.db
        if not (db.broken or db.closed):
            return db
        with self._lock:
            if self.db.broken or self.db.closed:
                with contextlib.suppress(Exception):
                    self.db.close()
                self.db = self._connect()  # psycopg.OperationalError while the server is down
                log.warning("reconnected to %s", self._path)
        return self.db

    def run(self, fn: Callable[[Any], T]) -> T:
        """`fn(connection)`; once more on a new connection if the old one turns out dropped (an
        idle connection learns that the server restarted only when it is next used). Only for
        what may run twice (every statement of the store and the blobs may: upserts, deletes by
        key, the lease's conditional updates, inserts that skip what exists), and a failed
        transaction is rolled back whole."""
        db = self.live()
        try:
            return fn(db)
        except self._dropped:
            if not db.broken:
                raise
        return fn(self.live())

    def close(self) -> None:
        self.db.close()


class PostgresStore:
    def __init__(self, url: str, *, holder: str | None = None, connect_timeout: float = 10.0):
        try:
            import psycopg
        except ImportError as exc:  # pragma: no cover - the extra is part of the install
            raise RuntimeError(
                "a postgresql:// store needs psycopg 3: pip install 'tvm-batch[postgres]'"
            ) from exc
        self.url = url
        self.path = redact(url)  # what messages name (the SQLite store's is a file path)
        self.holder = holder or holder_name()
        self.fencing = False  # set once this process is the active one (see `acquire`)
        try:
            self._db = Connection(url, self.path, connect_timeout)
            # The lease has its own connection: a renewal must not queue behind a large commit.
            self._lease_db = Connection(url, self.path, connect_timeout)
        except psycopg.Error as exc:
            raise StoreUnreachable(
                f"cannot connect to {self.path}: {connect_error(url, exc)}"
            ) from exc
        db = self._db.db
        with db.transaction():
            # Two coordinators starting at once on an empty database both create the tables.
            db.execute("SELECT pg_advisory_xact_lock(7419001)")
            for stmt in _SCHEMA:
                db.execute(stmt)

    def close(self) -> None:
        self._db.close()
        self._lease_db.close()

    # ------------------------------------------------------------------ meta rows

    def get_meta(self, key: str) -> str | None:
        sql = "SELECT value FROM tvm_meta WHERE key = %s"
        row = self._db.run(lambda db: db.execute(sql, (key,)).fetchone())
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        def put(db: Any) -> None:
            with db.transaction():
                self._check_lease(db)
                db.execute(_PUT_META, (key, value))

        self._db.run(put)

    def all_meta(self) -> dict[str, str]:
        rows = self._db.run(lambda db: db.execute("SELECT key, value FROM tvm_meta").fetchall())
        return dict(rows)

    # ------------------------------------------------------------------ objects

    def load(self) -> Iterator[tuple[str, str, bytes]]:
        db = self._db.live()
        for kind in LOAD_ORDER:
            cur = db.execute("SELECT kind, key, body FROM tvm_objects WHERE kind = %s", (kind,))
            for k, key, body in cur:
                yield k, key, bytes(body)

    def apply(self, writes: Sequence[Write]) -> None:
        """One transaction per batch (called from the journal's writer thread only)."""
        self._db.run(lambda db: self._apply(db, writes))

    def _apply(self, db: Any, writes: Sequence[Write]) -> None:
        with db.transaction(), db.cursor() as cur:
            self._check_lease(db)
            puts: list[tuple[str, str, bytes]] = []
            for w in writes:
                if w.kind == META_KIND:
                    cur.execute(_PUT_META, (w.key, (w.body or b"").decode()))
                elif w.body is not None:
                    puts.append((w.kind, w.key, w.body))
                else:
                    if puts:
                        cur.executemany(_PUT, _last_wins(puts))
                        puts = []
                    if w.prefix:
                        # Keys are "a/b/c" with names of [A-Za-z0-9_-]; "0" sorts right after "/"
                        # in the C collation the comparison is forced into.
                        cur.execute(
                            'DELETE FROM tvm_objects WHERE kind = %s AND key COLLATE "C" >= %s '
                            'AND key COLLATE "C" < %s',
                            (w.kind, w.key, w.key[:-1] + "0"),
                        )
                    else:
                        cur.execute(
                            "DELETE FROM tvm_objects WHERE kind = %s AND key = %s", (w.kind, w.key)
                        )
            if puts:
                cur.executemany(_PUT, _last_wins(puts))

    # ------------------------------------------------------------------ the lease

    def acquire(self, ttl: float) -> bool:
        """Take the lease if it is free, expired or already ours; on success this store fences
        every later write with it."""
        sql = (
            "INSERT INTO tvm_lease(id, holder, expires) "
            "VALUES (1, %(h)s, now() + make_interval(secs => %(ttl)s)) "
            "ON CONFLICT (id) DO UPDATE SET holder = EXCLUDED.holder, expires = EXCLUDED.expires "
            "WHERE tvm_lease.holder = %(h)s OR tvm_lease.expires < now() "
            "RETURNING holder"
        )
        args = {"h": self.holder, "ttl": ttl}
        row = self._lease_db.run(lambda db: db.execute(sql, args).fetchone())
        if row is not None:
            self.fencing = True
        return row is not None

    def renew(self, ttl: float) -> bool:
        """Extend our lease; False once it is lost (expired and taken, or taken by hand)."""
        sql = (
            "UPDATE tvm_lease SET expires = now() + make_interval(secs => %s) "
            "WHERE id = 1 AND holder = %s AND expires >= now()"
        )
        return self._lease_db.run(lambda db: db.execute(sql, (ttl, self.holder)).rowcount) == 1

    def release(self) -> None:
        """Give the lease up at a clean stop, so a standby takes over at once."""
        sql = "UPDATE tvm_lease SET expires = now() - interval '1 second' WHERE id = 1 AND holder = %s"
        self._lease_db.run(lambda db: db.execute(sql, (self.holder,)))
        self.fencing = False

    def lease_holder(self) -> tuple[str, float] | None:
        """(holder, seconds left) of the current lease, if any."""
        sql = "SELECT holder, EXTRACT(EPOCH FROM expires - now()) FROM tvm_lease WHERE id = 1"
        row = self._lease_db.run(lambda db: db.execute(sql).fetchone())
        return None if row is None else (row[0], float(row[1]))

    def _check_lease(self, db: Any) -> None:
        if not self.fencing:
            return
        row = db.execute(
            "SELECT 1 FROM tvm_lease WHERE id = 1 AND holder = %s AND expires >= now() FOR SHARE",
            (self.holder,),
        ).fetchone()
        if row is None:
            raise StoreFenced(f"the lease on {self.path} is no longer held by {self.holder}")


def _last_wins(rows: list[tuple[str, str, bytes]]) -> list[tuple[str, str, bytes]]:
    """One row per key, the last (ON CONFLICT may not touch a row twice in one statement; with
    executemany each row is its own statement, but the order must still be kept)."""
    return list({(k, key): (k, key, body) for k, key, body in rows}.values())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
