"""The proxy's stream relay and JSON, against references: `jsonio.loads` answers what
`json.loads` answers (values, types, refusals) on any text; `SseEvents` finds the
same events as a whole-text SSE parser however the bytes are cut and whichever line
ends they use; a chunk's `"usage": null` cut out of its text leaves exactly the
chunk without it; `_relay` drops the usage chunk the caller did not ask for and
forwards every other event; `relay_read`, which hands the common case to the compiled
core, sends and counts exactly what the general path does, however the stream is cut;
an upstream's odd text (a lone surrogate, a delta that is not a string) is counted,
never an error."""
from __future__ import annotations

import json
import math

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p402_server.gateways import jsonio, proxy
from p402_server.gateways.proxy import (
    SseEvents,
    StreamUsage,
    _event_data,
    _relay,
    relay_read,
    without_null_usage,
)
from tests.support.sse_streams import sse_stream

SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))

# ----------------------------------------------------------------------- jsonio

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=12)
_odd_texts = st.sampled_from([
    b'{"a": NaN}', b"[Infinity, -Infinity]", b'"\\ud800"', b'{"\\udfff": 1}', b"1e400",
    b"-1e400", b"\xef\xbb\xbf{}", '{"a": 1}'.encode("utf-16"), b"[" * 1100 + b"]" * 1100,
    b"", b"{", b"nul", b"\xff", b"18446744073709551616", b"-9223372036854775809",
    b"[1.0, -0.0, 0, -0, 1E2, 1e-7]", b'{"a":1,"a":2}'])


def _same(a, b) -> bool:
    """Equal values of equal types all the way down (1 == 1.0 is not enough; -0.0 is
    not 0.0), however deep."""
    todo = [(a, b)]
    while todo:
        x, y = todo.pop()
        if type(x) is not type(y):
            return False
        if isinstance(x, dict):
            if list(x) != list(y):
                return False
            todo += [(x[k], y[k]) for k in x]
        elif isinstance(x, list):
            if len(x) != len(y):
                return False
            todo += zip(x, y)
        elif isinstance(x, float):
            if math.isnan(x) or math.isnan(y):
                if not (math.isnan(x) and math.isnan(y)):
                    return False
            elif x != y or math.copysign(1, x) != math.copysign(1, y):
                return False
        elif x != y:
            return False
    return True


def _outcome(fn, raw):
    try:
        return ("ok", fn(raw))
    except RecursionError:
        return ("err", RecursionError)
    except ValueError:
        return ("err", ValueError)


@SETTINGS
@given(raw=st.one_of(_values.map(lambda v: json.dumps(v).encode()),
                     _values.map(lambda v: json.dumps(v, ensure_ascii=False).encode()),
                     _odd_texts))
def test_loads_answers_what_json_loads_answers(raw):
    got, want = _outcome(jsonio.loads, raw), _outcome(json.loads, raw)
    assert got[0] == want[0], (raw[:80], got, want)
    if want[0] == "ok":
        assert _same(got[1], want[1]), (raw[:80], got[1], want[1])
    else:
        assert got[1] is want[1]


@SETTINGS
@given(value=_values)
def test_dumps_writes_what_reads_back_the_same(value):
    raw = jsonio.dumps(value)
    assert isinstance(raw, bytes) and b"\n" not in raw
    assert _same(json.loads(raw), value)


# ----------------------------------------------------------------------- SSE framing

_field_text = st.text(alphabet=st.characters(blacklist_characters="\r\n",
                                             blacklist_categories=("Cs",)), max_size=12)
_event = st.fixed_dictionaries({"data": st.lists(_field_text, min_size=1, max_size=3)},
                               optional={"event": _field_text, "id": _field_text,
                                         "comment": _field_text})


def _wire(events: list[dict], ends: list[str], blanks: list[int]) -> bytes:
    lines: list[str] = []
    for i, ev in enumerate(events):
        if "comment" in ev:
            lines.append(":" + ev["comment"])
        if "event" in ev:
            lines.append("event: " + ev["event"])
        lines += ["data: " + d for d in ev["data"]]
        if "id" in ev:
            lines.append("id:" + ev["id"])
        lines += [""] * (1 + blanks[i % len(blanks)])
    out, prev = "", ""
    for i, line in enumerate(lines):
        end = ends[i % len(ends)]
        if prev == "\r" and not line and end == "\n":
            end = "\r\n"  # "\r" then "\n" would be one line end ("\r\n"), not two
        out += line + end
        prev = end
    return out.encode()


@SETTINGS
@given(events=st.lists(_event, min_size=1, max_size=6),
       ends=st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1, max_size=4),
       blanks=st.lists(st.integers(0, 2), min_size=1, max_size=3),
       cuts=st.one_of(st.lists(st.integers(1, 400), max_size=12), st.just(None)),
       last_blank=st.booleans())
def test_events_are_found_however_the_bytes_are_cut(events, ends, blanks, cuts, last_blank):
    raw = _wire(events, ends, blanks)
    if not last_blank:  # a stream may end without the blank line after its last event
        raw = raw.rstrip(b"\r\n")
    if cuts is None:  # a byte at a time: every boundary falls between two reads
        cuts = list(range(1, len(raw)))
    parser, blocks, at = SseEvents(), [], 0
    for cut in sorted(set(cuts)):
        blocks += parser.feed(raw[at:cut])
        at = max(at, cut)
    blocks += parser.feed(raw[at:])
    blocks += parser.close()
    assert [_event_data(b) for b in blocks] == [
        "\n".join(ev["data"]).encode() for ev in events]
    for block, ev in zip(blocks, events):
        names = [line.partition(b":")[0] for line in block.split(b"\n")]
        assert names.count(b"event") == ("event" in ev) and names.count(b"id") == ("id" in ev)
        if "event" in ev:
            assert b"event: " + ev["event"].encode() in block.split(b"\n")


# ----------------------------------------------------------------------- usage: null

_members = st.lists(st.tuples(st.sampled_from(["id", "choices", "x", "usage2", "usag"]),
                              _values), max_size=4, unique_by=lambda m: m[0])
_space = st.sampled_from(["", "", " ", "\t", "  ", "\r\n "])


@SETTINGS
@given(members=_members, where=st.integers(0, 4), spaces=st.lists(_space, min_size=4,
                                                                     max_size=4),
       escaped_key=st.booleans(), ascii_only=st.booleans())
def test_a_null_usage_cut_from_the_text_leaves_the_chunk_without_it(
        members, where, spaces, escaped_key, ascii_only):
    members = list(members)
    members.insert(min(where, len(members)), ("usage", None))
    a, b, c, d = spaces
    parts = []
    for k, v in members:
        key = '"\\u0075sage"' if k == "usage" and escaped_key else json.dumps(k)
        parts.append(a + key + b + ":" + c + json.dumps(v, ensure_ascii=ascii_only) + d)
    data = ("{" + ",".join(parts) + "}").encode()
    payload = json.loads(data)
    out = without_null_usage(data, payload)
    assert b"\n" not in out  # it goes on one SSE data line
    assert _same(json.loads(out), {k: v for k, v in payload.items() if k != "usage"})


def test_the_usual_openai_chunk_is_cut_not_rewritten():
    data = (b'{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,'
            b'"delta":{"content":" caf\xc3\xa9"},"finish_reason":null}],"usage":null}')
    assert without_null_usage(data, json.loads(data)) == data[:-len(b',"usage":null}')] + b"}"
    # The same ending elsewhere is written again: a nested "usage", an escape that
    # could spell the key, a line break (the result goes on one SSE data line).
    for other in (b'{"x":{"usage":1},"usage":null}', b'{"\\u0061":1,"usage":null}',
                  b'{"a":\n1,"usage":null}'):
        payload = json.loads(other)
        out = without_null_usage(other, payload)
        assert b"\n" not in out and json.loads(out) == {
            k: v for k, v in payload.items() if k != "usage"}


# ----------------------------------------------------------------------- the relay

def _chunk(content: str | None, usage=None, choices=True) -> bytes:
    body = {"id": "c1", "choices": [{"index": 0, "delta": {"content": content}}]
            if choices else [], "usage": usage}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def test_relay_strips_the_usage_the_caller_did_not_ask_for():
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    raw = (_chunk("hé") + b": keep-alive\n\n" + _chunk(" there") +
           _chunk(None, usage, choices=False) + b"data: [DONE]\n\n")
    for strip in (True, False):
        seen, parser = StreamUsage("chat"), SseEvents()
        out = b"".join(_relay(parser.feed(raw[i:i + 9]), seen, strip)
                       for i in range(0, len(raw), 9)) + _relay(parser.close(), seen, strip)
        frames = [f for f in out.split(b"\n\n") if f]
        datas = [json.loads(f[6:]) for f in frames if f.startswith(b"data: {")]
        assert seen.usage["input_tokens"] == 9 and seen.usage["output_tokens"] == 2
        assert (seen.chunks, seen.out_bytes) == (2, len("hé there".encode()))
        assert frames[-1] == b"data: [DONE]" and b": keep-alive" in frames
        if strip:
            assert len(datas) == 2 and all("usage" not in d for d in datas)
        else:
            assert len(datas) == 3 and datas[-1]["usage"] == usage


def test_a_usage_beyond_64_bits_is_read_exactly_and_not_taken(caplog):
    big = 2**70
    raw = _chunk(None, {"prompt_tokens": big, "completion_tokens": 1}, choices=False)
    seen = StreamUsage("chat")
    _relay(SseEvents().feed(raw), seen, True)
    assert seen.usage is None  # not a token count: the estimate stands in
    assert any(f"prompt_tokens = {big}," in r.getMessage() for r in caplog.records)


def test_an_event_that_never_ends_is_a_broken_stream(monkeypatch):
    monkeypatch.setattr(proxy, "MAX_EVENT_BYTES", 64)
    parser = SseEvents()
    assert parser.feed(b"data: " + b"x" * 40) == []
    assert parser.feed(b"\n\ndata: " + b"y" * 50) == [b"data: " + b"x" * 40]
    with pytest.raises(aiohttp.ClientPayloadError, match="longer than 64 bytes"):
        parser.feed(b"z" * 20)  # 76 bytes and no blank line: no end in sight


def test_a_whole_answers_usage_is_read_exactly_whatever_else_it_holds():
    big = 2**70
    answer = {"id": "x", "object": "chat.completion", "service_tier": "flex",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                           "logprobs": {"n": big, "m": [-(2**64) - 1]}}],
              "usage": {"prompt_tokens": big, "completion_tokens": 3}}
    usage = proxy.answer_usage("chat", json.dumps(answer).encode())
    assert usage is None  # read exactly (an int, not a float), and not a token count
    fits = {**answer, "usage": {"prompt_tokens": 9, "completion_tokens": 3,
                                "prompt_tokens_details": {"cached_tokens": big}}}
    usage = proxy.answer_usage("chat", json.dumps(fits).encode())
    assert usage["input_tokens"] == 9 and usage["cached_input_tokens"] == 9  # cut to it
    assert usage["service_tier"] == "flex"
    plain = {**answer, "usage": {"prompt_tokens": 9, "completion_tokens": 3}}
    assert proxy.answer_usage("chat", json.dumps(plain).encode())["input_tokens"] == 9
    with pytest.raises(AttributeError):
        proxy.answer_usage("chat", b"[1, 2]")


def _relayed(raw: bytes, ends: list[int], kind: str, strip: bool, fast: bool):
    seen, parser, out, at = StreamUsage(kind), SseEvents(), [], 0
    for end in ends:
        read = raw[at:end]
        out.append(relay_read(parser, read, seen, strip) if fast
                   else _relay(parser.feed(read), seen, strip))
        at = end
    out.append(_relay(parser.close(), seen, strip))
    return b"".join(out), (seen.usage, seen.failed, seen.chunks, seen.out_bytes)


@SETTINGS
@given(stream=sse_stream(), strip=st.booleans(), kind=st.sampled_from(["chat", "chat",
                                                                         "responses"]))
def test_the_common_case_relays_and_counts_what_the_general_path_does(stream, strip, kind):
    raw, ends = stream
    strip = strip and kind == "chat"
    assert _relayed(raw, ends, kind, strip, fast=True) == _relayed(raw, ends, kind, strip,
                                                                   fast=False)


def test_odd_content_is_counted_not_an_error():
    lone = b'data: {"choices":[{"delta":{"content":"a\\ud800"}}],"usage":null}\n\n'
    for fast in (True, False):
        out, (_, _, chunks, nbytes) = _relayed(lone, [len(lone)], "chat", True, fast)
        assert (chunks, nbytes) == (1, 4) and out == lone.replace(b',"usage":null', b"")
    odd = (b'data: {"type":"response.output_text.delta","delta":5}\n\n'
           b'data: {"type":"response.output_text.delta","delta":"h\xc3\xa9"}\n\n')
    out, (_, _, chunks, nbytes) = _relayed(odd, [len(odd)], "responses", False, True)
    assert out == odd and (chunks, nbytes) == (2, 3)


@pytest.mark.parametrize("total", ["prompt_tokens", "completion_tokens", "input_tokens",
                                   "output_tokens"])
@pytest.mark.parametrize("value", [-1, 2**63, 2**70, proxy.MAX_TOKENS + 1, 9.0, 1.5, "9",
                                   True, None, [9], {"n": 9}, "\ud800"])
def test_a_usage_total_that_is_not_a_token_count_is_not_read(total, value, caplog):
    usage = ({"prompt_tokens": 9, "completion_tokens": 3} if total[0] in "pc"
             else {"input_tokens": 9, "output_tokens": 3})  # chat's shape, or responses'
    usage[total] = value
    got = proxy.usage_from("chat", usage)
    if value is None:  # absent: the other total is read
        assert got is not None
        return
    assert got is None  # the estimate stands in, never zero tokens
    assert any(total in r.getMessage() and "not a token count" in r.getMessage()
               for r in caplog.records)
    good = proxy.usage_from("chat", {**usage, total: proxy.MAX_TOKENS})
    assert good is not None and proxy.MAX_TOKENS in good.values()
