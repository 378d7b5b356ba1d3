"""Hypothesis strategies for streamed chat answers (Server-Sent Events) as an upstream
may send them: OpenAI's chunks with and without `"usage": null`, the usage chunk,
`[DONE]`, and what a careless or hostile upstream adds (spaced JSON, an escaped or
duplicated "usage" key, lone surrogates, non-ASCII text, malformed or non-object
JSON, invalid UTF-8, comments, other fields, `data:` without its space, extra blank
lines, "\\r" line ends), cut into reads anywhere."""
from __future__ import annotations

import json

from hypothesis import strategies as st

_texts = st.one_of(
    st.sampled_from(["", " tok", "hé", "日本", "🙂", "a\nb", 'q"uote', "back\\slash",
                     "\ud800", "x\udfffy", "\x00"]),
    st.text(max_size=6))


@st.composite
def chunk_json(draw, plain: bool = False) -> bytes:
    """One chat chunk's JSON text (`plain`: as OpenAI writes its content chunks)."""
    body: dict = {"id": "chatcmpl-1", "object": "chat.completion.chunk"}
    kind = "content" if plain else draw(
        st.sampled_from(["content", "content", "usage", "empty", "odd"]))
    if kind == "content":
        body["choices"] = [{"index": i, "delta": {"content": draw(_texts)},
                            "finish_reason": None}
                           for i in range(draw(st.integers(1, 2)))]
    elif kind == "usage":
        body["choices"] = []
        body["usage"] = {"prompt_tokens": draw(st.integers(0, 2**70)),
                         "completion_tokens": draw(st.integers(0, 50))}
    elif kind == "empty":
        body["choices"] = draw(st.sampled_from([[], None, [{}], [{"delta": None}],
                                                [{"delta": {"content": None}}]]))
    else:
        body["choices"] = draw(st.sampled_from(
            [{"a": 1}, "text", [5], [{"delta": "x"}], [{"delta": {"content": 7}}]]))
    if plain:
        if draw(st.booleans()):
            body["usage"] = None
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass")
    if "usage" not in body and draw(st.booleans()):
        body["usage"] = draw(st.sampled_from([None, None, None, 0, {}, []]))
    spaced = draw(st.booleans())
    ascii_only = draw(st.booleans())  # else a lone surrogate is invalid UTF-8
    text = json.dumps(body, separators=(", ", ": ") if spaced else (",", ":"),
                      ensure_ascii=ascii_only)
    trick = draw(st.sampled_from(["", "", "", "", "dup", "escaped", "nested"]))
    if trick == "dup" and text.endswith('"usage":null}'):
        text = text[:1] + '"usage":{"prompt_tokens":1},' + text[1:]
    elif trick == "escaped" and text.endswith(',"usage":null}'):
        text = text[:1] + '"\\u0075sage":{"prompt_tokens":2},' + text[1:]
    elif trick == "nested":
        text = text[:1] + '"x":{"usage":null},' + text[1:]
    return text.encode("utf-8", "surrogatepass")


_FIXED = {"done": b"data: [DONE]", "comment": b": keep-alive", "array": b"data: [1, 2]",
          "bad": b'data: {"choices":[{"delta":{"content":"x"}}'}
_BEFORE_JSON = {"chunk": b"data: ", "field": b"event: chunk\ndata: ", "nospace": b"data:"}


@st.composite
def event_block(draw) -> bytes:
    """One event's lines, without the blank line that ends it."""
    kind = draw(st.sampled_from(["chunk"] * 6 + [*_FIXED, *_BEFORE_JSON, "multiline"]))
    if kind in _FIXED:
        return _FIXED[kind]
    if kind in _BEFORE_JSON:
        return _BEFORE_JSON[kind] + draw(chunk_json())
    data = draw(chunk_json())
    return b"data: " + data[:3] + b"\ndata: " + data[3:]


@st.composite
def sse_stream(draw) -> tuple[bytes, list[int]]:
    """(the whole stream, the ends of its reads): half of them as a provider writes
    (content chunks, then maybe the usage chunk and [DONE], "\\n" line ends)."""
    if draw(st.booleans()):
        blocks = [b"data: " + c for c in draw(st.lists(chunk_json(plain=True), max_size=8))]
        blocks += draw(st.sampled_from([[], [b"data: [DONE]"], [
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}',
            b"data: [DONE]"]]))
        blocks = blocks or [b"data: [DONE]"]
        line_end = b"\n"
    else:
        blocks = draw(st.lists(event_block(), min_size=1, max_size=8))
        line_end = draw(st.sampled_from(["\n"] * 4 + ["\r\n", "\r"])).encode()
    parts = []
    for block in blocks:
        blank = b"\n\n" + b"\n" * draw(st.sampled_from([0, 0, 0, 1, 2]))
        parts.append((block + blank).replace(b"\n", line_end))
    raw = b"".join(parts)
    if draw(st.booleans()):  # reads at event boundaries, as a provider writes
        ends, at = [], 0
        for part in parts:
            at += len(part)
            if draw(st.booleans()) or at == len(raw):
                ends.append(at)
    else:
        ends = sorted(set(draw(st.lists(st.integers(1, max(1, len(raw))), max_size=6))
                          + [len(raw)]))
    return raw, ends
