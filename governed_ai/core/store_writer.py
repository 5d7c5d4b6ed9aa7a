"""The one group-commit writer of the governance store: audit records and journal steps, durably, in bulk.

(Replies stored in the response cache, :mod:`governed_ai.core.response_cache`, ride along in the same
transaction, after the journal steps.)

Callers hand in what one step produced (its audit records and journal steps) and wait until it is
committed; a thread commits whatever queued up while the previous commit ran, in ONE transaction: audit
records first (so nothing journaled is missing from the audit trail), then the journal steps. A paid
step's caller only goes on (frees its concurrency slot) once that commit is done, so after a crash at
most the steps in flight are unknown to the journal. Under load the groups grow by themselves: a
thousand concurrent calls cost a few transactions a second, not a thousand.

Nothing of this runs on an event loop: asyncio callers ``await`` a future the thread resolves, sync
callers block on it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from governed_ai.core.audit import AuditRecord, AuditStore
from governed_ai.core.journal import JournalStep, apply_steps, journal_table
from governed_ai.core.response_cache import CacheWrite, apply_cache_writes
from governed_ai.core.sqlstore import ensure_tables, utc_now, write_connection

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    records: Sequence[AuditRecord]
    steps: Sequence[JournalStep]
    done: asyncio.Future[None] | concurrent.futures.Future[None]
    cached: Sequence[CacheWrite] = ()


class StoreWriter:
    """Commits audit records and journal steps in groups from one thread; see the module docstring."""

    def __init__(self, audit: AuditStore, *, max_group: int = 2_000) -> None:
        self._audit = audit
        self._max_group = max_group
        ensure_tables(audit.engine, [journal_table])
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connection: Connection | None = None  # the writer thread's own, kept between groups
        self.commits = 0
        self.records_written = 0

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="governed-ai-store-writer", daemon=True
                )
                self._thread.start()

    async def write(
        self,
        records: Sequence[AuditRecord] = (),
        steps: Sequence[JournalStep] = (),
        cached: Sequence[CacheWrite] = (),
    ) -> None:
        """Returns once ``records``, ``steps`` and ``cached`` replies are committed (raises what the
        commit raised)."""
        if not records and not steps and not cached:
            return
        self._ensure_thread()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put(_Pending(records, steps, done, cached))
        await done

    def write_sync(self, records: Sequence[AuditRecord] = (), steps: Sequence[JournalStep] = ()) -> None:
        """Blocking twin of :meth:`write`, for code that is not on an event loop."""
        if not records and not steps:
            return
        self._ensure_thread()
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(_Pending(records, steps, done))
        done.result()

    def close(self) -> None:
        """Commit what is queued and stop the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._drop_connection()

    def _serve(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            group = [first]
            while len(group) < self._max_group:  # whatever queued up during the last commit joins in
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                group.append(nxt)
            self._commit(group)

    def _commit(self, group: list[_Pending]) -> None:
        error: BaseException | None = None
        records = [record for pending in group for record in pending.records]
        try:
            if self._connection is None:
                self._connection = write_connection(self._audit.engine)
            connection = self._connection
            with connection.begin():
                head = self._audit.append_in(connection, records)  # first: nothing journaled is unaudited
                apply_steps(connection, [step for pending in group for step in pending.steps])
                cached = [write for pending in group for write in pending.cached]
                if cached:
                    apply_cache_writes(connection, cached, now=utc_now())
            self.commits += 1
            self.records_written += len(records)
        except Exception as failed:  # the waiting callers see the failure
            log.warning("governance store write failed for %d step(s): %s", len(group), failed)
            error = failed
            self._drop_connection()  # a broken connection is not tried again
        if error is None and records:
            self._audit.after_commit(records, head, notify=False)
        self._release(group, error)
        if error is None and records:  # metrics and spans: after the callers have gone on
            self._audit.notify(records)

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    @staticmethod
    def _release(group: list[_Pending], error: BaseException | None) -> None:
        waiting: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for pending in group:
            if isinstance(pending.done, concurrent.futures.Future):
                _settle([pending.done], error)
            else:
                waiting.setdefault(pending.done.get_loop(), []).append(pending.done)
        for loop, futures in waiting.items():  # one wake-up per event loop and group, not per step
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, futures, error)


def _settle(
    futures: Sequence[asyncio.Future[None] | concurrent.futures.Future[None]], error: BaseException | None
) -> None:
    for done in futures:
        if done.done():  # the waiting coroutine was cancelled
            continue
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
