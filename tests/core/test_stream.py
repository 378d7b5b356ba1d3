"""The streamed chat relay's common case in both twins (`chat_events`): the same
answer for any read an upstream could send, and what `_stream_py` specifies on the
reads that matter (OpenAI's chunks, the usage chunk, the cut of `"usage":null`)."""
from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.sse_streams import chunk_json, sse_stream

SETTINGS = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _chunk(content, **extra) -> bytes:
    body = {"id": "c", "choices": [{"index": 0, "delta": {"content": content}}], **extra}
    return (b"data: " + json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
            + b"\n\n")


def test_openai_chunks_are_counted_and_their_null_usage_cut(impl):
    raw = _chunk(" hé", usage=None) + _chunk("🙂", usage=None) + b"data: [DONE]\n\n"
    out, end, chunks, nbytes = impl.chat_events(raw, True, orjson.loads)
    assert end == len(raw) and (chunks, nbytes) == (2, len(" hé🙂".encode()))
    assert out == _chunk(" hé") + _chunk("🙂") + b"data: [DONE]\n\n"
    # Not stripping: the very same bytes object goes out.
    out, end, _, _ = impl.chat_events(raw, False, orjson.loads)
    assert out is raw and end == len(raw)


def test_it_stops_before_the_first_event_it_does_not_take(impl):
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":9}}\n\n'
    head = _chunk("a", usage=None)
    for rest in (usage, b"data: {bad\n\n", b": comment\n\n", b"data: [1]\n\n",
                 _chunk("b", usage=None)[:-1], _chunk("b", usage=None).replace(b"\n", b"\r\n"),
                 _chunk("b", usage=0), b"event: x\n" + _chunk("b")):
        raw = head + rest + _chunk("c")
        out, end, chunks, nbytes = impl.chat_events(raw, True, orjson.loads)
        assert (out, end, chunks, nbytes) == (_chunk("a"), len(head), 1, 1), rest
    assert impl.chat_events(b"", True, orjson.loads) == (b"", 0, 0, 0)


def test_a_null_usage_is_cut_only_when_the_bytes_are_the_member(impl):
    ok = b'{"choices":[{"delta":{"content":"x\\n"}}],"usage":null}'
    assert impl.null_usage_at_end(ok)
    # Escapes that cannot spell the key do not matter (a server writing ASCII only).
    assert impl.null_usage_at_end(b'{"choices":[{"delta":{"content":"caf\\u00e9 \\u00"}}],'
                                  b'"usage":null}')
    for i, letter in enumerate("usage"):  # each letter of the key, escaped
        key = "usage"[:i] + "\\u%04x" % ord(letter) + "usage"[i + 1:]
        dup = b'{"' + key.encode() + b'":{"a":1},"choices":[1],"usage":null}'
        assert json.loads(dup)["usage"] is None and not impl.null_usage_at_end(dup), dup
    for other in (b'{"usage":{"a":1},"choices":[1],"usage":null}',  # a duplicate key
                  b'{"\\u0075sage":{"a":1},"choices":[1],"usage":null}',  # escaped
                  b'{"choices":[1], "usage": null}', b'{"choices":[1],"usage":null} ',
                  b'"usage":null}', b""):
        assert not impl.null_usage_at_end(other), other


@pytest.mark.parametrize("text", ["", "abc", "hé", "日本", "🙂", "\ud800", "a\udfff🙂",
                                  "\x00", "\u07ff\u0800\uffff\U00010000"])
def test_utf8_length_counts_lone_surrogates_as_three_bytes(impl, text):
    assert impl.utf8_length(text) == len(text.encode("utf-8", "surrogatepass"))


@SETTINGS
@given(stream=sse_stream(), strip=st.booleans(), lax=st.booleans())
def test_the_twins_answer_alike_on_any_read(both, stream, strip, lax):
    python, compiled = both
    raw, ends = stream
    loads = json.loads if lax else orjson.loads
    at = 0
    for end in ends:
        read = raw[at:end]
        assert python.chat_events(read, strip, loads) == compiled.chat_events(
            read, strip, loads)
        at = end


@SETTINGS
@given(data=chunk_json())
def test_the_twins_cut_alike(both, data):
    python, compiled = both
    assert python.null_usage_at_end(data) == compiled.null_usage_at_end(data)


@SETTINGS
@given(data=chunk_json())
def test_the_twins_count_content_alike(both, data):
    python, compiled = both
    try:
        payload = json.loads(data)
    except ValueError:
        return  # invalid UTF-8: no object to count
    if type(payload) is dict:
        assert python.chat_content(payload) == compiled.chat_content(payload)


# --- the shape of the last content chunk: less work, never another answer ----------

def _reads(stream):
    raw, ends = stream
    at = 0
    for end in ends:
        yield raw[at:end]
        at = end


@SETTINGS
@given(stream=sse_stream(), strip=st.booleans(), lax=st.booleans())
def test_a_shape_changes_no_answer(impl, stream, strip, lax):
    loads = json.loads if lax else orjson.loads
    shape = impl.ChatShape()
    for read in _reads(stream):
        assert impl.chat_events(read, strip, loads, shape) == impl.chat_events(
            read, strip, loads), read


@SETTINGS
@given(stream=sse_stream(), strip=st.booleans())
def test_the_twins_answer_alike_with_a_shape(both, stream, strip):
    python, compiled = both
    shapes = python.ChatShape(), compiled.ChatShape()
    for read in _reads(stream):
        assert python.chat_events(read, strip, orjson.loads, shapes[0]) == \
            compiled.chat_events(read, strip, orjson.loads, shapes[1]), read


def _openai(text: bytes) -> bytes:
    return (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"choices":'
            b'[{"index":0,"delta":{"content":"' + text + b'"},"finish_reason":null}],'
            b'"usage":null}\n\n')


@pytest.mark.parametrize("text", [
    b'say \\"hi\\"', b"tab\\t", b"\\u00e9", b"\\u0075sage", b'a"b', b"nl\nx", b"\x01",
    b"\xc3", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
    b"\xf5\x80\x80\x80", b"\xff", "日本🙂".encode(), b"\x7f", b""])
def test_a_chunk_laid_out_as_the_last_is_read_as_a_parse_would(impl, text):
    """Escapes, quotes, control characters and bytes that are not UTF-8 between the
    learned bytes are read the long way: the answer is the parse's, whatever it is."""
    for strip in (True, False):
        shape = impl.ChatShape()
        first = _openai(b"hello")
        assert impl.chat_events(first, strip, orjson.loads, shape)[1:] == (
            len(first), 1, 5)
        assert shape.prefix.endswith(b'"content":"') and shape.cut == strip
        raw = _openai(text)
        assert impl.chat_events(raw, strip, orjson.loads, shape) == impl.chat_events(
            raw, strip, orjson.loads), text


def test_a_shape_learned_with_one_reader_is_not_used_with_another(impl):
    """json.loads reads NaN, orjson refuses it: what one reader accepted says nothing
    of what another would."""
    nan = _openai(b"a").replace(b'"created":1', b'"created":NaN')
    shape = impl.ChatShape()
    assert impl.chat_events(nan, True, json.loads, shape)[1:] == (len(nan), 1, 1)
    assert shape.loads is json.loads
    again = _openai(b"b").replace(b'"created":1', b'"created":NaN')
    assert impl.chat_events(again, True, orjson.loads, shape) == (b"", 0, 0, 0)
    assert impl.chat_events(again, False, json.loads, shape)[1:] == (len(again), 1, 1)


def test_only_a_chunk_whose_text_can_be_told_apart_is_learned(impl):
    for chunk in (
            _openai(b"a").replace(b'"index":0', b'"index":0,"x":"\\u0041"'),  # a backslash
            _openai(b"a").replace(b'"c1"', b'"content"'),  # "content" twice
            _openai(b"a").replace(b'"content":"a"', b'"content": "a"'),  # spaced
            b'data: {"choices":[{"delta":{"content":"a"}},{"delta":{"content":"b"}}]}\n\n',
            b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'):
        shape = impl.ChatShape()
        assert impl.chat_events(chunk, True, orjson.loads, shape)[1] == len(chunk), chunk
        assert shape.loads is None, chunk
