"""AuthorizePipeline: many concurrent Authorize calls on one StreamAuthorize stream,
against a real server: the same answers as unary Authorize, errors in-band for the
request that caused them only, a revoked key refused mid-stream, and requests caught
by a broken stream answered once (as unary calls with their reservation ids)."""
from __future__ import annotations

import asyncio
import contextlib

import pytest

from p402_client import AsyncP402Client, AuthorizePipeline
from p402_client import errors as e

OWNERS = {"customer": "acme", "feature": "chat"}


@contextlib.asynccontextmanager
async def _served(servicer, timeout: float):
    """(client, pipeline) against a grpc.aio server of `servicer` on a free port."""
    import grpc

    from p402.v1 import meter_pb2_grpc

    server = grpc.aio.server()
    meter_pb2_grpc.add_MeterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    c = AsyncP402Client(f"127.0.0.1:{port}", api_key="p402_" + "a" * 40, timeout=timeout)
    pipe = AuthorizePipeline(c)
    try:
        yield c, pipe
    finally:
        await pipe.aclose()
        await c.close()
        await server.stop(None)


@pytest.fixture
async def client(server, tenant):
    c = AsyncP402Client(server.target, api_key=tenant[1], timeout=10.0)
    try:
        yield c
    finally:
        await c.close()


async def test_concurrent_requests_share_one_stream_and_match_unary(client):
    pipe = AuthorizePipeline(client)
    try:
        got = await asyncio.gather(*(pipe.authorize(
            "gpt-4o-mini", owners=OWNERS, input_bytes=400 + i, max_output_tokens=100)
            for i in range(50)))
        first_call = pipe._call
        assert first_call is not None
        more = await pipe.authorize("gpt-4o-mini", owners=OWNERS, input_bytes=400,
                                    max_output_tokens=100)
        assert pipe._call is first_call  # still the one stream
        unary = await client.authorize("gpt-4o-mini", owners=OWNERS, input_bytes=400,
                                       max_output_tokens=100)
    finally:
        await pipe.aclose()
    assert all(a.allowed for a in got)
    assert len({a.reservation_id for a in got + [more]}) == 51
    # Answers come back to the caller that asked: sizes differ per request.
    assert [a.estimated_input_tokens for a in got] == sorted(
        a.estimated_input_tokens for a in got)
    assert (more.estimated_cost_nanos, more.output_token_cap, more.decision) == (
        unary.estimated_cost_nanos, unary.output_token_cap, unary.decision)
    # Every reservation is a real hold: releasing it writes its event.
    for a in got[:5]:
        assert (await client.release(a.reservation_id)).event_id


async def test_a_refused_request_fails_alone_and_the_stream_goes_on(client):
    pipe = AuthorizePipeline(client)
    try:
        good = [pipe.authorize("gpt-4o-mini", owners=OWNERS, max_output_tokens=10)
                for _ in range(10)]
        bad = pipe.authorize("gpt-4o-mini", owners=OWNERS, max_output_tokens=-5)
        results = await asyncio.gather(*good[:5], bad, *good[5:],
                                       return_exceptions=True)
        call = pipe._call
        after = await pipe.authorize("gpt-4o-mini", owners=OWNERS)
        assert pipe._call is call and after.allowed
    finally:
        await pipe.aclose()
    err = results[5]
    assert isinstance(err, e.InvalidArgument) and err.field == "max_output_tokens"
    assert all(not isinstance(r, Exception) and r.allowed
               for i, r in enumerate(results) if i != 5)


async def test_a_key_revoked_mid_stream_is_refused_from_then_on(server, tenant, client):
    meter = await client.create_key("pipeline", ["meter"])
    c = AsyncP402Client(server.target, api_key=meter.api_key, timeout=10.0)
    pipe = AuthorizePipeline(c)
    try:
        assert (await pipe.authorize("gpt-4o-mini", owners=OWNERS)).allowed
        await client.revoke_key(meter.key.key_id)
        with pytest.raises(e.Unauthenticated):
            for _ in range(100):  # other servers' caches: within the revalidate period
                await pipe.authorize("gpt-4o-mini", owners=OWNERS)
                await asyncio.sleep(0.1)
    finally:
        await pipe.aclose()
        await c.close()


async def test_requests_caught_by_a_broken_stream_are_answered_once(client):
    await client.put_budget("pipe-cap", limit_nanos=10**12, period="TOTAL",
                            enforcement="HARD", scope={"customer": "pipe"})
    owners = {"customer": "pipe"}
    pipe = AuthorizePipeline(client)
    try:
        await pipe.authorize("gpt-4o-mini", owners=owners, max_output_tokens=50)
        calls = [asyncio.ensure_future(pipe.authorize(
            "gpt-4o-mini", owners=owners, max_output_tokens=50)) for _ in range(20)]
        for _ in range(100):  # until some are written: requests in flight…
            if pipe._pending:
                break
            await asyncio.sleep(0)
        assert pipe._pending
        pipe._call.cancel()  # …when the connection drops
        got = await asyncio.gather(*calls)
        again = await pipe.authorize("gpt-4o-mini", owners=owners,
                                     max_output_tokens=50)  # on a new stream
    finally:
        await pipe.aclose()
    assert all(a.allowed for a in got) and again.allowed
    assert len({a.reservation_id for a in got}) == 20
    # One hold per request: a request decided before the break and sent again as a
    # unary call got its first reservation back, not a second hold.
    [status] = [b for b in again.budgets if b.budget_id == "pipe-cap"]
    assert status.held_nanos == 22 * again.estimated_cost_nanos


async def test_concurrent_requests_share_messages_up_to_max_batch(client):
    pipe = AuthorizePipeline(client, max_batch=8)
    sizes: list[int] = []
    try:
        await pipe.authorize("gpt-4o-mini", owners=OWNERS)  # opens the stream
        call = pipe._call
        write = call.write

        async def counting(msg):
            sizes.append(len(msg.requests))
            await write(msg)

        call.write = counting
        got = await asyncio.gather(*(pipe.authorize(
            "gpt-4o-mini", owners=OWNERS, input_bytes=100 * (i + 1)) for i in range(50)))
    finally:
        await pipe.aclose()
    # Requests waiting together go together, never more than max_batch a message.
    assert sum(sizes) == 50 and len(sizes) < 50 and max(sizes) == 8
    estimates = [a.estimated_input_tokens for a in got]
    assert estimates == sorted(estimates) and len(set(estimates)) == 50


def test_max_batch_is_bounded_by_the_server_limit(client):
    for bad in (0, 1001):
        with pytest.raises(ValueError, match="max_batch"):
            AuthorizePipeline(client, max_batch=bad)


async def test_a_server_without_batches_is_asked_with_unary_calls():
    """A server older than the client (StreamAuthorizeBatches UNIMPLEMENTED): every
    request is answered, by unary Authorize, and the stream is not tried again."""
    from p402.v1 import common_pb2, meter_pb2, meter_pb2_grpc

    unary = []

    class Old(meter_pb2_grpc.MeterServiceServicer):
        async def Authorize(self, request, context):
            unary.append(request.reservation_id)
            return meter_pb2.AuthorizeResponse(decision=common_pb2.DECISION_ALLOW,
                                               reservation_id=request.reservation_id,
                                               model=request.model)

    async with _served(Old(), 5.0) as (_c, pipe):
        first = await asyncio.gather(*(pipe.authorize("m", owners=OWNERS) for _ in range(5)))
        assert pipe._unary
        later = await pipe.authorize("m", owners=OWNERS)
        assert pipe._call is None
    got = [a.reservation_id for a in first + [later]]
    assert len(set(got)) == 6 and sorted(unary) == sorted(got)


async def test_a_sender_cancelled_mid_write_never_mismatches_answers(client):
    pipe = AuthorizePipeline(client, max_batch=4)
    try:
        await pipe.authorize("gpt-4o-mini", owners=OWNERS)  # the stream is open
        calls = [asyncio.ensure_future(pipe.authorize(
            "gpt-4o-mini", owners=OWNERS, input_bytes=100 * (i + 1))) for i in range(30)]
        for _ in range(100):  # until it is writing
            if pipe._sender is not None and pipe._pending:
                break
            await asyncio.sleep(0)
        pipe._sender.cancel()
        got = await asyncio.gather(*calls)
        after = await pipe.authorize("gpt-4o-mini", owners=OWNERS, input_bytes=100)
    finally:
        await pipe.aclose()
    # Every caller has its own answer (estimates grow with its prompt), written or not.
    sizes = [a.estimated_input_tokens for a in got]
    assert sizes == sorted(sizes) and len(set(sizes)) == 30
    assert len({a.reservation_id for a in got}) == 30
    assert after.allowed and after.estimated_input_tokens == sizes[0]


async def test_a_timed_out_or_cancelled_caller_leaves_the_others_their_answers():
    """A server slow to answer: one caller times out (DeadlineExceeded), another is
    cancelled; once the answers come, theirs are dropped and every later caller gets
    its own answer on the same stream."""
    from p402.v1 import common_pb2, meter_pb2, meter_pb2_grpc

    release = asyncio.Event()

    class Slow(meter_pb2_grpc.MeterServiceServicer):
        async def StreamAuthorizeBatches(self, request_iterator, context):
            async for msg in request_iterator:
                if not release.is_set():
                    await release.wait()
                yield meter_pb2.AuthorizeBatchResponse(results=[
                    meter_pb2.StreamAuthorizeResponse(response=meter_pb2.AuthorizeResponse(
                        decision=common_pb2.DECISION_ALLOW, model=r.model,
                        reservation_id=r.reservation_id)) for r in msg.requests])

    async with _served(Slow(), 0.3) as (c, pipe):
        with pytest.raises(e.DeadlineExceeded):
            await pipe.authorize("late", owners=OWNERS)
        c.timeout = 10.0
        gone = asyncio.ensure_future(pipe.authorize("gone", owners=OWNERS))
        await asyncio.sleep(0.05)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        waiting = [asyncio.ensure_future(pipe.authorize(f"m{i}", owners=OWNERS))
                   for i in range(5)]
        await asyncio.sleep(0.05)
        release.set()
        got = await asyncio.gather(*waiting)
        after = await pipe.authorize("after", owners=OWNERS)
        assert pipe._call is not None  # the same stream, never broken
    assert [a.model for a in got] == [f"m{i}" for i in range(5)]
    assert after.model == "after" and len({a.reservation_id for a in got + [after]}) == 6
