"""Background batched recording: Records leave the request path and go out in batches.

This module owns `Recorder` (a worker thread over a `P402Client`) and
`AsyncRecorder` (a worker task over an `AsyncP402Client`). `record(...)` takes the
same keywords as `client.record(...)`, validates them at once (bad input raises
`InvalidArgument` at the call site, never later in the worker), gives the record its
event id (a ULID) and queues it. With `validate="send"` only the field names are
checked at the call site and the rest when the record joins a batch: for a caller
whose records are made by its own code (a gateway) and whose request path must stay
short; a record refused then is counted `failed` and reported like one the server
refuses (log, `on_error`), never sent and never blocking its batch. Either way the
worker sends up to `batch_size` queued records per `RecordBatch` call, as soon as
records are there (no added latency when idle; under load the batches fill up by
themselves). `AsyncRecorder` keeps up to `pipeline` batches (default 2) in flight, so
the server settles the next batch while the previous one commits; with `linger`
(seconds) a batch short of `batch_size` waits until its oldest record has waited
that long (flush and close never wait): at a few calls at a time, one batch per
linger instead of a RecordBatch and a ledger commit per record. Every record carries
its event id from the start, so a batch sent twice (a retry after a lost answer) is
answered with the first results and never counts twice.

Failure handling, the explicit choice (`fail_open=`, default: the client's
`fail_open`, which defaults to False):

- Either way, a batch that fails because P402 cannot be reached (UNAVAILABLE,
  DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, after the client's own retries) stays at
  the head of the queue and is retried with capped exponential backoff
  (`metrics.retries`). A batch refused for a reason a retry cannot fix (a record
  whose reservation is unknown, bad input) is split: its records are sent one by
  one, and those refused again are counted `failed` and logged (with `on_error`).
- fail-closed (default): when the bounded queue (`max_queue` records queued or in
  flight) is full, `record()`
  blocks up to `put_timeout` seconds for room, then raises `RecorderFull`. Spend is
  never dropped silently; the caller learns the service is not keeping up.
- fail-open: `record()` never blocks: when the queue is full the oldest queued
  record is dropped (or the new one, when all held records are in flight;
  `metrics.dropped`, warning logged). A dropped record's
  reservation expires at its TTL and the server commits it at its estimate
  (outcome EXPIRED, evidence ESTIMATED), so the spend is estimated, not lost.

Flush and shutdown: `flush(timeout)` waits until everything queued is sent (or
failed). `close()` flushes (up to `close_timeout`) and stops the worker; records
still unsent then are counted `dropped` and logged. `Recorder` also flushes at
interpreter exit (atexit) and is a context manager; `AsyncRecorder` is an async
context manager (`aclose()`), since no event loop runs at exit.

Metrics (`metrics`, a snapshot): enqueued, sent, failed, dropped, retries, batches,
pending (queued or in flight) and the last error.
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import random
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from p402.v1 import meter_pb2

from . import _convert as cv
from .errors import InvalidArgument, P402Error, RecorderFull
from .ids import new_ulid
from .meter import UNREACHABLE
from .types import RecordResult

log = logging.getLogger("p402_client.recorder")

ErrorCallback = Callable[[str, P402Error], Any]
ResultCallback = Callable[[RecordResult], Any]


@dataclass(frozen=True, slots=True)
class RecorderMetrics:
    """A snapshot of a recorder's counters (records, except `retries`/`batches`)."""

    enqueued: int
    sent: int
    failed: int
    dropped: int
    retries: int
    batches: int
    pending: int
    last_error: str


class _Unbuilt:
    """A record queued with `validate="send"`: its arguments, built when sent."""

    __slots__ = ("reservation_id", "kw")

    def __init__(self, reservation_id: str, kw: dict[str, Any]):
        self.reservation_id, self.kw = reservation_id, kw

    @property
    def event_id(self) -> str:
        return self.kw["event_id"]


class _Base:
    """Queue, counters and the batch outcome rules shared by both recorders."""

    def __init__(self, client: Any, *, max_queue: int, batch_size: int,
                 put_timeout: float, fail_open: bool | None, retry_backoff: float,
                 max_retry_backoff: float, close_timeout: float,
                 on_result: ResultCallback | None, on_error: ErrorCallback | None,
                 validate: str = "record"):
        if max_queue < 1:
            raise ValueError("max_queue must be >= 1")
        if not 1 <= batch_size <= 10_000:  # the server's RecordBatch cap
            raise ValueError("batch_size must be in 1..10000")
        if validate not in ("record", "send"):
            raise ValueError("validate must be 'record' or 'send'")
        self._client = client
        self.validate = validate
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.put_timeout = put_timeout
        self.fail_open = (getattr(client, "fail_open", False) if fail_open is None
                          else bool(fail_open))
        self.retry_backoff = retry_backoff
        self.max_retry_backoff = max_retry_backoff
        self.close_timeout = close_timeout
        self._on_result = on_result
        self._on_error = on_error
        self._queue: collections.deque[meter_pb2.RecordRequest] = collections.deque()
        self._inflight = 0
        self._closed = False
        self._enqueued = self._sent = self._failed = self._dropped = 0
        self._retries = self._batches = 0
        self._last_error = ""

    @property
    def metrics(self) -> RecorderMetrics:
        return RecorderMetrics(self._enqueued, self._sent, self._failed, self._dropped,
                               self._retries, self._batches,
                               len(self._queue) + self._inflight, self._last_error)

    @property
    def closed(self) -> bool:
        return self._closed

    def _build(self, reservation_id: str, kw: dict[str, Any]
               ) -> meter_pb2.RecordRequest | _Unbuilt:
        if self._closed:
            raise RuntimeError("the recorder is closed")
        if self.validate == "send":
            unknown = kw.keys() - cv.RECORD_FIELDS
            if unknown:
                raise InvalidArgument(min(unknown), "unknown record field")
            if not kw.get("event_id"):
                kw["event_id"] = new_ulid()
            return _Unbuilt(reservation_id, kw)
        # The client's own builder: same validation, same field names, event id made.
        return self._client._record_req(reservation_id, kw)

    def _full(self) -> bool:
        # In-flight records count: the bound is on what this process holds unsent.
        return len(self._queue) + self._inflight >= self.max_queue

    def _drop_oldest(self, incoming: meter_pb2.RecordRequest) -> bool:
        """Make room (fail-open): drop the oldest queued record, or the incoming one
        when everything held is in flight. True when the incoming one may be queued."""
        queued = bool(self._queue)
        dropped = self._queue.popleft() if queued else incoming
        if not queued:
            self._enqueued += 1  # keeps enqueued == sent + failed + dropped + pending
        self._dropped += 1
        if self._dropped == 1 or self._dropped % 1000 == 0:
            log.warning("p402 recorder queue full (%d); fail-open dropped record %s "
                        "(%d dropped so far; their holds expire at their estimate)",
                        self.max_queue, dropped.event_id, self._dropped)
        return queued

    def _take(self) -> list[meter_pb2.RecordRequest]:
        n = min(self.batch_size, len(self._queue))
        batch = [self._queue.popleft() for _ in range(n)]
        self._inflight += n
        if self.validate == "send":
            batch = self._built(batch)
        return batch

    def _built(self, batch: list) -> list[meter_pb2.RecordRequest]:
        """`validate="send"`: the records of a batch built (and so validated) now, by
        the client's own builder; one it refuses is counted failed, not sent."""
        out = []
        record_req = self._client._record_req
        for item in batch:
            if type(item) is not _Unbuilt:  # built already (a batch sent again)
                out.append(item)
                continue
            try:
                out.append(record_req(item.reservation_id, item.kw))
            except InvalidArgument as err:
                self._done_failed(item, err)
        return out

    def _requeue(self, batch: list[meter_pb2.RecordRequest]) -> None:
        self._queue.extendleft(reversed(batch))
        self._inflight -= len(batch)

    def _done_ok(self, results) -> None:
        """`results`: the RecordResponse messages of sent records; converted to
        RecordResult only for an `on_result` callback (nobody else reads them)."""
        self._inflight -= len(results)
        self._sent += len(results)
        if self._on_result is not None:
            for r in results:
                self._safe(self._on_result, cv.record_result(r))

    def _done_failed(self, req: meter_pb2.RecordRequest, err: P402Error) -> None:
        self._inflight -= 1
        self._failed += 1
        self._last_error = str(err)
        log.error("p402 recorder: record %s refused: %s", req.event_id, err)
        if self._on_error is not None:
            self._safe(self._on_error, req.event_id, err)

    def _backoff(self, failures: int) -> float:
        return random.uniform(0.5, 1.0) * min(self.max_retry_backoff,
                                              self.retry_backoff * (2 ** failures))

    @staticmethod
    def _safe(fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a callback must not kill the worker
            log.exception("p402 recorder callback failed")

    def _batch_pb(self, batch: list[meter_pb2.RecordRequest]) -> meter_pb2.RecordBatchRequest:
        return meter_pb2.RecordBatchRequest(records=batch)

    def _close_report(self) -> None:
        left = len(self._queue) + self._inflight
        if left:
            self._dropped += left
            log.error("p402 recorder closed with %d unsent records (counted dropped; "
                      "their holds expire at their estimate)", left)
            self._queue.clear()
            self._inflight = 0

    def _full_error(self) -> "RecorderFull":
        """The error of a Record that waited put_timeout for room in the queue."""
        return RecorderFull(
            f"record queue full ({self.max_queue}) for {self.put_timeout}s: P402 is not "
            f"keeping up or is unreachable ({self._last_error or 'no error yet'})")


class Recorder(_Base):
    """Background batched recording over a `P402Client` (a worker thread).

    >>> with Recorder(p402) as rec:
    ...     rec.record(auth.reservation_id, input_tokens=310, output_tokens=118)
    """

    def __init__(self, client: Any, *, max_queue: int = 10_000, batch_size: int = 500,
                 put_timeout: float = 5.0, fail_open: bool | None = None,
                 retry_backoff: float = 0.1, max_retry_backoff: float = 5.0,
                 close_timeout: float = 10.0, on_result: ResultCallback | None = None,
                 on_error: ErrorCallback | None = None, register_atexit: bool = True,
                 validate: str = "record"):
        super().__init__(client, max_queue=max_queue, batch_size=batch_size,
                         put_timeout=put_timeout, fail_open=fail_open,
                         retry_backoff=retry_backoff, max_retry_backoff=max_retry_backoff,
                         close_timeout=close_timeout, on_result=on_result,
                         on_error=on_error, validate=validate)
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="p402-recorder",
                                        daemon=True)
        self._thread.start()
        self._atexit: Callable[[], None] | None = None
        if register_atexit:
            ref = weakref.ref(self)

            def _flush_at_exit() -> None:
                rec = ref()
                if rec is not None:
                    rec.close()

            self._atexit = _flush_at_exit
            atexit.register(_flush_at_exit)

    def record(self, reservation_id: str = "", **kw: Any) -> str:
        """Queue a Record (client.record's keywords); returns its event id."""
        req = self._build(reservation_id, kw)
        with self._cond:
            if self._full():
                if self.fail_open:
                    if not self._drop_oldest(req):
                        return req.event_id
                else:
                    deadline = time.monotonic() + self.put_timeout
                    while self._full() and not self._closed:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise self._full_error()
                        self._cond.wait(left)
                    if self._closed:
                        raise RuntimeError("the recorder is closed")
            self._queue.append(req)
            self._enqueued += 1
            self._cond.notify_all()
        return req.event_id

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is sent or failed; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._inflight:
                if not self._thread.is_alive():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 0.5)
        return True

    def close(self, timeout: float | None = None) -> RecorderMetrics:
        """Flush (up to `timeout`, default close_timeout) and stop the worker."""
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        if not self._closed:
            self.flush(self.close_timeout if timeout is None else timeout)
            with self._cond:
                self._closed = True
                self._stop = True
                self._cond.notify_all()
            self._thread.join(5.0)
            with self._cond:
                self._close_report()
        return self.metrics

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the worker ----------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                batch = self._take()
            ok = self._send(batch)
            with self._cond:
                self._cond.notify_all()  # room in the queue; flush() may be done
                if ok:
                    failures = 0
                    continue
                failures += 1
                self._cond.wait_for(lambda: self._stop, self._backoff(failures - 1))
                if self._stop:
                    return

    def _send(self, batch: list[meter_pb2.RecordRequest]) -> bool:
        """Send one batch; False when P402 was unreachable (batch requeued)."""
        if not batch:  # every record of it refused before sending (validate="send")
            return True
        c = self._client
        try:
            resp = c._call(c._meter.RecordBatch, self._batch_pb(batch))
        except UNREACHABLE as err:
            with self._cond:
                self._retries += 1
                self._last_error = str(err)
                self._requeue(batch)
            log.warning("p402 recorder: batch of %d not sent (%s); will retry",
                        len(batch), err)
            return False
        except P402Error:
            return self._send_singly(batch)
        except Exception as err:  # noqa: BLE001 - a bug must not kill the worker
            log.exception("p402 recorder: unexpected error sending a batch")
            with self._cond:
                for req in batch:
                    self._done_failed(req, P402Error(str(err)))
            return True
        with self._cond:
            self._batches += 1
            self._done_ok(resp.results)
        return True

    def _send_singly(self, batch: list[meter_pb2.RecordRequest]) -> bool:
        c = self._client
        for i, req in enumerate(batch):
            try:
                pb = c._call(c._meter.Record, req)
            except UNREACHABLE as err:
                with self._cond:
                    self._retries += 1
                    self._last_error = str(err)
                    self._requeue(batch[i:])
                return False
            except P402Error as err:
                with self._cond:
                    self._done_failed(req, err)
                continue
            with self._cond:
                self._done_ok([pb])
        with self._cond:
            self._batches += 1
        return True


class AsyncRecorder(_Base):
    """Background batched recording over an `AsyncP402Client` (a worker task on the
    running loop, started by the first `record()`).

    >>> async with AsyncRecorder(p402) as rec:
    ...     await rec.record(auth.reservation_id, input_tokens=310, output_tokens=118)
    """

    def __init__(self, client: Any, *, max_queue: int = 10_000, batch_size: int = 500,
                 put_timeout: float = 5.0, fail_open: bool | None = None,
                 retry_backoff: float = 0.1, max_retry_backoff: float = 5.0,
                 close_timeout: float = 10.0, on_result: ResultCallback | None = None,
                 on_error: ErrorCallback | None = None, pipeline: int = 2,
                 validate: str = "record", linger: float = 0.0):
        super().__init__(client, max_queue=max_queue, batch_size=batch_size,
                         put_timeout=put_timeout, fail_open=fail_open,
                         retry_backoff=retry_backoff, max_retry_backoff=max_retry_backoff,
                         close_timeout=close_timeout, on_result=on_result,
                         on_error=on_error, validate=validate)
        if pipeline < 1:
            raise ValueError("pipeline must be >= 1")
        if not 0 <= linger <= 1:
            raise ValueError("linger must be within 0..1 seconds")
        # A batch short of batch_size waits until its oldest record has been queued
        # `linger` seconds (flush() and close() do not wait): a caller that records
        # behind its answers (a gateway) trades that delay for batches, where one
        # record a call would pay a whole RecordBatch, and its commit, each.
        self.linger = linger
        self._oldest = 0.0  # when the oldest queued record was queued (monotonic)
        self._flushing = 0
        # Batches sent before the previous one is answered: the server converts and
        # settles the next batch while the previous one commits. Records of different
        # batches are independent, and each carries its event id, so order between
        # them does not matter and a resent batch never counts twice.
        self.pipeline = pipeline
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def _ensure_worker(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="p402-recorder")
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _wait_change(self, timeout: float | None) -> None:
        assert self._changed is not None
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def record(self, reservation_id: str = "", **kw: Any) -> str:
        """Queue a Record (client.record's keywords); returns its event id."""
        req = self._build(reservation_id, kw)
        self._ensure_worker()
        if self._full():
            if self.fail_open:
                if not self._drop_oldest(req):
                    return req.event_id
            else:
                deadline = time.monotonic() + self.put_timeout
                while self._full() and not self._closed:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise self._full_error()
                    await self._wait_change(left)
                if self._closed:
                    raise RuntimeError("the recorder is closed")
        queue = self._queue
        if self.linger and not queue:
            self._oldest = time.monotonic()
        queue.append(req)
        self._enqueued += 1
        # Lingering, the worker needs waking only to start its clock or for a full batch.
        if not self.linger or len(queue) == 1 or len(queue) == self.batch_size:
            self._notify()
        return req.event_id

    def _due(self) -> float | None:
        """Seconds until the queued records should go: 0 now, None never (empty)."""
        if not self._queue:
            return None
        if not self.linger or self._flushing or len(self._queue) >= self.batch_size:
            return 0.0
        return max(0.0, self._oldest + self.linger - time.monotonic())

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued is sent or failed; False on timeout."""
        if not (self._queue or self._inflight):
            return True
        self._ensure_worker()
        deadline = None if timeout is None else time.monotonic() + timeout
        self._flushing += 1
        self._notify()  # queued records go now, lingering or not
        try:
            while self._queue or self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                await self._wait_change(min(left, 0.5) if left is not None else 0.5)
        finally:
            self._flushing -= 1
        return True

    async def aclose(self, timeout: float | None = None) -> RecorderMetrics:
        """Flush (up to `timeout`, default close_timeout) and stop the worker."""
        if not self._closed:
            await self.flush(self.close_timeout if timeout is None else timeout)
            self._closed = True
            if self._task is not None:
                self._task.cancel()
                try:
                    await self._task
                except asyncio.CancelledError:
                    pass
            self._close_report()
        return self.metrics

    async def __aenter__(self) -> "AsyncRecorder":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def _run(self) -> None:
        failures = 0
        sending: set[asyncio.Task] = set()
        try:
            while not self._closed:
                due = self._due() if len(sending) < self.pipeline else None
                if due == 0.0:
                    sending.add(asyncio.ensure_future(self._send(self._take())))
                    continue
                if not sending:
                    await self._wait_change(due)
                    continue
                changed = asyncio.ensure_future(self._wait_change(due))
                done, _ = await asyncio.wait({*sending, changed},
                                             return_when=asyncio.FIRST_COMPLETED)
                if changed not in done:
                    changed.cancel()
                finished = [task for task in done if task is not changed]
                failed = False
                for task in finished:
                    sending.discard(task)
                    failed |= not task.result()
                self._notify()
                if failed:
                    # P402 unreachable: its batch is back at the head of the queue;
                    # let what is in flight finish, then wait before sending again.
                    failures += 1
                    if sending:
                        await asyncio.wait(sending)
                        for task in sending:
                            task.result()
                        sending.clear()
                    await asyncio.sleep(self._backoff(failures - 1))
                elif finished:
                    failures = 0
        finally:
            for task in sending:
                task.cancel()

    async def _send(self, batch: list[meter_pb2.RecordRequest]) -> bool:
        if not batch:  # every record of it refused before sending (validate="send")
            return True
        c = self._client
        try:
            resp = await c._call(c._meter.RecordBatch, self._batch_pb(batch))
        except UNREACHABLE as err:
            self._retries += 1
            self._last_error = str(err)
            self._requeue(batch)
            log.warning("p402 recorder: batch of %d not sent (%s); will retry",
                        len(batch), err)
            return False
        except P402Error:
            return await self._send_singly(batch)
        except Exception as err:  # noqa: BLE001
            log.exception("p402 recorder: unexpected error sending a batch")
            for req in batch:
                self._done_failed(req, P402Error(str(err)))
            return True
        self._batches += 1
        self._done_ok(resp.results)
        return True

    async def _send_singly(self, batch: list[meter_pb2.RecordRequest]) -> bool:
        c = self._client
        for i, req in enumerate(batch):
            try:
                pb = await c._call(c._meter.Record, req)
            except UNREACHABLE as err:
                self._retries += 1
                self._last_error = str(err)
                self._requeue(batch[i:])
                return False
            except P402Error as err:
                self._done_failed(req, err)
                continue
            self._done_ok([pb])
        self._batches += 1
        return True


__all__ = ["Recorder", "AsyncRecorder", "RecorderMetrics"]
