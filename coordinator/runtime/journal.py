"""SQLite journal: the durable copy of the coordinator's in-memory state.

One table of (kind, key) -> msgpack body, written only by the group-commit writer (`Journal`), in
WAL mode with synchronous=FULL so a commit that returned survives power loss. The narrow interface
(`load`, `apply`, `meta`) is what a PostgreSQL backend would implement (DESIGN.md §7).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence

import trio

from coordinator.common.errors import ApiError, unavailable
from coordinator.core import LOAD_ORDER, Write

META_KIND = "\x00meta"  # Write.kind of a meta table row (object kinds are plain words)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    kind TEXT NOT NULL,
    key  TEXT NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


# Rows per INSERT statement. sqlite3 lets go of the GIL around every statement step, and taking it
# back waits for the event loop thread to yield it (up to the 5 ms switch interval when it is busy):
# executemany, one step per row, made a commit of 1,000 rows take ~60 ms under load instead of ~4.
# A few multi-row statements take the GIL back a few times per commit. Chunks are powers of two so
# only a handful of distinct statements exist (each is prepared once and cached).
_CHUNKS = (256, 64, 16, 4, 1)
_PUT_SQL = {
    n: "INSERT OR REPLACE INTO objects(kind, key, body) VALUES " + ",".join(["(?,?,?)"] * n)
    for n in _CHUNKS
}


def _put_rows(cur: sqlite3.Cursor, rows: list[tuple[str, str, bytes]]) -> None:
    """Insert or replace `rows` in a few statements (rows in order: a later one for the same key
    wins, as with one statement per row)."""
    i = 0
    left = len(rows)
    for n in _CHUNKS:
        while left >= n:
            chunk = rows[i : i + n]
            if n == 1:
                cur.execute(_PUT_SQL[1], chunk[0])
            else:
                cur.execute(_PUT_SQL[n], [v for row in chunk for v in row])
            i += n
            left -= n


class SqliteStore:
    def __init__(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def all_meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta"))

    def load(self) -> Iterator[tuple[str, str, bytes]]:
        for kind in LOAD_ORDER:
            yield from self._db.execute("SELECT kind, key, body FROM objects WHERE kind=?", (kind,))

    def apply(self, writes: Sequence[Write]) -> None:
        """Apply a batch in one transaction (called from the writer thread only)."""
        cur = self._db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            puts: list[tuple[str, str, bytes]] = []
            for w in writes:
                if w.kind == META_KIND:  # a meta key (Journal.put_meta), committed with the batch
                    cur.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                        (w.key, (w.body or b"").decode()),
                    )
                    continue
                if w.body is not None:
                    puts.append((w.kind, w.key, w.body))
                    continue
                if puts:
                    _put_rows(cur, puts)
                    puts = []
                if w.prefix:
                    # Keys are "a/b/c" with names of [A-Za-z0-9_-]; "0" sorts right after "/".
                    cur.execute(
                        "DELETE FROM objects WHERE kind=? AND key>=? AND key<?",
                        (w.kind, w.key, w.key[:-1] + "0"),
                    )
                else:
                    cur.execute("DELETE FROM objects WHERE kind=? AND key=?", (w.kind, w.key))
            if puts:
                _put_rows(cur, puts)
            cur.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (SQLITE_FULL does): a second ROLLBACK would
            # raise and hide the real error.
            if self._db.in_transaction:
                cur.execute("ROLLBACK")
            raise


class StoreFenced(RuntimeError):
    """This coordinator no longer holds the store's lease: another one is, or may be, active.
    Nothing more may be written or sent; the coordinator stops (coordinator/daemon/standby.py)."""


# How long writes nobody answers a client for wait for others to share their commit (see Journal).
COALESCE_S = 0.005


class Journal:
    """Group commit: many producers, one writer thread, one transaction per batch.

    `submit()` returns at once with a ticket; `await ticket.wait()` returns once the writes are
    durable. Everything submitted while a commit runs goes into the next one.

    Writes nobody answers a client for (`urgent=False`: an agent's completions, whose only waiter
    is the link's acknowledgement) wait up to `coalesce_s` for more to join them, so that a stream
    of one-task frames does not cost one transaction and fsync per task; an urgent submit (a REST
    command, anything else) ends the wait and commits everything pending at once. Nothing is
    acknowledged before its commit either way.

    A failed commit (disk full, I/O error) fails the tickets it held with 503 StoreUnavailable,
    but its writes stay queued and are retried until the store takes them: the in-memory state
    they describe already changed, so dropping them would let the next commit write a journal
    that disagrees with it. While the store is failing (`unavailable`), the service refuses new
    commands before they change anything; a 503 of the failed commit itself means "not
    acknowledged", and its data may still become durable once space returns.
    """

    RETRY_FIRST_S = 0.2  # first retry of a failed commit; doubles up to RETRY_MAX_S
    RETRY_MAX_S = 2.0

    def __init__(
        self, store: SqliteStore, max_batch: int = 50_000, coalesce_s: float = COALESCE_S
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.coalesce_s = coalesce_s
        self._pending: list[Write] = []
        self._tickets: list[Ticket] = []
        self._wakeup = trio.Event()
        self._urgent = trio.Event()  # set: something pending is waited for by a client
        self._limiter = trio.CapacityLimiter(1)
        self.commits = 0
        self.rows = 0
        self._closed = False
        self._last: Ticket | None = None  # the newest ticket with writes
        self.unavailable: str | None = None  # why the last commit failed; None once one succeeds
        self.failures = 0  # failed commit attempts (metrics, tests)
        # Called after each commit's tickets are settled (done or failed): the links' acknowledger.
        self.on_settled: Callable[[], None] | None = None

    @property
    def backlog(self) -> int:
        """Writes waiting for the next commit (they pile up when the disk is slower than the load)."""
        return len(self._pending)

    def put_meta(self, key: str, value: str) -> Ticket:
        """Queue a meta row for the next group commit (no fsync on the caller's thread)."""
        return self.submit([Write(META_KIND, key, value.encode())])

    def barrier(self) -> Ticket:
        """A ticket that is done once everything submitted so far is durable (commits are in
        order); failed with the store's error while the writes of a failed commit wait for their
        retry (they are not durable, whatever came before them)."""
        last = self._last
        if last is not None and not last.event.is_set():
            return last
        ticket = Ticket()
        if last is not None and last.error is not None:
            ticket.error = last.error
        else:
            ticket.done = True
        ticket.event.set()
        return ticket

    def submit(self, writes: list[Write], urgent: bool = True) -> Ticket:
        ticket = Ticket()
        if not writes:
            ticket.done = True
            ticket.event.set()
            return ticket
        self._pending.extend(writes)
        self._tickets.append(ticket)
        self._last = ticket
        self._wakeup.set()
        if urgent:
            self._urgent.set()
        return ticket

    async def run(self) -> None:
        retry = self.RETRY_FIRST_S
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            # One scheduler pass first: the tasks woken with this submit (the link writer sending
            # a new task its agent) go before the commit's thread, which would take the GIL from
            # them. (A pass costs microseconds; the commit's fsync, milliseconds.)
            await trio.lowlevel.checkpoint()
            while self._pending:
                if not self._urgent.is_set() and self.coalesce_s > 0:
                    with trio.move_on_after(self.coalesce_s):
                        await self._urgent.wait()
                batch, self._pending = self._pending, []
                tickets, self._tickets = self._tickets, []
                self._urgent = trio.Event()
                try:
                    await trio.to_thread.run_sync(self.store.apply, batch, limiter=self._limiter)
                except StoreFenced as exc:  # another coordinator is active: stop, loudly
                    for t in tickets:
                        t.error = exc
                        t.event.set()
                    self._settled()
                    raise
                except Exception as exc:  # the disk failed: every waiter gets the error
                    self.failures += 1
                    self.unavailable = f"{type(exc).__name__}: {exc}"
                    error = store_unavailable(self.unavailable)
                    for t in tickets:
                        t.error = error
                        t.event.set()
                    self._settled()
                    # Keep the writes, in order, ahead of anything submitted meanwhile.
                    self._pending = batch + self._pending
                    await trio.sleep(retry)
                    retry = min(retry * 2, self.RETRY_MAX_S)
                    continue
                retry = self.RETRY_FIRST_S
                self.unavailable = None
                if not self._pending:  # all submitted so far is durable (a failed ticket's too)
                    self._last = None
                self.commits += 1
                self.rows += len(batch)
                for t in tickets:
                    t.done = True
                    t.event.set()
                self._settled()

    def _settled(self) -> None:
        if self.on_settled is not None:
            self.on_settled()


def server_busy(why: str) -> ApiError:
    return unavailable(
        "ServerBusy", f"the coordinator is overloaded ({why}); retry after a moment", retry_after=1
    )


def store_unavailable(why: str) -> ApiError:
    return unavailable(
        "StoreUnavailable",
        f"the coordinator could not write its state ({why}); nothing was acknowledged."
        " Retry after a moment.",
        retry_after=2,
        reason=why,
    )


class Ticket:
    __slots__ = ("event", "done", "error")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.done = False
        self.error: Exception | None = None

    async def wait(self) -> None:
        await self.event.wait()
        if self.error is not None:
            raise self.error
