"""A streamed chat answer read as it passes — the pure-Python twin (the specification).

Owns ``chat_events``, the common case of what the P402 proxy does with each read of an
OpenAI chat stream (Server-Sent Events): count the content the caller receives (the
fallback estimate of a stream that ends without usage) and, when the caller did not
ask for usage, cut the ``"usage":null`` the proxy had the upstream add to every chunk.
A provider writes each chunk as one event, a hundred or more per answer, so this runs
about a hundred times a call; ``_stream_c`` is the compiled twin, with identical
answers. Everything else (an event split between reads, other fields, line ends other
than "\\n", the usage chunk itself) is the proxy's general path, which gives the same
result for what this accepts.

``chat_events(chunk, strip_usage, loads) -> (out, end, chunks, out_bytes)``

Reads the events at the start of ``chunk`` (bytes) that it accepts, and stops before
the first it does not: ``end`` is where it stopped (``len(chunk)`` when it took all,
0 when none), the rest is for the general path, ``out`` is what the caller is sent
for ``chunk[:end]``, ``chunks`` and ``out_bytes`` count the content in it.

- An accepted event is ``b"data: "``, one line holding no ``b"\\r"``, and a blank line
  (``b"\\n\\n"``); the line is ``[DONE]`` or a JSON object that ``loads`` reads as a
  dict (``loads`` raising ValueError is a refusal).
- An object whose ``"usage"`` member is truthy (the usage chunk) is not accepted: its
  usage is read exactly by the general path.
- Counting, per object: ``chat_content``.
- Each accepted event goes out unchanged, except, with ``strip_usage``, an object
  that has a ``"usage"`` member: it is accepted only when its ``"choices"`` is truthy,
  its usage None and its text ends with the top-level ``,"usage":null}``
  (``null_usage_at_end``), and goes out with that member cut.

``shape`` (optional, a ``ChatShape`` per stream) changes no answer, only the work:
it keeps the layout of the last content chunk this read whole: its bytes before and
after its content text (when the text is the only ``"content"`` of a chunk with one
choice, and the chunk holds no backslash), what ``strip_usage`` and ``loads`` it was
read with, and whether its null usage was cut. A later event, read with the same
two, that is those very bytes around a plain text (no quote, backslash or control
character; valid UTF-8) is that chunk with another text, so it is valid JSON read
the same way: it counts one chunk (none when the text is empty) of the text's bytes
and is cut alike, without ``loads``. A provider writes its content chunks so (the
same id, model and fields, only the text changes), and reading JSON is most of the
work here.

``chat_content(payload) -> (chunks, out_bytes)``: the content a chat chunk's JSON object
(a dict) streams: when its ``"choices"`` is a non-empty list, each of its dicts whose
``"delta"`` is a dict with a non-empty str ``"content"`` adds one to ``chunks`` and that
text's UTF-8 length (lone surrogates kept: ``surrogatepass``) to ``out_bytes``.

``null_usage_at_end(data) -> bool``: whether the JSON text ``data`` (one object, known
to parse) ends with its top-level ``"usage":null`` member and nothing could make
cutting those bytes off differ from dropping the member: the text ends with
``,"usage":null}`` (so its last member is a key spelled exactly ``usage``, outside
any string, as JSON strings cannot hold a bare quote), ``"usage"`` appears nowhere
before it (no earlier duplicate of the key), and no ``\\u`` escape of one of its
letters (``\\u0075``, ``\\u0073``, ``\\u0061``, ``\\u0067``, ``\\u0065``) could spell
one; other escapes (``\\u00e9``, as a server that writes ASCII only sends) cannot.
"""
from __future__ import annotations

from typing import Any, Callable

NULL_USAGE_END = b',"usage":null}'
_CUT = len(NULL_USAGE_END)  # cut whole; the closing brace is written again


# The \u escapes of the letters of "usage" (four hex digits, none a letter here):
# the only escapes that could spell the key.
USAGE_ESCAPES = (b"\\u0075", b"\\u0073", b"\\u0061", b"\\u0067", b"\\u0065")


def null_usage_at_end(data: bytes) -> bool:
    return (data.endswith(NULL_USAGE_END)
            and data.find(b'"usage"') == len(data) - _CUT + 1
            and (b"\\u00" not in data or not any(e in data for e in USAGE_ESCAPES)))


def utf8_length(text: str) -> int:
    """The length of `text` in UTF-8, lone surrogates as three bytes each."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


class ChatShape:
    """The layout of a stream's last content chunk (module docstring, ``shape``)."""

    __slots__ = ("prefix", "suffix", "strip", "loads", "cut")

    def __init__(self) -> None:
        self.prefix = self.suffix = b""
        self.strip = self.cut = False
        self.loads: Any = None  # None: nothing learned yet


# What a plain text holds none of: a quote, a backslash, a control character.
_NOT_PLAIN = bytes(range(0x20)) + b'"\\'


def _plain_length(text: bytes) -> int:
    """len(text) when it is a plain JSON string body (no escapes, valid UTF-8), else -1."""
    if len(text.translate(None, _NOT_PLAIN)) != len(text):
        return -1
    if not text.isascii():
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            return -1
    return len(text)


def _as_shaped(data: bytes, shape: ChatShape, strip_usage: bool, loads
               ) -> tuple[bool, int, int] | None:
    """`_object`'s answer for `data` when it is `shape`'s chunk with another text."""
    if shape.loads is not loads or shape.strip != strip_usage:
        return None
    head, tail = len(shape.prefix), len(shape.suffix)
    if (len(data) < head + tail or not data.startswith(shape.prefix)
            or not data.endswith(shape.suffix)):
        return None
    n = _plain_length(data[head:len(data) - tail])
    if n < 0:
        return None
    return shape.cut, 1 if n else 0, n


def _learn(shape: ChatShape, data: bytes, payload: dict, cut: bool, strip_usage: bool,
           loads) -> None:
    """Keep `data`'s layout in `shape` when its text can be told from the rest."""
    choices = payload.get("choices")
    if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
        return
    delta = choices[0].get("delta")
    text = delta.get("content") if type(delta) is dict else None
    if type(text) is not str or b"\\" in data or data.count(b'"content"') != 1:
        return
    at = data.find(b'"content":"')
    if at < 0:
        return
    start = at + 11
    end = data.find(b'"', start)
    if end < 0 or data[start:end] != text.encode("utf-8", "surrogatepass"):
        return
    shape.prefix, shape.suffix = data[:start], data[end:]
    shape.strip, shape.loads, shape.cut = strip_usage, loads, cut


def chat_events(chunk: bytes, strip_usage: bool, loads: Callable[[bytes], Any],
                shape: ChatShape | None = None) -> tuple[bytes, int, int, int]:
    out: list[bytes] = []
    end = chunks = out_bytes = 0
    changed = False
    n = len(chunk)
    while end < n:
        line_end = chunk.find(b"\n", end)
        if line_end < 0 or chunk[line_end + 1:line_end + 2] != b"\n":
            break
        event = chunk[end:line_end]
        if not event.startswith(b"data: ") or b"\r" in event:
            break
        data = event[6:]
        if data != b"[DONE]":
            read = None if shape is None else _as_shaped(data, shape, strip_usage, loads)
            if read is None:
                read = _object(data, strip_usage, loads, shape)
            if read is None:
                break
            cut, ev_chunks, ev_bytes = read
            chunks += ev_chunks
            out_bytes += ev_bytes
            if cut:
                event = event[:-_CUT] + b"}"
                changed = True
        out.append(event)
        end = line_end + 2
    if not changed:
        return chunk[:end] if end < n else chunk, end, chunks, out_bytes
    out.append(b"")
    return b"\n\n".join(out), end, chunks, out_bytes


def _object(data: bytes, strip_usage: bool, loads, shape: ChatShape | None = None
            ) -> tuple[bool, int, int] | None:
    """One event's JSON text: (whether its null usage is cut, content chunks, content
    bytes), or None when it is not accepted; its layout learned into `shape`."""
    if not data.startswith(b"{"):
        return None
    try:
        payload = loads(data)
    except ValueError:
        return None
    if type(payload) is not dict:
        return None
    usage = payload.get("usage")
    if usage:
        return None
    chunks, out_bytes = chat_content(payload)
    cut = False
    if strip_usage and "usage" in payload:
        if (not payload.get("choices") or usage is not None
                or not null_usage_at_end(data)):
            return None
        cut = True
    if shape is not None:
        _learn(shape, data, payload, cut, strip_usage, loads)
    return cut, chunks, out_bytes


def chat_content(payload: dict) -> tuple[int, int]:
    chunks = out_bytes = 0
    choices = payload.get("choices")
    if choices and type(choices) is list:
        for ch in choices:
            delta = ch.get("delta") if type(ch) is dict else None
            text = delta.get("content") if type(delta) is dict else None
            if text and type(text) is str:
                chunks += 1
                out_bytes += utf8_length(text)
    return chunks, out_bytes


__all__ = ["ChatShape", "chat_events", "chat_content", "null_usage_at_end", "utf8_length",
           "NULL_USAGE_END"]
