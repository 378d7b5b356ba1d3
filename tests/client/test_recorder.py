"""Background batched recording against a real P402 server: batching, idempotent
resends, refused records isolated, retry until a server comes back, the bounded
queue under fail-closed and fail-open, flush/close accounting, and the async twin."""
from __future__ import annotations

import pytest

import p402_client as pc
from tests.client.serverthread import ServerThread, free_port

MODEL = "gpt-4o-mini"
OWNERS = {"customer": "acme"}


def holds(p402, n: int) -> list[str]:
    return [p402.authorize(MODEL, owners=OWNERS, max_output_tokens=10).reservation_id
            for _ in range(n)]


def all_events(p402) -> list[pc.Event]:
    return list(p402.iter_query(page_size=1000))


def test_records_go_out_in_batches_and_land_in_the_ledger(p402):
    rids = holds(p402, 250)
    results: list[pc.RecordResult] = []
    with pc.Recorder(p402, batch_size=100, on_result=results.append) as rec:
        ids = [rec.record(rid, input_tokens=10 + i, output_tokens=i % 7)
               for i, rid in enumerate(rids)]
        assert rec.flush(30)
        m = rec.metrics
    assert m.enqueued == m.sent == 250 and m.failed == m.dropped == 0 and m.pending == 0
    # Batched: far fewer calls than records (each call carries <= batch_size).
    assert 3 <= m.batches < 250
    events = {e.event_id: e for e in all_events(p402)}
    assert set(ids) == set(events) == {r.event_id for r in results}
    for i, (eid, rid) in enumerate(zip(ids, rids)):
        assert events[eid].reservation_id == rid
        assert events[eid].usage.input_tokens == 10 + i


def test_a_resent_event_id_never_counts_twice(p402):
    (rid,) = holds(p402, 1)
    results: list[pc.RecordResult] = []
    with pc.Recorder(p402, on_result=results.append) as rec:
        rec.record(rid, event_id="evt-1", input_tokens=5, output_tokens=5)
        rec.flush(10)
        rec.record(rid, event_id="evt-1", input_tokens=5, output_tokens=5)
    assert [r.duplicate for r in results] == [False, True]
    assert len(all_events(p402)) == 1


def test_a_refused_record_is_isolated_and_counted_failed(p402):
    rids = holds(p402, 3)
    errors: list[tuple[str, pc.P402Error]] = []
    with pc.Recorder(p402, batch_size=10,
                     on_error=lambda eid, err: errors.append((eid, err))) as rec:
        rec.record(rids[0], input_tokens=1, output_tokens=1)
        bad = rec.record("no-such-reservation", input_tokens=1, output_tokens=1)
        rec.record(rids[1], input_tokens=1, output_tokens=1)
        rec.record(rids[2], input_tokens=1, output_tokens=1)
        assert rec.flush(20)
        m = rec.metrics
    assert (m.sent, m.failed) == (3, 1)
    assert [eid for eid, _ in errors] == [bad]
    assert isinstance(errors[0][1], pc.NotFound)
    assert {e.reservation_id for e in all_events(p402)} == set(rids)


def test_bad_input_raises_at_the_call_site(p402):
    with pc.Recorder(p402) as rec:
        with pytest.raises(pc.InvalidArgument) as err:
            rec.record("r", input_tokens=-5)
        assert err.value.field == "usage.input_tokens"
        assert rec.metrics.enqueued == 0


def dead_target() -> str:
    return f"127.0.0.1:{free_port()}"


def test_fail_closed_queue_full_blocks_then_raises():
    with pc.P402Client(dead_target(), api_key="p402_" + "q" * 40, retries=0,
                       timeout=1.0) as p402:
        rec = pc.Recorder(p402, max_queue=2, put_timeout=0.2, retry_backoff=0.05,
                          register_atexit=False)
        assert not rec.fail_open
        rec.record("a", input_tokens=1)
        rec.record("b", input_tokens=1)
        with pytest.raises(pc.RecorderFull):
            rec.record("c", input_tokens=1)
        m = rec.close(timeout=0.3)
    assert m.enqueued == 2 and m.sent == 0 and m.retries >= 1
    # Unsent at close: counted, never silently lost.
    assert m.dropped == 2 and m.pending == 0


def test_fail_open_queue_full_drops_and_counts():
    with pc.P402Client(dead_target(), api_key="p402_" + "q" * 40, retries=0,
                       timeout=1.0, fail_open=True) as p402:
        rec = pc.Recorder(p402, max_queue=3, retry_backoff=0.05, register_atexit=False)
        assert rec.fail_open
        for i in range(10):
            rec.record(f"r{i}", input_tokens=1)  # never blocks, never raises
        m = rec.metrics
        # Every accepted record is accounted for: sent, failed, dropped or pending.
        assert m.enqueued == m.sent + m.failed + m.dropped + m.pending
        assert m.dropped == 7 and m.pending == 3 and m.sent == 0
        rec.close(timeout=0.2)


def test_records_survive_an_outage_and_are_sent_when_the_server_returns(tmp_path):
    """Fail-open end to end: P402 is down at the call; the meter allows locally, the
    recorder keeps retrying, and the meter-only event lands once P402 is back."""
    db = f"sqlite+aiosqlite:///{tmp_path / 'outage.db'}"
    port = free_port()
    first = ServerThread(db, port=port).start()
    _, key = first.new_tenant("outage")
    first.stop()
    with pc.P402Client(f"127.0.0.1:{port}", api_key=key, retries=0, timeout=1.0,
                       fail_open=True) as p402:
        rec = pc.Recorder(p402, retry_backoff=0.05, max_retry_backoff=0.2,
                          register_atexit=False)
        with p402.meter(MODEL, owners={"customer": "acme", "feature": "faq"},
                        labels={"region": "eu"}, recorder=rec) as m:
            assert m.fail_open
            m.set_usage(input_tokens=120, output_tokens=30)
        assert m.event_id and m.result is None
        assert not rec.flush(0.3)  # nothing reachable yet
        assert rec.metrics.retries >= 1 and rec.metrics.pending == 1
        back = ServerThread(db, port=port).start()
        try:
            assert rec.flush(20)
            assert rec.metrics.sent == 1 and rec.metrics.failed == 0
            (ev,) = p402.query().items
            assert ev.event_id == m.event_id and ev.reservation_id == ""
            assert ev.owners == pc.Owners(customer="acme", feature="faq")
            assert ev.labels == {"region": "eu"} and ev.model == MODEL
            assert ev.usage == pc.Usage(input_tokens=120, output_tokens=30)
            assert ev.cost_nanos > 0
            rec.close()
        finally:
            back.stop()


def test_meter_with_a_recorder_queues_the_record(p402):
    with pc.Recorder(p402) as rec:
        with p402.meter(MODEL, owners=OWNERS, recorder=rec) as m:
            m.set_usage(input_tokens=9, output_tokens=9)
        assert m.result is None and m.event_id
        assert rec.flush(10)
    (ev,) = all_events(p402)
    assert ev.event_id == m.event_id and ev.outcome is pc.Outcome.SUCCESS


def test_closed_recorder_refuses_new_records(p402):
    rec = pc.Recorder(p402, register_atexit=False)
    rec.close()
    with pytest.raises(RuntimeError):
        rec.record("x", input_tokens=1)


async def test_async_recorder_batches_and_flushes(server, tenant):
    async with pc.AsyncP402Client(server.target, api_key=tenant[1]) as ap:
        rids = [(await ap.authorize(MODEL, owners=OWNERS)).reservation_id
                for _ in range(40)]
        results: list[pc.RecordResult] = []
        async with pc.AsyncRecorder(ap, batch_size=16, on_result=results.append) as rec:
            ids = [await rec.record(rid, input_tokens=3, output_tokens=1)
                   for rid in rids]
            async with ap.meter(MODEL, owners=OWNERS, recorder=rec) as m:
                m.set_usage(input_tokens=2, output_tokens=2)
            assert await rec.flush(20)
            metrics = rec.metrics
        assert metrics.sent == 41 and metrics.failed == 0 and 3 <= metrics.batches < 41
        events = [e async for e in ap.iter_query(page_size=1000)]
        assert {e.event_id for e in events} == set(ids) | {m.event_id}
        # on_result gets each record's result, as the client's record() returns it
        assert {r.event_id for r in results} == set(ids) | {m.event_id}
        assert all(isinstance(r, pc.RecordResult) and r.cost_nanos > 0 for r in results)


async def test_async_recorder_fail_closed_full_raises():
    async with pc.AsyncP402Client(dead_target(), api_key="p402_" + "q" * 40, retries=0,
                                  timeout=1.0) as ap:
        rec = pc.AsyncRecorder(ap, max_queue=1, put_timeout=0.1, retry_backoff=0.05)
        await rec.record("a", input_tokens=1)
        with pytest.raises(pc.RecorderFull):
            await rec.record("b", input_tokens=1)
        m = await rec.aclose(timeout=0.2)
        assert m.dropped == 1 and m.sent == 0


class GatedClient:
    """An AsyncP402Client stand-in whose RecordBatch calls wait on a gate: shows how
    many batches the recorder has in flight at once, and can fail the first calls as
    unreachable."""

    fail_open = False
    _record_req = staticmethod(pc.AsyncP402Client._record_req)

    def __init__(self, unreachable: int = 0):
        import asyncio
        import types

        self._meter = types.SimpleNamespace(RecordBatch="RecordBatch", Record="Record")
        self.gate = asyncio.Event()
        self.in_flight = self.peak = 0
        self.unreachable = unreachable
        self.sent: list[str] = []  # event ids of every batch answered, in order

    async def _call(self, method, request):
        from p402.v1 import meter_pb2

        assert method == "RecordBatch"
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.gate.wait()
            if self.unreachable:
                self.unreachable -= 1
                raise pc.Unavailable("down")
            ids = [r.event_id for r in request.records]
            self.sent += ids
            return meter_pb2.RecordBatchResponse(
                results=[meter_pb2.RecordResponse(event_id=i) for i in ids])
        finally:
            self.in_flight -= 1


@pytest.mark.parametrize("pipeline, peak", [(1, 1), (2, 2), (3, 3)])
async def test_async_recorder_keeps_up_to_pipeline_batches_in_flight(pipeline, peak):
    import asyncio

    client = GatedClient()
    rec = pc.AsyncRecorder(client, batch_size=5, pipeline=pipeline)
    ids = [await rec.record(f"r{i}", input_tokens=1) for i in range(40)]
    for _ in range(500):  # the worker sends what it may while the gate is shut
        if client.in_flight >= peak:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # ... and nothing more goes out meanwhile
    assert client.peak == peak and rec.metrics.pending == 40
    client.gate.set()
    assert await rec.flush(5)
    m = await rec.aclose()
    assert m.sent == 40 and m.failed == m.dropped == 0 and m.batches == 8
    assert sorted(client.sent) == sorted(ids)  # every record once


async def test_async_recorder_retries_an_unreachable_batch_with_others_in_flight():
    client = GatedClient(unreachable=1)
    rec = pc.AsyncRecorder(client, batch_size=4, pipeline=2, retry_backoff=0.01)
    ids = [await rec.record(f"r{i}", input_tokens=1) for i in range(20)]
    client.gate.set()
    assert await rec.flush(5)
    m = await rec.aclose()
    assert m.retries == 1 and m.sent == 20 and m.failed == m.dropped == 0
    assert sorted(client.sent) == sorted(ids) and len(client.sent) == 20


def test_a_pipeline_below_one_is_refused():
    with pytest.raises(ValueError, match="pipeline"):
        pc.AsyncRecorder(GatedClient(), pipeline=0)


def test_validate_at_send_checks_names_now_and_values_in_the_batch(p402):
    rids = holds(p402, 3)
    errors: list[tuple[str, pc.P402Error]] = []
    with pc.Recorder(p402, batch_size=10, validate="send",
                     on_error=lambda eid, err: errors.append((eid, err))) as rec:
        with pytest.raises(pc.InvalidArgument) as err:
            rec.record(rids[0], input_tokenz=1)  # a misspelt field: at the call site
        assert err.value.field == "input_tokenz" and rec.metrics.enqueued == 0
        good = [rec.record(rids[0], input_tokens=4, output_tokens=1)]
        bad = rec.record(rids[1], input_tokens=-5)  # a value: when its batch is built
        good.append(rec.record(rids[2], input_tokens=6, output_tokens=2))
        assert rec.flush(20)
        m = rec.metrics
    assert (m.enqueued, m.sent, m.failed) == (3, 2, 1)
    assert [eid for eid, _ in errors] == [bad]
    assert isinstance(errors[0][1], pc.InvalidArgument)
    assert errors[0][1].field == "usage.input_tokens"
    events = {e.event_id: e for e in all_events(p402)}
    assert set(events) == set(good)  # the refused one never reached the server
    assert events[good[1]].usage.input_tokens == 6


async def test_validate_at_send_a_batch_refused_whole_is_never_sent():
    client = GatedClient()
    client.gate.set()
    failed: list[str] = []
    rec = pc.AsyncRecorder(client, batch_size=3, validate="send",
                           on_error=lambda eid, err: failed.append(eid))
    bad = [await rec.record(f"r{i}", input_tokens=-1) for i in range(3)]
    assert await rec.flush(5)
    m = await rec.aclose()
    assert client.sent == [] and client.peak == 0  # no call for an empty batch
    assert (m.sent, m.failed, m.batches, m.pending) == (0, 3, 0, 0)
    assert failed == bad


async def test_validate_at_send_resends_a_built_batch_after_an_outage():
    client = GatedClient(unreachable=1)
    rec = pc.AsyncRecorder(client, batch_size=4, pipeline=2, retry_backoff=0.01,
                           validate="send")
    ids = [await rec.record(f"r{i}", input_tokens=1) for i in range(10)]
    await rec.record("r-bad", output_tokens=2 ** 63)
    ids += [await rec.record(f"s{i}", input_tokens=1) for i in range(9)]
    client.gate.set()
    assert await rec.flush(5)
    m = await rec.aclose()
    assert m.retries == 1 and m.sent == 19 and m.failed == 1 and m.dropped == 0
    assert sorted(client.sent) == sorted(ids)  # every good record once


def test_validate_must_be_record_or_send():
    with pytest.raises(ValueError, match="validate"):
        pc.AsyncRecorder(GatedClient(), validate="later")


async def test_linger_gathers_a_short_batch_until_its_oldest_record_has_waited():
    import asyncio

    client = GatedClient()
    client.gate.set()
    rec = pc.AsyncRecorder(client, batch_size=10, linger=1.0)
    ids = [await rec.record(f"r{i}", input_tokens=1) for i in range(3)]
    await asyncio.sleep(0.05)
    assert client.sent == [] and rec.metrics.pending == 3  # still lingering
    for _ in range(300):
        if client.sent:
            break
        await asyncio.sleep(0.01)
    assert sorted(client.sent) == sorted(ids) and rec.metrics.batches == 1
    # A full batch does not linger; what follows it starts its own wait.
    more = [await rec.record(f"s{i}", input_tokens=1) for i in range(12)]
    for _ in range(100):  # well within the linger
        if len(client.sent) >= 13:
            break
        await asyncio.sleep(0.005)
    assert sorted(client.sent[3:13]) == sorted(more[:10])
    assert rec.metrics.pending == 2
    # flush() sends what lingers at once: done well within the linger.
    assert await rec.flush(0.5)
    m = await rec.aclose()
    assert sorted(client.sent) == sorted(ids + more) and m.batches == 3 and m.pending == 0


def test_linger_is_at_most_a_second():
    with pytest.raises(ValueError, match="linger"):
        pc.AsyncRecorder(GatedClient(), linger=5)
    with pytest.raises(ValueError, match="linger"):
        pc.AsyncRecorder(GatedClient(), linger=-0.1)
