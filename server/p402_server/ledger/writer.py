"""Group-commit writer: many ``write()`` calls, one durable transaction (DESIGN §1, §10).

Owns the only write path into ``events``, ``rollups_hourly`` and ``budget_periods``.
One background task drains a queue; every batch (all queued events, up to
``max_batch``) is deduplicated and converted to row values, then written in one
transaction that

1. inserts the batch's new events (``INSERT … ON CONFLICT (tenant_id, event_id) DO
   NOTHING``) and learns their ``seq``,
2. upserts the hourly rollups of the events really inserted, aggregated in Python
   first (one row per key per batch: ``x = x + excluded.x``), and from those the
   daily spend per customer (``spend_daily``),
3. upserts ``budget_periods`` from their ``budget_charges``,
4. puts the new events' ``contents`` (if any) in the contents table,

and gives every new event its place in its tenant's hash chain (canonical.py):
``chain_index`` = the tenant's head index + 1 and ``chain_hash`` = SHA-256(head hash
|| canonical bytes), in batch order. The canonical bytes are built when the batch
forms (off the transaction); only the SHA-256 steps run inside it. The head of each
tenant is read inside the transaction, after its write lock: on SQLite ``BEGIN
IMMEDIATE`` serialises every writer, and the writer keeps the heads in memory as long
as ``max(seq)`` shows nobody else committed since its own last batch; on PostgreSQL a
per-tenant ``pg_advisory_xact_lock(hashtext(tenant_id))`` (taken in tenant order)
serialises the writers of a tenant across processes, and the head is read under it.
A unique (tenant_id, chain_index) index makes a forked chain impossible regardless.

Transactions run one at a time and in queue order; the next batch forms (and is
converted) while the previous one commits.

Two implementations of that transaction, one contract (the same tests run both):

- SQLite file: on a dedicated thread over one long-lived connection (SQLAlchemy sync
  engine, same pragmas), ``BEGIN IMMEDIATE``, multi-row statements of driver SQL
  (`_ManyRows`: one GIL release per statement, not per row), new seqs read back as
  the rows above the previous ``max(seq)``. One thread hand-off per batch instead of
  one per driver call. WAL checkpoints run beside the transactions on a thread of
  their own, not inside the writer's commits.
- PostgreSQL: the events by binary COPY and the rollups by one upsert per table
  (columns as array literals), through the asyncpg connection inside SQLAlchemy's
  transaction (`_PgOps`); rollup rows sorted so concurrent writers in several
  processes lock in the same order.
  ``sqlite://`` in memory: SQLAlchemy Core (``INSERT … ON CONFLICT DO NOTHING
  RETURNING``).

Idempotency is by (tenant_id, event_id): a duplicate inside the batch or against the
table inserts nothing and touches no rollup or budget row; its caller gets the FIRST
event back (``WriteResult.duplicate``). ``write()`` resolves only after the commit
(with SQLite ``synchronous=FULL``: on disk). A failed transaction fails every awaited
write in it with the exception; nothing in it is acknowledged (it rolled back).
``write_many()`` queues a caller's events together (a RecordBatch: one future for
the lot, not one per event) and answers them together, once every transaction
holding them has finished.

A poisoned event: when a transaction fails because of the data of one of its
events (the database refuses a value: `is_data_error`), the batch is split in halves
and each half committed on its own, down to the single event that fails; only that
event fails, with `EventRejected` (not retryable: the same data fails again), and
the others commit. Every other failure (the database unreachable, a bug) fails the
whole transaction, as it should: a retry may succeed.

``write_behind()`` is for events off the response path (denied, expired): the caller
does not wait. If its transaction fails, the event is retried on its own
(``retry_limit`` times, exponential backoff), logged at WARNING on each failure and at
ERROR with the full event if it is given up (then kept in ``dead_letters``): never
lost silently.

One room, though long: the group-commit pipeline (queue, batches, retries, the
isolation of a refused event) and its database paths (SQLite on its own thread,
PostgreSQL with COPY, SQLAlchemy Core otherwise) share the batch, the chain step and
the aggregation, and a change to one is checked against the others.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import operator
import sqlite3
import time
from dataclasses import dataclass
from itertools import chain
from typing import Any

import sqlalchemy as sa

from p402_server.ledger import schema as S
from p402_server.ledger.canonical import encoder
from p402_server.ledger.model import (
    EVENT_COLUMNS,
    HOLD_COLUMNS,
    LedgerEvent,
    WriteResult,
    from_row,
    unchained_values,
)
from p402core import InvalidArgument

log = logging.getLogger("p402.store.writer")


class EventRejected(InvalidArgument):
    """The database refused this event's data (alone in its transaction): writing it
    again cannot succeed. Events are checked against the contract before they are
    queued (LedgerEvent.validate), so this means a value the contract let through."""

    def __init__(self, event_id: str, cause: BaseException):
        super().__init__("event", f"the ledger cannot store event {event_id!r}: "
                                  f"{type(cause).__name__}: {str(cause)[:200]}")
        self.event_id = event_id


def is_data_error(exc: BaseException) -> bool:
    """Did the database (or its driver) refuse a value, rather than fail to work?
    SQLSTATE class 22 on PostgreSQL (asyncpg.DataError, client-side encoding
    included), sqlite3.DataError, a str it cannot encode, an int it cannot bind."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, (UnicodeError, OverflowError, EventRejected)):
            return True
        if isinstance(exc, sa.exc.DataError):
            return True
        mod = type(exc).__module__
        if mod.startswith("asyncpg") and _asyncpg_data_error(exc):
            return True
        if mod == "sqlite3" and type(exc).__name__ == "DataError":
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__
        seen += 1
    return False


def _asyncpg_data_error(exc: BaseException) -> bool:
    import asyncpg

    return isinstance(exc, asyncpg.DataError)

HOUR_MS = 3_600_000
# A batch of at least twice this many, with no transaction in flight, is split in two
# so that two transactions overlap (see _loop_forever).
PIPELINE_MIN = 64


@dataclass
class WriterStats:
    """Counters for operators and tests (a transaction is one commit attempt)."""

    transactions: int = 0
    failed_transactions: int = 0
    events: int = 0  # newly inserted
    duplicates: int = 0
    retries: int = 0
    dead_letters: int = 0
    largest_batch: int = 0
    splits: int = 0  # transactions split to isolate an event the database refused


class _Epoch:
    """Items enqueued between two flush() calls; flush waits for its epoch to drain."""

    __slots__ = ("outstanding", "waiter")

    def __init__(self) -> None:
        self.outstanding = 0
        self.waiter: asyncio.Future | None = None


class _Item:
    __slots__ = ("event", "future", "epoch", "attempts", "due")

    def __init__(self, event: LedgerEvent, future: asyncio.Future | None, epoch: _Epoch):
        self.event = event
        self.future = future  # None: write-behind
        self.epoch = epoch
        self.attempts = 0
        self.due = 0.0


class _Group:
    """The shared answer of one ``write_many``: a result (or exception) per event,
    and one future resolved when the last of them is in."""

    __slots__ = ("results", "left", "future")

    def __init__(self, n: int, future: asyncio.Future):
        self.results: list = [None] * n
        self.left = n
        self.future = future


class _Member:
    """An event's place in a ``_Group``; stands in for its ``_Item.future`` (the
    writer only calls done(), set_result() and set_exception() on it)."""

    __slots__ = ("group", "index", "_done")

    def __init__(self, group: _Group, index: int):
        self.group = group
        self.index = index
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result) -> None:
        self._done = True
        group = self.group
        group.results[self.index] = result
        group.left -= 1
        if not group.left and not group.future.done():
            group.future.set_result(None)

    set_exception = set_result  # the exception takes the event's place


class GroupCommitWriter:
    """Durable, coalescing event writer for one Store. See the module docstring.

    ``write(event)`` validates the event, takes ownership of it (the writer fills in
    ``recorded_ms`` when 0, ``event_ms`` when 0, and ``seq``) and returns a
    ``WriteResult`` once committed. ``max_delay_ms`` bounds the gather window before a
    batch: the writer keeps yielding to the event loop while new events keep arriving,
    and commits at once when a loop turn brings none (so a lone write is not delayed).
    """

    def __init__(
        self,
        store: Any,
        *,
        max_batch: int = 1000,
        max_delay_ms: float = 2,
        retry_limit: int = 5,
        retry_base_s: float = 0.05,
    ):
        if max_batch < 1:
            raise ValueError("max_batch: must be >= 1")
        if max_delay_ms < 0:
            raise ValueError("max_delay_ms: must be >= 0")
        self.store = store
        self.max_batch = max_batch
        self.max_delay_ms = max_delay_ms
        self.retry_limit = retry_limit
        self.retry_base_s = retry_base_s
        self.stats = WriterStats()
        self.dead_letters: list[LedgerEvent] = []
        self._queue: list[_Item] = []
        # Called with (events, seconds) after each successful transaction (metrics.py).
        self.on_commit = None
        self._retry: list[_Item] = []
        self._epoch = _Epoch()
        self._epochs: list[_Epoch] = [self._epoch]
        self._wakeup: asyncio.Event | None = None
        # Set while the loop waits for arrivals during a commit (see _loop_forever).
        self._arrival: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._stopped = False
        self._ops = _make_ops(store)
        # On a SQLite file the writer's thread has its own connection: it takes its
        # turn with the store's other writes (Store.write_turn), so none starves.
        self._write_turn = (getattr(store, "write_turn", None)
                            if isinstance(self._ops, _SqliteThreadOps) else None)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background task (idempotent while running)."""
        if self._stopped or self._stopping:
            raise RuntimeError("writer: stopped; create a new GroupCommitWriter")
        if self._task is None:
            await self._ops.start()
            self._loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="p402-group-commit"
            )

    async def flush(self) -> None:
        """Wait until every event enqueued before this call is committed (or failed:
        an awaited write's caller got the error; a write-behind event was dead-lettered)."""
        self._check_running()
        earlier = [ep for ep in self._epochs if ep.outstanding]
        self._epoch = _Epoch()
        # Epochs still draining stay listed, so a later flush() waits for them too.
        self._epochs = [*earlier, self._epoch]
        for ep in earlier:
            if ep.outstanding:
                if ep.waiter is None:
                    ep.waiter = asyncio.get_running_loop().create_future()
                await asyncio.shield(ep.waiter)

    async def stop(self) -> None:
        """Flush, then end the background task. Idempotent; later writes raise."""
        if self._task is not None and not self._stopped and not self._stopping:
            await self.flush()
            self._stopping = True
            assert self._wakeup is not None
            self._wakeup.set()
        if self._task is not None:
            await self._task  # already finished if the writer crashed
        self._stopped = True
        await self._ops.close()  # idempotent

    @property
    def running(self) -> bool:
        return self._task is not None and not self._stopping and not self._stopped

    # -- submitting ------------------------------------------------------------------

    async def write(self, event: LedgerEvent) -> WriteResult:
        """Queue ``event`` and return once the transaction holding it has committed.

        A caller that gives up (cancellation, deadline) does not unqueue the event: it
        may still commit, and retrying with the same event_id is safe (idempotent)."""
        if self._task is None or self._stopping or self._stopped:
            self._check_running()
        event.validate()
        fut = self._loop.create_future()
        epoch = self._epoch
        epoch.outstanding += 1  # _enqueue, inlined: this runs once per Record
        self._queue.append(_Item(event, fut, epoch))
        self._wakeup.set()  # type: ignore[union-attr]
        arrival = self._arrival
        if arrival is not None and not arrival.done():
            arrival.set_result(None)
        return await fut

    async def write_many(self, events: list[LedgerEvent], *,
                         return_exceptions: bool = False) -> list[WriteResult]:
        """``write()`` for several events at once: queued together, in order, and
        answered together (one future for the lot instead of one per event) once
        every transaction holding them has finished; one WriteResult per event, in
        order. The events may span two transactions: with ``return_exceptions`` a
        failed transaction's events get its exception in their place (the others
        their results), else the first failure is raised once all have finished.
        Every event is validated before any is queued."""
        if self._task is None or self._stopping or self._stopped:
            self._check_running()
        for event in events:
            event.validate()
        if not events:
            return []
        group = _Group(len(events), self._loop.create_future())
        epoch = self._epoch
        epoch.outstanding += len(events)
        self._queue.extend([_Item(event, _Member(group, i), epoch)
                            for i, event in enumerate(events)])
        self._wakeup.set()  # type: ignore[union-attr]
        arrival = self._arrival
        if arrival is not None and not arrival.done():
            arrival.set_result(None)
        await group.future
        results = group.results
        if not return_exceptions:
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        return results

    async def save_holds(self, tenant_id: str, rows: list[tuple],
                         deletes=()) -> None:
        """The open holds' write-behind (`Store.save_hold_rows`: rows from
        `model.hold_row`, deletes first, one transaction). On a SQLite file it runs on
        the writer's own thread and connection, between its transactions: no second
        connection contending for the write lock, no SQLAlchemy work per row, and
        never between a batch's events. Elsewhere (or once the writer is stopped)
        through the store."""
        deletes = list(deletes)
        if not rows and not deletes:
            return
        if isinstance(self._ops, _SqliteThreadOps) and self._ops.running():
            async with self._write_turn or contextlib.nullcontext():
                await self._ops.save_hold_rows(tenant_id, rows, deletes)
        else:
            await self.store.save_hold_rows(tenant_id, rows, deletes)

    def write_behind(self, event: LedgerEvent) -> None:
        """Queue ``event`` without waiting (validation errors still raise here)."""
        self._check_running()
        event.validate()
        self._enqueue(_Item(event, None, self._epoch))

    def _check_running(self) -> None:
        if self._task is None or self._stopping or self._stopped:
            raise RuntimeError("writer: not running (call start(); stop() is final)")

    def _enqueue(self, item: _Item) -> None:
        item.epoch.outstanding += 1
        self._queue.append(item)
        assert self._wakeup is not None
        self._wakeup.set()
        arrival = self._arrival
        if arrival is not None and not arrival.done():
            arrival.set_result(None)

    def _settle(self, item: _Item) -> None:
        ep = item.epoch
        ep.outstanding -= 1
        if ep.outstanding == 0 and ep.waiter is not None and not ep.waiter.done():
            ep.waiter.set_result(None)

    # -- the background task ---------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._loop_forever()
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("p402 store: the group-commit writer crashed")
            self._stopped = True
            failure = RuntimeError(f"writer: stopped unexpectedly ({exc!r})")
            for item in [*self._queue, *self._retry]:
                if item.future is not None and not item.future.done():
                    item.future.set_exception(failure)
                elif item.future is None:
                    self.dead_letters.append(item.event)
                    log.error("p402 store: write-behind event not written: %s", item.event.to_dict())
                self._settle(item)
            self._queue.clear()
            self._retry.clear()
            if not isinstance(exc, Exception):  # cancellation, interpreter exit
                raise

    async def _loop_forever(self) -> None:
        assert self._wakeup is not None
        wakeup = self._wakeup
        queue = self._queue
        inflight: asyncio.Future | None = None  # the transaction on its way to disk
        while True:
            if queue:
                max_batch = self.max_batch
                if inflight is None:
                    await self._gather_window()
                    take = min(len(queue), max_batch)
                    if take >= 2 * PIPELINE_MIN:
                        # Nothing is on its way to disk: send half now and convert the
                        # other half while it commits. Two transactions in the pipe
                        # overlap the database's work (which releases the GIL) with
                        # the Python work of the next batch and its callers.
                        take = (take + 1) // 2
                else:
                    take = min(len(queue), max_batch)
                batch = _Batch(self.store.now_ms())
                batch.add(queue[:take])
                del queue[:take]
                if inflight is not None:
                    # Keep adding (and converting) arrivals to this batch while the
                    # previous one commits; transactions still run one at a time, in
                    # order.
                    while not inflight.done() and len(batch.items) < max_batch:
                        if not queue:
                            # One plain future, resolved by the next write() or by the
                            # commit, whichever comes first (no task per wait).
                            arrival = self._loop.create_future()
                            self._arrival = arrival
                            inflight.add_done_callback(
                                lambda _f, a=arrival: a.done() or a.set_result(None))
                            await arrival
                            self._arrival = None
                        room = max_batch - len(batch.items)
                        if queue and room > 0:
                            batch.add(queue[:room])
                            del queue[:room]
                    await inflight
                inflight = asyncio.ensure_future(self._commit_batch(batch))
                continue
            if inflight is not None:
                if not inflight.done():
                    # Wait for the commit or for new events, whichever comes first.
                    wakeup.clear()
                    waiter = asyncio.ensure_future(wakeup.wait())
                    await asyncio.wait((inflight, waiter), return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                if inflight.done():
                    inflight = None
                continue
            now = time.monotonic()
            due = [it for it in self._retry if it.due <= now]
            if due:
                # Retried events go one per transaction, so a bad one cannot keep
                # failing a batch that other callers wait on.
                item = due[0]
                self._retry.remove(item)
                self.stats.retries += 1
                batch = _Batch(self.store.now_ms())
                batch.add([item])
                await self._commit_batch(batch)
                continue
            if self._stopping and not self._retry:
                return
            wakeup.clear()
            timeout = min(it.due for it in self._retry) - now if self._retry else None
            try:
                await asyncio.wait_for(wakeup.wait(), timeout)
            except TimeoutError:
                pass

    async def _gather_window(self) -> None:
        """Let concurrent writers join the batch while they keep arriving."""
        if self.max_delay_ms <= 0:
            return
        deadline = time.monotonic() + self.max_delay_ms / 1000
        queue = self._queue
        while len(queue) < self.max_batch:
            before = len(queue)
            await asyncio.sleep(0)
            if len(queue) == before or time.monotonic() >= deadline:
                return

    def queue_depth(self) -> int:
        """Events waiting for a transaction (or for their retry)."""
        return len(self._queue) + len(self._retry)

    async def _commit_batch(self, batch: "_Batch") -> None:
        """Run one transaction and answer every item in it (never raises)."""
        items = batch.items
        self.stats.transactions += 1
        if len(items) > self.stats.largest_batch:
            self.stats.largest_batch = len(items)
        started = time.perf_counter()
        try:
            results = await self._transaction(batch)
            if self.on_commit is not None:
                self.on_commit(len(items), time.perf_counter() - started)
        except Exception as exc:  # every waiter in the transaction gets the error
            self.stats.failed_transactions += 1
            if is_data_error(exc):
                if len(items) > 1:
                    # One event's data broke the transaction: find it by halves, so
                    # the others commit (module docstring).
                    log.warning("p402 store: transaction of %d events refused a value "
                                "(%r); committing it in halves", len(items), exc)
                    self.stats.splits += 1
                    mid = len(items) // 2
                    for part in (items[:mid], items[mid:]):
                        half = _Batch(batch.now)
                        half.add(part)
                        await self._commit_batch(half)
                    return
                exc = EventRejected(items[0].event.event_id, exc)
                log.error("p402 store: %s", exc)
            else:
                log.warning("p402 store: transaction of %d events failed: %r",
                            len(items), exc)
            for item in items:
                if item.future is not None:
                    if not item.future.done():
                        item.future.set_exception(exc)
                    self._settle(item)
                else:
                    self._schedule_retry(item, exc)
            return
        for item, result in zip(items, results):
            ev = item.event
            ev.in_ledger = True
            if ev.contents:
                # Stored (or the ledger had the event): the text is not needed in
                # memory any more, where the idempotency memory would keep it.
                ev.contents = ()
            fut = item.future
            if fut is not None and not fut.done():
                fut.set_result(result)
            ep = item.epoch  # _settle, inlined
            ep.outstanding -= 1
            if ep.outstanding == 0 and ep.waiter is not None and not ep.waiter.done():
                ep.waiter.set_result(None)

    def _schedule_retry(self, item: _Item, exc: BaseException) -> None:
        item.attempts += 1
        if item.attempts > self.retry_limit or isinstance(exc, EventRejected):
            self.stats.dead_letters += 1
            self.dead_letters.append(item.event)
            log.error(
                "p402 store: giving up on write-behind event after %d attempts (%r): %s",
                item.attempts,
                exc,
                item.event.to_dict(),
            )
            self._settle(item)
            return
        item.due = time.monotonic() + min(self.retry_base_s * 2 ** (item.attempts - 1), 5.0)
        self._retry.append(item)

    async def _transaction(self, batch: "_Batch") -> list[WriteResult]:
        """One transaction for the batch; returns one WriteResult per item, in order."""
        if batch.error is not None:
            raise batch.error
        unique, slot = batch.unique, batch.slot
        async with self._write_turn or contextlib.nullcontext():
            seqs, existing, links, lost = await self._ops.write_batch(
                unique, batch.values, batch.canon, batch.rollups(self._ops.ORDERED))

        inserted = 0
        for ev in unique:
            key = (ev.tenant_id, ev.event_id)
            seq = seqs.get(key)
            if seq is not None:
                ev.seq = seq
                ev.chain_index, ev.chain_hash = links[key]
                inserted += 1
        self.stats.events += inserted
        self.stats.duplicates += len(slot) - inserted

        out: list[WriteResult] = []
        seen: set[int] = set()
        for idx in slot:
            ev = unique[idx]
            if lost and idx in lost:  # another event settled its reservation
                out.append(WriteResult(ev, 0, False, lost[idx]))
                continue
            ledger = existing.get((ev.tenant_id, ev.event_id)) if existing else None
            if ledger is not None:  # already in the table before this batch
                out.append(WriteResult(ledger, ledger.seq, True))
            elif idx in seen:  # a repeat inside this batch
                out.append(WriteResult(ev, ev.seq, True))
            else:
                seen.add(idx)
                out.append(WriteResult(ev, ev.seq, False))
        return out


class _Batch:
    """The items of one transaction, deduplicated by (tenant_id, event_id) and turned
    into row values as they are added (possibly while the previous batch commits)."""

    __slots__ = ("now", "items", "unique", "slot", "values", "canon", "first_of", "groups",
                 "error")

    def __init__(self, now_ms: int):
        self.now = now_ms
        self.items: list[_Item] = []
        self.unique: list[LedgerEvent] = []
        self.slot: list[int] = []  # per item: index into `unique`
        self.values: list[tuple] = []  # per unique event, without the chain columns
        self.canon: list[bytes] = []  # per unique event: canonical_bytes
        self.first_of: dict[tuple[str, str], int] = {}
        self.groups: dict[tuple, list] = {}  # rollup rows of every unique event
        self.error: Exception | None = None

    def add(self, items: list[_Item]) -> None:
        self.items.extend(items)
        now, first_of, unique, slot, values, canon = (
            self.now, self.first_of, self.unique, self.slot, self.values, self.canon)
        encode = encoder()
        start = len(unique)
        try:
            for item in items:
                ev = item.event
                if not ev.recorded_ms:
                    ev.recorded_ms = now
                if not ev.event_ms:
                    ev.event_ms = ev.recorded_ms
                key = (ev.tenant_id, ev.event_id)
                idx = first_of.get(key)
                if idx is None:
                    idx = first_of[key] = len(unique)
                    unique.append(ev)
                    values.append(unchained_values(ev))
                    canon.append(encode(ev))
                slot.append(idx)
            _group_rollups(values[start:], self.groups)  # the events new to the batch
        except Exception as exc:  # validated events cannot fail here; if one does,
            self.error = exc  # the whole batch fails like a failed transaction

    def rollups(self, ordered: bool = True) -> list[tuple]:
        """The hourly rollup rows of every unique event, sorted when ``ordered`` (the
        lock order): what the transaction adds when every event is new, the common
        case. Summed as events join the batch, on the event loop, while the previous
        transaction is on its way to disk, instead of inside the transaction."""
        return _rollup_rows(self.groups, ordered=ordered)


Seqs = dict[tuple[str, str], int]
Existing = dict[tuple[str, str], LedgerEvent]
# (tenant_id, event_id) -> (chain_index, chain_hash) of each event the batch inserted
Links = dict[tuple[str, str], tuple[int, str]]
# tenant_id -> (head chain hash as 32 raw bytes, head chain_index); GENESIS = (0*32, 0)
Heads = dict[str, tuple[bytes, int]]

_GENESIS_HEAD = (bytes(32), 0)
_sha256 = hashlib.sha256


def _chain(
    unique: list[LedgerEvent], values: list[tuple], canon: list[bytes], heads: Heads,
    keep: list[int] | None = None,
) -> tuple[list[tuple], Links, Heads]:
    """Chain the events at positions ``keep`` (default: all) in order: their full row
    values (chain columns appended), their links, and the tenants' new heads. ``heads``
    must hold every tenant of those events; it is not modified."""
    new_heads: Heads = {}
    rows: list[tuple] = []
    links: Links = {}
    positions = range(len(unique)) if keep is None else keep
    for i in positions:
        tenant = unique[i].tenant_id
        prev, index = new_heads.get(tenant) or heads[tenant]
        prev = _sha256(prev + canon[i]).digest()
        index += 1
        new_heads[tenant] = (prev, index)
        h = prev.hex()
        rows.append(values[i] + (index, h))
        links[(tenant, unique[i].event_id)] = (index, h)
    return rows, links, new_heads


_HEAD_SQL = (
    "SELECT chain_index, chain_hash FROM events WHERE tenant_id = {p} "
    "AND chain_index IS NOT NULL ORDER BY chain_index DESC LIMIT 1"
)


def _head_of(row) -> tuple[bytes, int]:
    if row is None:
        return _GENESIS_HEAD
    index, h = row
    return bytes.fromhex(h), int(index)


def _content_rows(inserted: list[LedgerEvent]) -> list[tuple]:
    """contents rows (tenant_id, event_id, kind, mode, text, created_ms, expires_ms) of
    the new events that carry content."""
    rows = []
    for ev in inserted:
        if ev.contents:
            for c in ev.contents:
                rows.append((ev.tenant_id, ev.event_id, c.kind, int(c.mode), c.text,
                             c.created_ms or ev.recorded_ms, c.expires_ms))
    return rows


CONTENT_COLUMNS = ("tenant_id", "event_id", "kind", "mode", "text", "created_ms", "expires_ms")


# Settlement claims (LedgerEvent.claim; leases on): index in `unique` -> the event_id
# that holds the claim on its reservation instead of it.
Lost = dict[int, str]

_CLAIM_COLUMNS = ("tenant_id", "reservation_id", "event_id", "claimed_ms")


def _claimers(unique: list[LedgerEvent]) -> list[int]:
    """Indices of the events that claim their reservation's settlement."""
    return [i for i, ev in enumerate(unique) if ev.claim and ev.reservation_id]


def _lost_claims(unique: list[LedgerEvent], claimers: list[int], winners: dict) -> Lost:
    """Which claimers lost: the claim row of their reservation names another event
    (`winners`: (tenant_id, reservation_id) -> event_id, read after the inserts)."""
    lost: Lost = {}
    for i in claimers:
        ev = unique[i]
        won_by = winners.get((ev.tenant_id, ev.reservation_id), ev.event_id)
        if won_by != ev.event_id:
            lost[i] = won_by
    return lost


def _existing_stmt(keys: list[tuple[str, str]]):
    ev = S.events
    return sa.select(ev).where(sa.tuple_(ev.c.tenant_id, ev.c.event_id).in_(keys))


class _ManyRows:
    """An ``INSERT … VALUES (?, …) [ON CONFLICT …]`` statement run for many rows as a
    few multi-row statements, not an ``executemany``.

    ``executemany`` steps the statement once per row, and the sqlite3 module releases
    and takes back the GIL around every step. In a serving process the event loop's
    thread holds the GIL most of the time, so each take-back waits for its switch
    interval (5 ms): 500 rows took 0.14–1.7 s instead of 20–30 ms beside a thread
    busy in Python, and a proxy's Records fell seconds behind its answers (every
    open hold was then written, and deleted again). A multi-row statement is one
    step. Chunks are powers of two rows (at most log2(n) statements, and a few
    distinct texts for the driver's statement cache) within SQLite's limit of bound
    variables per statement."""

    __slots__ = ("_head", "_group", "_tail", "width", "max_rows", "_texts")

    def __init__(self, single: str) -> None:
        head, _, rest = single.partition(" VALUES (")
        group, _, tail = rest.partition(")")
        self._head = head + " VALUES "
        self._group = "(" + group + ")"
        self._tail = tail
        self.width = group.count("?")
        self.max_rows = 1
        self._texts: dict[int, str] = {}
        self.limit(999)  # SQLite's smallest default; `limit` sets the connection's

    def limit(self, max_variables: int, max_rows: int = 512) -> None:
        n = 1
        while 2 * n <= max_rows and 2 * n * self.width <= max_variables:
            n *= 2
        self.max_rows = n

    def text(self, n: int) -> str:
        """The statement for `n` rows."""
        t = self._texts.get(n)
        if t is None:
            t = self._texts[n] = self._head + ", ".join([self._group] * n) + self._tail
        return t

    def run(self, conn, rows: list[tuple]) -> int:
        """Every row of `rows`, in order, on `conn` (the driver's cursor, or a
        SQLAlchemy connection); returns the rows changed (SQLite's changes():
        inserted, or updated by an upsert; not those a DO NOTHING skipped)."""
        execute = getattr(conn, "exec_driver_sql", None) or conn.execute
        changed, i, n, size = 0, 0, len(rows), self.max_rows
        while i < n:
            while size > n - i:
                size //= 2
            values = tuple(chain.from_iterable(rows[i:i + size]))
            changed += execute(self.text(size), values).rowcount
            i += size
        return changed


class _SqliteSQL:
    """The SQLite write statements as driver SQL, values bound as tuples: the same
    INSERT … ON CONFLICT DO NOTHING and upserts the Core path compiles, without
    SQLAlchemy's per-row parameter processing (measured to cost about as much as the
    database work at 1000 events per batch; benchmarks/bench_record_sqlite.py)."""

    def __init__(self) -> None:
        self.insert = (
            f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(EVENT_COLUMNS))}) "
            "ON CONFLICT (tenant_id, event_id) DO NOTHING"
        )
        self.claim = (
            f"INSERT INTO hold_claims ({', '.join(_CLAIM_COLUMNS)}) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (tenant_id, reservation_id) DO NOTHING"
        )
        self.max_seq = "SELECT coalesce(max(seq), 0) FROM events"
        self.undo = "DELETE FROM events WHERE seq > ?"
        self.head = _HEAD_SQL.format(p="?")
        key, sums = S.ROLLUP_KEY, S.ROLLUP_SUMS
        self.rollups = (
            f"INSERT INTO rollups_hourly ({', '.join((*key, *sums))}) "
            f"VALUES ({', '.join('?' * (len(key) + len(sums)))}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
            + ", ".join(f"{c} = rollups_hourly.{c} + excluded.{c}" for c in sums)
        )
        dkey = S.SPEND_DAILY_KEY
        self.daily = (
            f"INSERT INTO spend_daily ({', '.join((*dkey, *sums))}) "
            f"VALUES ({', '.join('?' * (len(dkey) + len(sums)))}) "
            f"ON CONFLICT ({', '.join(dkey)}) DO UPDATE SET "
            + ", ".join(f"{c} = spend_daily.{c} + excluded.{c}" for c in sums)
        )
        self.periods = (
            "INSERT INTO budget_periods (tenant_id, budget_id, period_start_ms, committed_nanos) "
            "VALUES (?, ?, ?, ?) ON CONFLICT (tenant_id, budget_id, period_start_ms) DO UPDATE "
            "SET committed_nanos = budget_periods.committed_nanos + excluded.committed_nanos"
        )
        self.hold_upsert = (
            f"INSERT INTO holds ({', '.join(HOLD_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(HOLD_COLUMNS))}) "
            "ON CONFLICT (tenant_id, reservation_id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in HOLD_COLUMNS[2:])
        )
        self.contents = (
            f"INSERT INTO contents ({', '.join(CONTENT_COLUMNS)}) VALUES "
            f"({', '.join('?' * len(CONTENT_COLUMNS))}) "
            "ON CONFLICT (tenant_id, event_id, kind) DO UPDATE SET mode = excluded.mode, "
            "text = excluded.text, created_ms = excluded.created_ms, "
            "expires_ms = excluded.expires_ms"
        )


def _begin_immediate(conn) -> None:
    # Take SQLite's write lock when the transaction starts, not at its first write:
    # the batch then sees no other writer between reading max(seq) and inserting.
    conn.exec_driver_sql("BEGIN IMMEDIATE")


def _driver_autocommit(dbapi_conn, _record) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would otherwise
    # open its own deferred transaction at the first INSERT).
    dbapi_conn.isolation_level = None


def _backstop_checkpoint(dbapi_conn, _record) -> None:
    # Checkpoints are _Checkpointer's; a commit checkpoints only if they fall behind.
    dbapi_conn.execute(f"PRAGMA wal_autocheckpoint={_Checkpointer.BACKSTOP_PAGES}")


class _SqliteThreadOps:
    """SQLite file databases: the whole transaction runs on one dedicated thread over
    one long-lived connection (SQLAlchemy sync engine, same pragmas), so a batch costs
    one hand-off between threads instead of one per driver call, and the event loop
    keeps serving callers — who form the next batch — while the database works.

    Inside BEGIN IMMEDIATE (the write lock held throughout), events go in with
    multi-row INSERT … ON CONFLICT DO NOTHING statements (`_ManyRows`; no RETURNING,
    measured dearer), chained on the assumption that every event is new.
    When every event was new, the new seqs follow from max(seq) before and after.
    When some were already in the table (a retry the server had forgotten: rare), the
    rows just inserted are deleted again (they are exactly those above the previous
    max(seq)), the existing events are read, and only the new ones are chained and
    inserted, in the same transaction.

    Chain heads are cached per tenant; the cache holds while max(seq) at the start of
    a batch is what this writer left after its previous one (nobody else wrote).

    Checkpoints (copying the WAL's pages into the database file, and its fsync) run
    beside the transactions, on a thread and connection of their own (`_Checkpointer`),
    instead of inside a commit of the writer's every few transactions."""

    ORDERED = False  # rollup rows in any order: one writer, no lock order to keep

    def __init__(self, url: sa.engine.URL) -> None:
        from p402_server.ledger.engine import _sqlite_pragmas

        self._engine = sa.create_engine(url.set(drivername="sqlite+pysqlite"))
        sa.event.listen(self._engine, "connect", _sqlite_pragmas)
        sa.event.listen(self._engine, "connect", _driver_autocommit)
        sa.event.listen(self._engine, "connect", _backstop_checkpoint)
        sa.event.listen(self._engine, "begin", _begin_immediate)
        self._sql = _SqliteSQL()
        sql = self._sql
        self._many = {name: _ManyRows(getattr(sql, name)) for name in (
            "insert", "claim", "rollups", "daily", "periods", "hold_upsert", "contents")}
        self._executor: Any = None
        self._conn: sa.Connection | None = None
        self._checkpointer: _Checkpointer | None = None
        self._heads: Heads = {}
        self._last_seq = -1  # max(seq) after this writer's last commit

    async def start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(1, thread_name_prefix="p402-writer")
        self._conn = await self._run(self._engine.connect)
        await self._run(self._fit_statements)
        self._checkpointer = _Checkpointer(self._engine)

    def _fit_statements(self) -> None:
        # On the writer's thread: the connection's own limit of bound variables.
        assert self._conn is not None
        dbapi = self._conn.connection.dbapi_connection
        variables = dbapi.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        for many in self._many.values():
            many.limit(variables)

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._checkpointer is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._checkpointer.close)
            self._checkpointer = None
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        await self._run(self._engine.dispose)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _run(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def write_batch(
        self, unique: list[LedgerEvent], values: list[tuple], canon: list[bytes],
        rollups: list[tuple],
    ) -> tuple[Seqs, Existing, Links, Lost]:
        return await self._run(self._write_sync, unique, values, canon, rollups)

    def running(self) -> bool:
        return self._executor is not None and self._conn is not None

    async def save_hold_rows(self, tenant_id: str, rows: list[tuple],
                             deletes: list[str]) -> None:
        await self._run(self._save_holds_sync, tenant_id, rows, deletes)

    def _save_holds_sync(self, tenant_id: str, rows: list[tuple], deletes: list[str]
                         ) -> None:
        conn = self._conn
        assert conn is not None
        with conn.begin():
            for i in range(0, len(deletes), 500):
                chunk = deletes[i:i + 500]
                conn.exec_driver_sql(
                    "DELETE FROM holds WHERE tenant_id = ? AND reservation_id IN "
                    f"({', '.join('?' * len(chunk))})", (tenant_id, *chunk))
            if rows:
                self._many["hold_upsert"].run(conn, rows)

    def _claims_sync(self, cur, unique: list[LedgerEvent], now_ms: int) -> Lost:
        claimers = _claimers(unique)
        if not claimers:
            return {}
        inserted = self._many["claim"].run(cur, [
            (unique[i].tenant_id, unique[i].reservation_id, unique[i].event_id, now_ms)
            for i in claimers])
        if inserted == len(claimers):  # every claim is new (the common case)
            return {}
        winners: dict = {}
        keys = sorted({(unique[i].tenant_id, unique[i].reservation_id) for i in claimers})
        for k in range(0, len(keys), 400):
            chunk = keys[k : k + 400]
            where = " OR ".join(["(tenant_id = ? AND reservation_id = ?)"] * len(chunk))
            rows = cur.execute(
                f"SELECT tenant_id, reservation_id, event_id FROM hold_claims WHERE {where}",
                tuple(x for key in chunk for x in key)).fetchall()
            winners.update({(t, r): e for t, r, e in rows})
        return _lost_claims(unique, claimers, winners)

    def _heads_for(self, conn, unique: list[LedgerEvent]) -> Heads:
        heads = self._heads
        for ev in unique:
            t = ev.tenant_id
            if t not in heads:
                heads[t] = _head_of(conn.exec_driver_sql(self._sql.head, (t,)).first())
        return heads

    def _write_sync(
        self, unique: list[LedgerEvent], values: list[tuple], canon: list[bytes],
        rollups: list[tuple],
    ) -> tuple[Seqs, Existing, Links, Lost]:
        conn = self._conn
        assert conn is not None
        sql = self._sql
        existing: Existing = {}
        with conn.begin():
            # The batch's statements go to the driver's cursor inside SQLAlchemy's
            # transaction: one batch is about ten statements, and each through
            # SQLAlchemy's execution context cost tens of µs of Python on this thread,
            # beside the event loop's (a Record at a time, most of a batch's cost).
            cur = conn.connection.dbapi_connection.cursor()
            before = cur.execute(sql.max_seq).fetchone()[0]
            if before != self._last_seq:  # another writer committed: heads may be stale
                self._heads.clear()
            heads = self._heads_for(conn, unique)
            lost = self._claims_sync(cur, unique, time.time_ns() // 1_000_000)
            keep = [i for i in range(len(unique)) if i not in lost] if lost else None
            rows, links, new_heads = _chain(unique, values, canon, heads, keep)
            count = self.insert_events(cur, rows) if rows else 0
            inserted = unique if keep is None else [unique[i] for i in keep]
            inserted_rows = rows
            if count != len(rows):
                # Some were already in the ledger: undo, and chain only the new ones.
                conn.exec_driver_sql(sql.undo, (before,))
                keys = [(ev.tenant_id, ev.event_id) for ev in unique]
                existing = _select_existing_sync(conn, keys, check=False)
                keep = [i for i, k in enumerate(keys) if k not in existing and i not in lost]
                rows, links, new_heads = _chain(unique, values, canon, heads, keep)
                inserted = [unique[i] for i in keep]
                inserted_rows = rows
                count = self.insert_events(cur, rows) if rows else 0
                if count != len(rows):
                    raise RuntimeError("store: events appeared that this batch did not insert")
            after = cur.execute(sql.max_seq).fetchone()[0]
            if after - before != count:  # another writer despite the lock: refuse to guess
                raise RuntimeError("store: events appeared that this batch did not insert")
            # Every new row took max(rowid) + 1 in insertion order (sqlite.org/autoinc.html)
            # and the write lock kept every other writer out.
            seqs: Seqs = {(ev.tenant_id, ev.event_id): seq
                          for seq, ev in enumerate(inserted, before + 1)}
            if inserted_rows:
                if len(inserted_rows) != len(unique):  # the batch's rollups are too many
                    rollups = _aggregate_rollups(inserted_rows, ordered=False)
                self.upsert_rollups(cur, rollups)
                self._many["daily"].run(cur, _aggregate_daily(rollups, ordered=False))
                periods = _aggregate_periods(inserted)
                if periods:
                    self.upsert_periods(cur, periods)
                contents = _content_rows(inserted)
                if contents:
                    self._many["contents"].run(cur, contents)
        # Committed: only now do the cached heads move.
        self._heads.update(new_heads)
        self._last_seq = after
        if self._checkpointer is not None:
            self._checkpointer.committed(len(inserted_rows))
        return seqs, existing, links, lost

    def insert_events(self, conn, rows: list[tuple]) -> int:
        """Insert what is new; returns how many rows were inserted."""
        return self._many["insert"].run(conn, rows)

    def upsert_rollups(self, conn, rows: list[tuple]) -> None:
        self._many["rollups"].run(conn, rows)

    def upsert_periods(self, conn, rows: list[tuple]) -> None:
        self._many["periods"].run(conn, rows)


class _Checkpointer:
    """WAL checkpoints of the SQLite writer's database beside its transactions.

    With SQLite's default, the commit that takes the WAL past 1000 pages also copies
    them into the database file and fsyncs it, and the writer's next transaction
    waits for that. Here, after each commit the writer asks for a PASSIVE checkpoint
    (it waits for no reader or writer, and takes no write lock) on this thread's own
    connection; at most one runs at a time, and requests made while one runs are
    served by one more once it ends. The writer's connection keeps an automatic
    checkpoint at BACKSTOP_PAGES, should these ever fall behind. Durability is SQLite's
    own either way: a commit is on disk once its WAL frames are synced
    (synchronous=FULL), and a checkpoint syncs before the WAL is reused.

    A checkpoint is asked for once EVERY_EVENTS events or EVERY_COMMITS commits have
    gone into the WAL since the last one (each a few pages: well under SQLite's own
    1000), not after every commit: one Record at a time, a checkpoint's fsync of the
    database file per commit slowed the next commit's (Record p50 over gRPC 2.17-2.26
    ms against 1.67-1.81 without checkpoints). Big batches still ask at every commit.
    Closing checkpoints what was committed last."""

    BACKSTOP_PAGES = 10_000
    EVERY_EVENTS = 256
    EVERY_COMMITS = 64

    def __init__(self, engine: sa.engine.Engine) -> None:
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self._engine = engine
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="p402-checkpoint")
        self._lock = threading.Lock()
        self._running = False
        self._again = False
        self._conn: Any = None  # the DBAPI connection, opened on the thread
        self.failures = 0
        self._events = self._commits = 0  # since the last request (writer's thread)

    def committed(self, events: int) -> None:
        """A commit of `events` new events (from the writer's thread): a checkpoint is
        asked for once enough went into the WAL (class docstring)."""
        self._events += events
        self._commits += 1
        if self._events >= self.EVERY_EVENTS or self._commits >= self.EVERY_COMMITS:
            self._events = self._commits = 0
            self.request()

    def request(self) -> None:
        """Ask for a checkpoint (from the writer's thread, after a commit)."""
        with self._lock:
            if self._running:
                self._again = True
                return
            self._running = True
        self._executor.submit(self._run)

    def _run(self) -> None:
        while True:
            try:
                if self._conn is None:
                    self._conn = self._engine.raw_connection()
                self._conn.cursor().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except Exception as exc:  # the writer's backstop checkpoint still runs
                self.failures += 1
                log.warning("p402 store: WAL checkpoint failed: %r", exc)
            with self._lock:
                if not self._again:
                    self._running = False
                    return
                self._again = False

    def close(self) -> None:
        """Checkpoint what was committed since the last one, then close the connection
        (the writer has stopped: nothing commits meanwhile)."""
        if self._events or self._commits:
            self.request()
        self._executor.shutdown(wait=True)
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class _CoreOps:
    """PostgreSQL (and in-memory SQLite): SQLAlchemy Core statements on the store's
    async engine, executemany with insertmanyvalues (multi-row INSERT … RETURNING).

    Per batch, in one transaction: the advisory lock of each tenant in the batch (in
    tenant order: no deadlock between processes), then which events are already in
    the ledger (under the lock nobody else can add one for these tenants), the
    tenants' chain heads, and the inserts of the new events, chained."""

    ORDERED = True  # rollup rows sorted: the lock order of concurrent writers

    def __init__(self, engine) -> None:
        dialect = engine.dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        elif dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:  # pragma: no cover - open_store refuses other URLs
            raise ValueError(f"db: unsupported dialect {dialect!r}")
        self._engine = engine
        self._pg = dialect == "postgresql"
        ev = S.events
        self._insert = (
            insert(ev)
            .on_conflict_do_nothing(index_elements=[ev.c.tenant_id, ev.c.event_id])
            .returning(ev.c.tenant_id, ev.c.event_id, ev.c.seq)
        )
        hc = S.hold_claims
        self._claim = insert(hc).on_conflict_do_nothing(
            index_elements=[hc.c.tenant_id, hc.c.reservation_id]
        ).returning(hc.c.tenant_id, hc.c.reservation_id)
        self._lock = sa.text("SELECT pg_advisory_xact_lock(hashtext(:t))")
        self._head = sa.text(_HEAD_SQL.format(p=":t"))
        ru = S.rollups_hourly
        ins = insert(ru)
        self._rollups = ins.on_conflict_do_update(
            index_elements=[ru.c[name] for name in S.ROLLUP_KEY],
            set_={name: ru.c[name] + ins.excluded[name] for name in S.ROLLUP_SUMS},
        )
        sd = S.spend_daily
        ins = insert(sd)
        self._daily = ins.on_conflict_do_update(
            index_elements=[sd.c[name] for name in S.SPEND_DAILY_KEY],
            set_={name: sd.c[name] + ins.excluded[name] for name in S.ROLLUP_SUMS},
        )
        self._daily_names = (*S.SPEND_DAILY_KEY, *S.ROLLUP_SUMS)
        bp = S.budget_periods
        ins = insert(bp)
        self._periods = ins.on_conflict_do_update(
            index_elements=[bp.c.tenant_id, bp.c.budget_id, bp.c.period_start_ms],
            set_={"committed_nanos": bp.c.committed_nanos + ins.excluded.committed_nanos},
        )
        ct = S.contents
        ins = insert(ct)
        self._contents = ins.on_conflict_do_update(
            index_elements=[ct.c.tenant_id, ct.c.event_id, ct.c.kind],
            set_={c: ins.excluded[c] for c in ("mode", "text", "created_ms", "expires_ms")},
        )
        self._rollup_names = (*S.ROLLUP_KEY, *S.ROLLUP_SUMS)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def write_batch(
        self, unique: list[LedgerEvent], values: list[tuple], canon: list[bytes],
        rollups: list[tuple],
    ) -> tuple[Seqs, Existing, Links, Lost]:
        existing: Existing = {}
        lost: Lost = {}
        tenants = sorted({ev.tenant_id for ev in unique})
        async with self._engine.begin() as conn:
            heads: Heads = {}
            for t in tenants:
                if self._pg:
                    await conn.execute(self._lock, {"t": t})
                heads[t] = _head_of((await conn.execute(self._head, {"t": t})).first())
            keys = [(ev.tenant_id, ev.event_id) for ev in unique]
            for i in range(0, len(keys), 500):
                rows = (await conn.execute(_existing_stmt(keys[i : i + 500]))).mappings()
                existing.update(_by_key(rows))
            lost = await self._claims(conn, unique)
            keep = ([i for i, k in enumerate(keys) if k not in existing and i not in lost]
                    if existing or lost else None)
            rows, links, _ = _chain(unique, values, canon, heads, keep)
            inserted = unique if keep is None else [unique[i] for i in keep]
            seqs = await self.insert_events(conn, rows) if rows else {}
            if len(seqs) != len(rows):  # cannot happen under the tenant locks
                raise RuntimeError("store: an event appeared that this batch did not insert")
            if rows:
                if len(rows) != len(unique):
                    rollups = _aggregate_rollups(rows)
                await self.upsert_rollups(conn, rollups)
                names = self._daily_names
                await conn.execute(
                    self._daily, [dict(zip(names, r)) for r in _aggregate_daily(rollups)])
                periods = _aggregate_periods(inserted)
                if periods:
                    await self.upsert_periods(conn, periods)
                contents = _content_rows(inserted)
                if contents:
                    await conn.execute(
                        self._contents, [dict(zip(CONTENT_COLUMNS, r)) for r in contents])
        return seqs, existing, links, lost

    async def _claims(self, conn, unique: list[LedgerEvent]) -> Lost:
        claimers = _claimers(unique)
        if not claimers:
            return {}
        now = time.time_ns() // 1_000_000
        new = {tuple(r) for r in await conn.execute(self._claim, [
            dict(zip(_CLAIM_COLUMNS, (unique[i].tenant_id, unique[i].reservation_id,
                                      unique[i].event_id, now))) for i in claimers])}
        claimed = [(unique[i].tenant_id, unique[i].reservation_id) for i in claimers]
        # Look up who won where a claim was not inserted, and where two events of
        # this batch claimed one reservation (one of them inserted it).
        keys = sorted(set(claimed) - new if len(set(claimed)) == len(claimed)
                      else set(claimed))
        if not keys:  # every claim is new (the common case)
            return {}
        hc = S.hold_claims
        winners: dict = {}
        for k in range(0, len(keys), 400):
            rows = await conn.execute(
                sa.select(hc.c.tenant_id, hc.c.reservation_id, hc.c.event_id).where(
                    sa.tuple_(hc.c.tenant_id, hc.c.reservation_id).in_(keys[k : k + 400])))
            winners.update({(t, r): e for t, r, e in rows})
        return _lost_claims(unique, claimers, winners)

    async def insert_events(self, conn, rows: list[tuple]) -> Seqs:
        result = await conn.execute(self._insert, [dict(zip(EVENT_COLUMNS, v)) for v in rows])
        return {(t, e): seq for t, e, seq in result}

    async def upsert_rollups(self, conn, rows: list[tuple]) -> None:
        names = self._rollup_names
        await conn.execute(self._rollups, [dict(zip(names, r)) for r in rows])

    async def upsert_periods(self, conn, rows: list[tuple]) -> None:
        names = ("tenant_id", "budget_id", "period_start_ms", "committed_nanos")
        await conn.execute(self._periods, [dict(zip(names, r)) for r in rows])


class _PgOps(_CoreOps):
    """PostgreSQL: the transaction of `_CoreOps` (tenant locks in tenant order, heads,
    claims, all in one transaction), with its bulk work sent through the asyncpg
    connection underneath SQLAlchemy's, inside the same transaction:

    - the events, chained on the assumption that every one is new: seqs drawn from
      the events sequence in one query, the rows written with binary COPY inside a
      savepoint. The tenant locks keep every other P402 writer out, so the only
      conflict is an event already in the ledger (a retry of a committed event): the
      savepoint is rolled back, those events are read back, and the new ones are
      chained again and copied (as the SQLite path does with its undo);
    - rollups and daily spend: one upsert per table of every row, its columns sent
      as the text of array literals (`_PgUpsert`); budget periods and contents:
      prepared upserts sent with asyncpg's pipelined executemany.

    SQLAlchemy's per-row parameter processing (insertmanyvalues pages) and a lookup
    of every event before inserting cost more than the database's own work
    (benchmarks/bench_record_pg.py)."""

    def __init__(self, engine) -> None:
        super().__init__(engine)
        key, sums = S.ROLLUP_KEY, S.ROLLUP_SUMS
        dkey = S.SPEND_DAILY_KEY
        # One row holding the n new seqs as an array (not n rows: a row costs the
        # driver a message and a Record).
        self._sql_seqs = ("SELECT array_agg(nextval(pg_get_serial_sequence('events', 'seq'))) "
                          "FROM generate_series(1, $1)")
        self._copy_columns = ("seq", *EVENT_COLUMNS)
        self._rollups = _PgUpsert(S.rollups_hourly, key, sums)
        self._daily = _PgUpsert(S.spend_daily, dkey, sums)
        self._sql_periods = _pg_upsert(
            "budget_periods", ("tenant_id", "budget_id", "period_start_ms"),
            ("committed_nanos",))
        self._sql_contents = (
            f"INSERT INTO contents ({', '.join(CONTENT_COLUMNS)}) VALUES "
            f"({', '.join(f'${i}' for i in range(1, len(CONTENT_COLUMNS) + 1))}) "
            "ON CONFLICT (tenant_id, event_id, kind) DO UPDATE SET mode = excluded.mode, "
            "text = excluded.text, created_ms = excluded.created_ms, "
            "expires_ms = excluded.expires_ms")

    async def write_batch(
        self, unique: list[LedgerEvent], values: list[tuple], canon: list[bytes],
        rollups: list[tuple],
    ) -> tuple[Seqs, Existing, Links, Lost]:
        existing: Existing = {}
        tenants = sorted({ev.tenant_id for ev in unique})
        async with self._engine.begin() as conn:
            heads: Heads = {}
            for t in tenants:  # through SQLAlchemy: this also begins the transaction
                await conn.execute(self._lock, {"t": t})
                heads[t] = _head_of((await conn.execute(self._head, {"t": t})).first())
            apg = await _driver_connection(conn)
            lost = await self._claims(conn, unique)
            keep = [i for i in range(len(unique)) if i not in lost] if lost else None
            # Chained on the assumption that every event is new (retries of
            # committed events are rare); a conflict undoes the COPY alone.
            rows, links, _ = _chain(unique, values, canon, heads, keep)
            seqs = await self.insert_events(apg, rows) if rows else {}
            if seqs is None:
                keys = [(ev.tenant_id, ev.event_id) for ev in unique]
                for i in range(0, len(keys), 500):
                    found = (await conn.execute(_existing_stmt(keys[i : i + 500]))).mappings()
                    existing.update(_by_key(found))
                keep = [i for i, k in enumerate(keys) if k not in existing and i not in lost]
                rows, links, _ = _chain(unique, values, canon, heads, keep)
                seqs = await self.insert_events(apg, rows) if rows else {}
                if seqs is None:  # cannot happen under the tenant locks
                    raise RuntimeError("store: events appeared that this batch did not insert")
            inserted = unique if keep is None else [unique[i] for i in keep]
            if rows:
                if len(rows) != len(unique):  # sorted: the tables' lock order
                    rollups = _aggregate_rollups(rows)
                await self.upsert_rollups(apg, rollups)
                await apg.execute(*self._daily.args(_aggregate_daily(rollups)))
                periods = _aggregate_periods(inserted)
                if periods:
                    await self.upsert_periods(apg, periods)
                contents = _content_rows(inserted)
                if contents:
                    await apg.executemany(self._sql_contents, contents)
        return seqs, existing, links, lost

    async def upsert_rollups(self, apg, rows: list[tuple]) -> None:
        await apg.execute(*self._rollups.args(rows))

    async def upsert_periods(self, apg, rows: list[tuple]) -> None:
        await apg.executemany(self._sql_periods, rows)

    async def insert_events(self, apg, rows: list[tuple]) -> Seqs | None:  # type: ignore[override]
        """COPY `rows` into events with seqs drawn from its sequence -> their seqs, or
        None (nothing written) when one of them is already in the ledger."""
        import asyncpg

        drawn = sorted(await apg.fetchval(self._sql_seqs, len(rows)))
        try:
            async with apg.transaction():  # a savepoint: undone alone on a conflict
                await apg.copy_records_to_table(
                    "events", columns=self._copy_columns,
                    records=[(seq, *row) for seq, row in zip(drawn, rows)])
        except asyncpg.UniqueViolationError:
            return None
        key = _EVENT_KEY
        return {key(row): seq for seq, row in zip(drawn, rows)}


def _pg_upsert(table: str, key: tuple, sums: tuple) -> str:
    """INSERT … ON CONFLICT (key) DO UPDATE adding `sums`, one row from $1…$n."""
    cols = (*key, *sums)
    return (f"INSERT INTO {table} ({', '.join(cols)}) VALUES "
            f"({', '.join(f'${i}' for i in range(1, len(cols) + 1))}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
            + ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in sums))


def _pg_upsert_arrays(table: sa.Table, key: tuple, sums: tuple, *,
                      literals: bool = False) -> str:
    """The same upsert for many rows in one statement: $1…$n are the columns as
    arrays (rows transposed), expanded by unnest; array types from the schema. With
    ``literals`` each $i is the text of an array literal (`_pg_array_literal`)."""
    from sqlalchemy.dialects import postgresql

    dialect = postgresql.dialect()
    cols = (*key, *sums)
    cast = "::text::" if literals else "::"
    arrays = ", ".join(f"${i}{cast}{table.c[c].type.compile(dialect=dialect)}[]"
                       for i, c in enumerate(cols, 1))
    return (f"INSERT INTO {table.name} ({', '.join(cols)}) "
            f"SELECT * FROM unnest({arrays}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET "
            + ", ".join(f"{c} = {table.name}.{c} + excluded.{c}" for c in sums))


class _PgUpsert:
    """A many-row upsert (`_pg_upsert_arrays`) and the arguments that send rows to it.

    asyncpg encodes a list as an array element by element, asking each element
    whether it is an array itself (isinstance checks against collections.abc, about a
    microsecond each): for one batch's rollups, milliseconds of the event loop's time
    per transaction (benchmarks/bench_record_pg.py). So each column goes as the text of
    a PostgreSQL array literal, built with a few joins, which PostgreSQL parses
    (``$i::text::<type>[]``). A column whose values are not all exactly str (a text
    column) or exactly int goes as an array, as before, for the driver to judge."""

    __slots__ = ("_arrays", "_literals", "_text")

    def __init__(self, table: sa.Table, key: tuple, sums: tuple) -> None:
        self._arrays = _pg_upsert_arrays(table, key, sums)
        self._literals = _pg_upsert_arrays(table, key, sums, literals=True)
        self._text = tuple(isinstance(table.c[c].type, sa.String) for c in (*key, *sums))

    def args(self, rows: list[tuple]) -> tuple:
        """(sql, $1, $2, …) for ``apg.execute`` to upsert ``rows`` (key + sums)."""
        columns = list(zip(*rows))
        texts = [_pg_array_literal(col, text) for col, text in zip(columns, self._text)]
        if None in texts:
            return (self._arrays, *columns)
        return (self._literals, *texts)


_STR_TYPE = frozenset({str})
_INT_TYPE = frozenset({int})


def _pg_array_literal(values: tuple, text: bool) -> str | None:
    """The PostgreSQL array literal of ``values``, every one exactly a str (``text``)
    or exactly an int; None otherwise. Each str is double-quoted (so commas, braces,
    blanks and the word NULL stay text), a backslash or double quote in it escaped."""
    if not values:
        return "{}"
    if text:
        if not _STR_TYPE.issuperset(map(type, values)):
            return None
        joined = '","'.join(values)
        if "\\" in joined or joined.count('"') != 2 * (len(values) - 1):
            joined = '","'.join([v.replace("\\", "\\\\").replace('"', '\\"')
                                 for v in values])
        return '{"' + joined + '"}'
    if not _INT_TYPE.issuperset(map(type, values)):
        return None
    return "{" + ",".join(map(str, values)) + "}"


async def _driver_connection(conn):
    """The asyncpg connection under an AsyncConnection, in its open transaction."""
    raw = await conn.get_raw_connection()
    apg = raw.driver_connection
    if not apg.is_in_transaction():  # the statements above must have begun it
        raise RuntimeError("store: the PostgreSQL transaction has not begun")
    return apg


def _by_key(rows) -> Existing:
    out: Existing = {}
    for row in rows:
        led = from_row(row)
        out[(led.tenant_id, led.event_id)] = led
    return out


def _select_existing_sync(conn, keys: list[tuple[str, str]], *, check: bool = True) -> Existing:
    existing: Existing = {}
    for i in range(0, len(keys), 500):
        existing.update(_by_key(conn.execute(_existing_stmt(keys[i : i + 500])).mappings()))
    if check and len(existing) != len(keys):
        raise RuntimeError("store: a conflicting event row could not be read back")
    return existing


def _make_ops(store: Any):
    engine = store.engine
    url = engine.url
    if engine.dialect.name == "sqlite" and url.database not in (None, "", ":memory:"):
        return _SqliteThreadOps(url)
    if engine.dialect.name == "postgresql":
        return _PgOps(engine)
    return _CoreOps(engine)


_AT = {name: i for i, name in enumerate(EVENT_COLUMNS)}
_EVENT_KEY = operator.itemgetter(_AT["tenant_id"], _AT["event_id"])
_ROLLUP_DIMS_OF = operator.itemgetter(*[_AT[c] for c in S.ROLLUP_DIMS])
_ROLLUP_SUMS_OF = operator.itemgetter(*[_AT[c] for c in S.ROLLUP_SUMS[1:]])
_EVENT_MS = _AT["event_ms"]
_TENANT = _AT["tenant_id"]
assert S.ROLLUP_KEY == ("tenant_id", "hour_ms", *S.ROLLUP_DIMS) and S.ROLLUP_SUMS[0] == "events"


def _aggregate_rollups(values: list[tuple], *, ordered: bool = True) -> list[tuple]:
    """One row (ROLLUP_KEY + ROLLUP_SUMS values) per rollup key of the batch,
    from the events' row values. ``ordered`` sorts the rows: a stable lock order, so
    concurrent writers on PostgreSQL cannot deadlock (SQLite has one writer and skips
    it)."""
    groups: dict[tuple, list] = {}
    _group_rollups(values, groups)
    return _rollup_rows(groups, ordered=ordered)


_EVENTS_AT = len(S.ROLLUP_KEY)  # a rollup row's events count; its other sums follow


def _group_rollups(values: list[tuple], groups: dict[tuple, list]) -> None:
    """Add the events' row values to ``groups``: rollup key (ROLLUP_KEY values) -> its
    row, the key followed by the sums, added up in place."""
    dims_of, sums_of, at_ms, at_tenant = _ROLLUP_DIMS_OF, _ROLLUP_SUMS_OF, _EVENT_MS, _TENANT
    at = _EVENTS_AT
    for v in values:
        ms = v[at_ms]
        key = (v[at_tenant], ms - ms % HOUR_MS, *dims_of(v))
        row = groups.get(key)
        if row is None:
            groups[key] = [*key, 1, *sums_of(v)]
        else:
            row[at] += 1
            for i, x in enumerate(sums_of(v), at + 1):
                row[i] += x


def _rollup_rows(groups: dict[tuple, list], *, ordered: bool = True) -> list[tuple]:
    rows = list(map(tuple, groups.values()))
    if ordered:
        rows.sort()
    return rows


_N_ROLLUP_DIMS = len(S.ROLLUP_DIMS)
DAY_MS = 86_400_000
assert S.ROLLUP_DIMS[0] == "customer"  # _aggregate_daily reads it at position 2


def _aggregate_daily(rollups: list[tuple], *, ordered: bool = True) -> list[tuple]:
    """spend_daily rows (tenant_id, day_ms, customer, *sums) from a batch's hourly
    rollup rows (tenant_id, hour_ms, *dims, *sums); sorted for the lock order."""
    first_sum = 2 + _N_ROLLUP_DIMS
    days: dict[tuple, list[int]] = {}
    for r in rollups:
        hour = r[1]
        key = (r[0], hour - hour % DAY_MS, r[2])
        acc = days.get(key)
        if acc is None:
            days[key] = list(r[first_sum:])
        else:
            for i, v in enumerate(r[first_sum:]):
                acc[i] += v
    rows = [(*k, *v) for k, v in days.items()]
    if ordered:
        rows.sort()
    return rows


def _aggregate_periods(inserted: list[LedgerEvent]) -> list[tuple[str, str, int, int]]:
    agg: dict[tuple[str, str, int], int] = {}
    for ev in inserted:
        if ev.budget_charges and ev.cost_nanos:
            for budget_id, period_start_ms in ev.budget_charges:
                key = (ev.tenant_id, budget_id, int(period_start_ms))
                agg[key] = agg.get(key, 0) + ev.cost_nanos
    return [(t, b, p, c) for (t, b, p), c in sorted(agg.items())]


__all__ = ["GroupCommitWriter", "WriterStats", "WriteResult", "EventRejected", "is_data_error"]
