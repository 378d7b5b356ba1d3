"""Hostile input: hypothesis drives every RPC of a live `p402 serve`.

Requests are generated from the protobuf descriptors themselves (so a new field is
fuzzed without touching this file): extreme and negative int64/int32 (negative
money, out-of-range nanos, huge token counts), wrong enum numbers, unicode and
oversized strings, huge maps and repeated fields, nested messages, bad page tokens,
garbage bytes; plus raw bytes that are not a valid protobuf at all.

Each case must get a clear status: OK, or INVALID_ARGUMENT naming the field
(google.rpc.ErrorInfo metadata "field"), or a precise domain code (NOT_FOUND,
FAILED_PRECONDITION, ALREADY_EXISTS, RESOURCE_EXHAUSTED, UNAUTHENTICATED for a
signed-report rule; the fuzzing key has every scope, so never PERMISSION_DENIED: a
Record under a privacy mode the tenant does not allow is metered as metadata_only) —
never UNKNOWN or INTERNAL. The server never crashes, its RSS
stays bounded, and a rejected case leaves the ledger as it was (its count of
settled events and its chain head).

Both ledgers: every case runs against a server on SQLite and one on PostgreSQL (the
store refuses what the other would store differently: NUL, control characters,
times no calendar holds). And while Records are fuzzed, a steady stream of valid
Records from another connection must never fail, and the ledger must hold exactly
the ones acknowledged.

Normal CI: P402_FUZZ_EXAMPLES (default 2500) cases spread over the RPCs on SQLite,
P402_FUZZ_PG_EXAMPLES (default 1200) on PostgreSQL. The long run (`pytest -m slow`)
runs 100,000+ (P402_FUZZ_LONG_EXAMPLES).
"""
from __future__ import annotations

import os

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor as FD
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings, strategies as st
from p402.v1 import admin_pb2, common_pb2, meter_pb2

from tests.proof.harness import MODEL, ServerProcess, bearer, sqlite_url
from tests.proof.harness import _init_tenant  # noqa: PLC2701

METHODS = (
    [("p402.v1.MeterService", m) for m in meter_pb2.DESCRIPTOR.services_by_name["MeterService"].methods]
    + [("p402.v1.AdminService", m) for m in admin_pb2.DESCRIPTOR.services_by_name["AdminService"].methods]
)
NORMAL = int(os.environ.get("P402_FUZZ_EXAMPLES", "2500"))
PG_NORMAL = int(os.environ.get("P402_FUZZ_PG_EXAMPLES", "1200"))
LONG = int(os.environ.get("P402_FUZZ_LONG_EXAMPLES", "100000"))
RSS_LIMIT_KB = int(os.environ.get("P402_FUZZ_RSS_LIMIT_MB", "600")) * 1024

ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
}
I64 = (-(2**63), 2**63 - 1)
I32 = (-(2**31), 2**31 - 1)
SPECIAL_STR = ["", " ", "\x00", "a" * 300, "x" * 70_000, "🙂" * 50, "p402_", "../../etc",
               "%s%n", "' OR 1=1 --", "\u202e", "gpt-4o-mini", "openai", "*", "customer",
               "label.", "AAAA", "eyJzZXEiOi0xfQ", "bm90LWEtdG9rZW4=", "-1", "9" * 40,
               # the string contract's edges (p402core.contract)
               "a\x00b", "\x00", "line\nbreak", "tab\t", "\x01", "\x1f", "del\x7f",
               "c1\x85", "\x9f", "x" * 256, "x" * 257, "é" * 256, "é" * 257, "\ufeff",
               "\U0010ffff"]


def _repeated(f) -> bool:
    # protobuf >= 6 has is_repeated; older runtimes only the label.
    rep = getattr(f, "is_repeated", None)
    return rep if rep is not None else f.label == FD.LABEL_REPEATED


def _ints(lo: int, hi: int):
    edges = [lo, hi, 0, 1, -1, lo + 1, hi - 1, 10**9, -(10**9), 999_999_999, 1_000_000_000]
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]),
                     st.integers(lo, hi), st.integers(-1000, 1000))


_STR = st.one_of(st.sampled_from(SPECIAL_STR), st.text(max_size=40))
_KEYS = st.one_of(st.sampled_from(["customer", "feature", "label.team", "", "model",
                                   "hold_ttl_seconds", "allow_clamp", "x" * 200]), st.text(max_size=12))


def _scalar(f):
    t = f.type
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return _ints(*I64)
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _ints(*I32)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if t == FD.TYPE_ENUM:  # wrong numbers too: proto3 enums are open
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]),
                         st.integers(-3, 50), st.sampled_from(list(I32)))
    if t == FD.TYPE_BYTES:
        return st.one_of(st.binary(max_size=200), st.sampled_from(
            [b"", b"{}", b"[]", b'{"m": {"input_cost_per_token": -1}}', b"\xff" * 1000,
             b'{"x": {"input_cost_per_token": 1e308, "output_cost_per_token": "NaN"}}']))
    if t == FD.TYPE_STRING:
        if f.name == "model" or f.name == "models":
            return st.one_of(st.just(MODEL), _STR)
        return _STR
    raise AssertionError(f"unhandled field type {t} of {f.full_name}")


def message(desc, depth: int = 0):
    """A strategy of dicts of field values for message descriptor `desc`."""
    fields = {}
    for f in desc.fields:
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            kf, vf = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            if vf.message_type is not None:
                continue
            small = st.dictionaries(_KEYS if kf.type == FD.TYPE_STRING else _scalar(kf),
                                    _scalar(vf), max_size=6)
            huge = st.integers(200, 3000).map(
                lambda n: {f"k{i}": "v" * (i % 7) for i in range(n)})
            fields[f.name] = st.one_of(small, small, huge)
            continue
        if f.message_type is not None:
            if depth >= 3:
                continue
            sub = st.deferred(lambda d=f.message_type: message(d, depth + 1))
        else:
            sub = _scalar(f)
        if _repeated(f):
            fields[f.name] = st.one_of(st.lists(sub, max_size=4),
                                       st.lists(sub, min_size=50, max_size=60)
                                       if f.message_type is None else st.lists(sub, max_size=8))
        else:
            fields[f.name] = sub
    return st.fixed_dictionaries({}, optional=fields)


def build(cls, values: dict):
    """Fill a message from generated values (skipping what protobuf itself refuses)."""
    m = cls()
    _fill(m, values)
    return m


def _fill(m, values: dict) -> None:
    for name, value in values.items():
        f = m.DESCRIPTOR.fields_by_name[name]
        try:
            if f.message_type is not None and f.message_type.GetOptions().map_entry:
                getattr(m, name).update(value)
            elif f.message_type is not None and _repeated(f):
                for v in value:
                    _fill(getattr(m, name).add(), v)
            elif f.message_type is not None:
                _fill(getattr(m, name), value)
                getattr(m, name).SetInParent()
            elif _repeated(f):
                getattr(m, name).extend(value)
            else:
                setattr(m, name, value)
        except (ValueError, TypeError):
            pass  # a value protobuf itself cannot hold (e.g. an int out of range)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql",
                                                                 marks=pytest.mark.postgres)])
def live(request, tmp_path_factory):
    import asyncio

    tmp = tmp_path_factory.mktemp("fuzz")
    drop = None
    if request.param == "sqlite":
        url = sqlite_url(tmp / "ledger.db")
    else:
        url, drop = _pg_database()
    try:
        yield from _live(url, tmp, request.param)
    finally:
        if drop is not None:
            asyncio.run(drop())


def _pg_database():
    """A fresh PostgreSQL database -> (url, async drop); skipped when unreachable,
    unless CI=true."""
    import asyncio

    from tests.server.service_harness import IN_CI, PG_ADMIN_URL, _pg_database as make

    try:
        return asyncio.run(make())
    except Exception as exc:  # noqa: BLE001 - any failure to connect: unreachable
        if IN_CI:
            pytest.fail(f"CI=true requires PostgreSQL at {PG_ADMIN_URL}: {exc!r}")
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} unreachable: {exc!r}")


def _live(url, tmp, backend: str):
    import asyncio

    tenant, key = asyncio.run(_init_tenant(url, "fuzz"))
    # Another tenant's steady traffic (test_valid_records_are_never_failed_…): the
    # fuzzed tenant's ledger stays what the oracle compares.
    _steady_tenant, steady_key = asyncio.run(_init_tenant(url, "steady"))
    srv = ServerProcess(url, log_path=tmp / "serve.log").start()
    ch = grpc.insecure_channel(srv.target, options=[
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    state = {"srv": srv, "ch": ch, "key": key, "tenant": tenant, "cases": 0, "codes": {},
             "rss": [srv.rss_kb()], "backend": backend, "steady_key": steady_key}
    yield state
    ch.close()
    assert srv.alive(), "the server died under fuzzing"
    assert srv.stop() == 0
    print(f"\nfuzz: {state['cases']} cases, codes {state['codes']}, RSS KiB "
          f"{state['rss'][0]} -> max {max(state['rss'])}")


def _invoke(ch, service: str, method, request, md, acked: list | None = None):
    """Call `method`; for a bidirectional stream, each response received is appended
    to `acked` as it arrives (a later message may still fail the call)."""
    path = f"/{service}/{method.name}"
    ser = lambda m: m.SerializeToString()  # noqa: E731
    out_cls = _cls(method.output_type)
    if method.client_streaming and method.server_streaming:
        fn = ch.stream_stream(path, request_serializer=ser,
                              response_deserializer=out_cls.FromString)
        acked = [] if acked is None else acked
        for resp in fn(iter(request), metadata=md, timeout=30):
            acked.append(resp)
        return acked
    if method.server_streaming:
        fn = ch.unary_stream(path, request_serializer=ser,
                             response_deserializer=out_cls.FromString)
        return list(fn(request, metadata=md, timeout=30))
    fn = ch.unary_unary(path, request_serializer=ser, response_deserializer=out_cls.FromString)
    return fn(request, metadata=md, timeout=30)


def _cls(desc):
    for mod in (meter_pb2, admin_pb2, common_pb2):
        if desc.name in mod.DESCRIPTOR.message_types_by_name and \
                mod.DESCRIPTOR.message_types_by_name[desc.name] is desc:
            return getattr(mod, desc.name)
    raise AssertionError(desc.full_name)


def _settled(live) -> tuple:
    """(count of settled events, head chain hash): what a rejected call must not move.
    Denied and expired events are left out: OK Authorizes of earlier cases write
    those behind, at their own moment."""
    ch = live["ch"]
    md = bearer(live["key"])
    q = ch.unary_unary("/p402.v1.MeterService/Query",
                       request_serializer=lambda m: m.SerializeToString(),
                       response_deserializer=meter_pb2.QueryResponse.FromString)
    keep = [o for o in common_pb2.Outcome.values() if o not in (
        common_pb2.OUTCOME_UNSPECIFIED, common_pb2.OUTCOME_DENIED, common_pb2.OUTCOME_EXPIRED)]
    r = q(meter_pb2.QueryRequest(group_by=["outcome"], filter=meter_pb2.EventFilter(
        outcomes=keep)), metadata=md, timeout=30)
    r2 = q(meter_pb2.QueryRequest(page_size=1, filter=meter_pb2.EventFilter(outcomes=keep)),
           metadata=md, timeout=30)
    return sum(x.event_count for x in r.rows), [e.chain_hash for e in r2.events]


def _acked_new(responses) -> int:
    """Records a stream acknowledged as newly written, before it failed."""
    n = 0
    for r in responses:
        if isinstance(r, meter_pb2.RecordResponse):
            n += not r.duplicate
        else:  # RecordBatchResponse
            n += sum(not x.duplicate for x in r.results)
    return n


def _check_case(live, service, method, request) -> None:
    before = _settled(live)
    acked: list = []
    try:
        _invoke(live["ch"], service, method, request, bearer(live["key"]), acked)
        code, err = grpc.StatusCode.OK, None
    except grpc.RpcError as exc:
        code, err = exc.code(), exc
    live["cases"] += 1
    live["codes"][code.name] = live["codes"].get(code.name, 0) + 1
    assert live["srv"].alive(), f"server died on {method.name}: {request!r:.500}"
    assert code in ALLOWED, (method.name, code, err and err.details(), f"{request!r:.800}")
    if code != grpc.StatusCode.OK:
        details = err.details() or ""
        assert details, (method.name, code)
        status = rpc_status.from_call(err)
        info = None
        for d in (status.details if status else ()):
            if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                d.Unpack(info)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert info is not None and info.metadata.get("field"), (
                method.name, details, info)
        if acked:
            # A stream fails at its first bad message; what it acknowledged before
            # stays (each response was a commit), and nothing else is written.
            # (<=: a Record may carry an outcome the count leaves out, e.g. EXPIRED.)
            after = _settled(live)
            assert 0 <= after[0] - before[0] <= _acked_new(acked), (
                f"rejected {method.name} wrote beyond what it acknowledged")
        else:
            assert _settled(live) == before, f"rejected {method.name} changed the ledger"
    if live["cases"] % 200 == 0:
        live["rss"].append(live["srv"].rss_kb())
        assert live["rss"][-1] < RSS_LIMIT_KB, live["rss"]


def _fuzz(method_index: int, examples: int):
    service, method = METHODS[method_index]
    in_cls = _cls(method.input_type)
    strat = message(in_cls.DESCRIPTOR)
    if method.client_streaming:
        strat = st.lists(strat, max_size=3)

    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(values=strat)
    def run(live, values):
        if method.client_streaming:
            request = [build(in_cls, v) for v in values]
        else:
            request = build(in_cls, values)
        _check_case(live, service, method, request)

    return run


IDS = [f"{s.rsplit('.', 1)[-1]}.{m.name}" for s, m in METHODS]


@pytest.mark.parametrize("i", range(len(METHODS)), ids=IDS)
def test_fuzz_every_rpc(live, i):
    total = NORMAL if live["backend"] == "sqlite" else PG_NORMAL
    _fuzz(i, max(20, total // len(METHODS)))(live)


def test_valid_records_are_never_failed_by_fuzzed_ones(live):
    """A steady stream of valid Records (another connection) while Record,
    RecordBatch and StreamRecords are fuzzed: none of them fails, and the ledger
    holds exactly the acknowledged ones."""
    import threading

    ch = grpc.insecure_channel(live["srv"].target)
    record = ch.unary_unary("/p402.v1.MeterService/Record",
                            request_serializer=lambda m: m.SerializeToString(),
                            response_deserializer=meter_pb2.RecordResponse.FromString)
    md = bearer(live["steady_key"])
    stop = threading.Event()
    acked, failures = [], []

    def steady():
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = record(meter_pb2.RecordRequest(
                    event_id=f"steady-{live['backend']}-{i}", model=MODEL,
                    owners=common_pb2.Owners(customer="steady-customer"),
                    usage=common_pb2.Usage(input_tokens=10, output_tokens=2)),
                    metadata=md, timeout=30)
                acked.append(r.event_id)
            except grpc.RpcError as exc:
                failures.append((exc.code(), exc.details()))

    t = threading.Thread(target=steady, daemon=True)
    t.start()
    try:
        for name in ("Record", "RecordBatch", "StreamRecords", "StreamRecordBatches"):
            i = next(k for k, (_s, m) in enumerate(METHODS) if m.name == name)
            _fuzz(i, 40)(live)
    finally:
        stop.set()
        t.join(30)
        ch.close()
    assert not failures, failures[:3]
    assert acked
    q = live["ch"].unary_unary("/p402.v1.MeterService/Query",
                               request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=meter_pb2.QueryResponse.FromString)
    r = q(meter_pb2.QueryRequest(group_by=["customer"], filter=meter_pb2.EventFilter(
        owners=common_pb2.Owners(customer="steady-customer"))), metadata=md, timeout=30)
    # (md is the steady tenant's key: its ledger holds only the steady Records.)
    assert sum(x.event_count for x in r.rows) == len(acked)


UNARY = [i for i, (_s, m) in enumerate(METHODS)
         if not (m.client_streaming or m.server_streaming)]


@pytest.mark.parametrize("i", UNARY, ids=[IDS[i] for i in UNARY])
def test_garbage_bytes_never_crash_or_write(live, i):
    """Bytes that are no protobuf: never a crash, never a ledger change."""
    service, method = METHODS[i]
    path = f"/{service}/{method.name}"
    fn = live["ch"].unary_unary(path, request_serializer=None, response_deserializer=None)
    before = _settled(live)
    for blob in GARBAGE:
        with pytest.raises(grpc.RpcError):
            fn(blob, metadata=bearer(live["key"]), timeout=10)
        assert live["srv"].alive()
    assert _settled(live) == before


GARBAGE = (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x08" + b"\xff" * 11,
           b"\x12\x05abc", bytes(range(256)))


@pytest.mark.parametrize("i", UNARY, ids=[IDS[i] for i in UNARY])
def test_garbage_bytes_are_invalid_argument(live, i):
    """Bytes that are no protobuf: INVALID_ARGUMENT, like any other bad input."""
    service, method = METHODS[i]
    path = f"/{service}/{method.name}"
    fn = live["ch"].unary_unary(path, request_serializer=None, response_deserializer=None)
    before = _settled(live)
    for blob in GARBAGE:
        try:
            fn(blob, metadata=bearer(live["key"]), timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
        # A request that cannot be parsed is the client's fault.
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method.name, code)
        assert live["srv"].alive()
    assert _settled(live) == before


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(METHODS)), ids=IDS)
def test_fuzz_every_rpc_long(live, i):
    _fuzz(i, max(100, LONG // len(METHODS)))(live)


STREAMING_IN = [i for i, (_s, m) in enumerate(METHODS) if m.client_streaming]


@pytest.mark.parametrize("i", STREAMING_IN, ids=[IDS[i] for i in STREAMING_IN])
def test_garbage_in_a_client_stream_is_invalid_argument(live, i):
    """A streamed message that is no protobuf ends the call with INVALID_ARGUMENT
    naming the field `request`."""
    service, method = METHODS[i]
    fn = live["ch"].stream_stream(f"/{service}/{method.name}",
                                  request_serializer=None, response_deserializer=None)
    before = _settled(live)
    call = fn(iter([GARBAGE[1]]), metadata=bearer(live["key"]), timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request:"), info.value.details()
    assert live["srv"].alive()
    assert _settled(live) == before
