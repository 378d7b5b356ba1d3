"""Every error the proxy answers is OpenAI-style JSON with the status an OpenAI client
expects, and the log never holds a key, a header value or a traceback for bad input:
malformed JSON and lone surrogates (400), headers aiohttp refuses (400/431), a body
over 32 MiB (413), an unknown model (404), a budget denial naming its budget (402)."""
from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import openai
import pytest

MESSAGES = [{"role": "user", "content": "hello"}]
CHAT = "/v1/chat/completions"


async def raw_http(port: int, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send bytes as they are; -> (status, JSON body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    _headers, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


def assert_openai_error(body: dict, code: str) -> None:
    err = body["error"]
    assert set(err) >= {"message", "type", "code", "param"} and err["code"] == code


def no_secret_in(caplog, *secrets: str) -> None:
    text = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    for s in secrets:
        assert s not in text
    assert "Traceback" not in text and not any(r.exc_info for r in caplog.records
                                               if r.levelno < logging.ERROR)


async def post_chat(rig, body: bytes) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(rig.base_url + "/chat/completions", data=body, headers={
                "Authorization": f"Bearer {rig.meter_key}", "x-p402-customer": "acme",
                "Content-Type": "application/json"}) as r:
            return r.status, await r.json()


async def test_a_lone_surrogate_escape_is_400_json(rig, caplog):
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    status, answer = await post_chat(rig, body)
    assert status == 400
    assert_openai_error(answer, "invalid_json")
    assert rig.upstream.requests == []
    no_secret_in(caplog, rig.meter_key)


async def test_a_key_followed_by_a_control_character_is_refused_and_never_logged(
        rig, caplog):
    caplog.set_level(logging.DEBUG)
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {rig.meter_key}"
            "\x01\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n").encode()
    status, body = await raw_http(rig.proxy_port, head, b"{}")
    assert status == 400
    assert_openai_error(body, "invalid_header")
    assert rig.meter_key not in json.dumps(body)
    no_secret_in(caplog, rig.meter_key)


@pytest.mark.parametrize("case", ["long_header", "many_headers"])
async def test_headers_aiohttp_refuses_are_431_json(rig, caplog, case):
    if case == "long_header":
        extra = f"x-p402-feature: {'f' * 20000}\r\n"
    else:
        extra = "".join(f"x-h{i}: v\r\n" for i in range(300))
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {rig.meter_key}\r\n"
            f"{extra}Content-Length: 2\r\n\r\n").encode()
    status, body = await raw_http(rig.proxy_port, head, b"{}")
    assert status == 431
    assert_openai_error(body, "header_too_large" if case == "long_header"
                        else "too_many_headers")
    no_secret_in(caplog, rig.meter_key, "f" * 100)


async def test_a_body_over_32_mib_is_413_json(rig):
    big = b'{"model": "gpt-4o-mini", "pad": "' + b"x" * (33 * 1024 * 1024) + b'"}'
    status, answer = await post_chat(rig, big)
    assert status == 413
    assert_openai_error(answer, "request_too_large")
    assert rig.upstream.requests == []


async def test_an_unknown_model_is_404_like_openai(rig):
    with pytest.raises(openai.NotFoundError) as info:
        await rig.openai(x_p402_customer="acme").chat.completions.create(
            model="no-such-model-anywhere", messages=MESSAGES)
    body = info.value.response.json()
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert rig.upstream.requests == []


async def test_a_budget_denial_names_the_budget(rig):
    await rig.admin.put_budget("acme-tiny", limit_nanos=1_000, period="TOTAL",
                               enforcement="HARD", scope={"customer": "acme"})
    await rig.admin.put_budget("tenant-roomy", limit_nanos=10**12, period="TOTAL",
                               enforcement="HARD")
    with pytest.raises(openai.APIStatusError) as info:
        await rig.openai(x_p402_customer="acme").chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 402
    body = info.value.response.json()
    assert body["p402"]["budget_id"] == "acme-tiny"
    assert "acme-tiny" in body["error"]["message"]


@pytest.mark.parametrize("bad", ["a\x00b", "a\nb", "é" * 300])
async def test_a_bad_model_name_is_400_and_leaves_no_event(rig, bad):
    status, body = await post_chat(rig, json.dumps({"model": bad,
                                                     "messages": MESSAGES}).encode())
    assert status == 400 and body["error"]["param"] == "model"
    await asyncio.sleep(0.3)  # a denied event would be written behind
    assert not (await rig.admin.query(page_size=10)).items


async def test_deeply_nested_bodies_get_an_answer_below_500(rig, caplog):
    def chat(extra: str, depth: int) -> bytes:
        nested = "[" * depth + "]" * depth
        return ('{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": '
                + (nested if extra == "content" else '"hi"') + "}]"
                + (f', "metadata_x": {nested}' if extra == "field" else "")
                + (', "stream": true' if extra == "field" else "") + "}").encode()

    # Content parts nested 600 deep: read without recursion, metered, forwarded.
    status, _answer = await post_chat(rig, chat("content", 600))
    assert status == 200
    # 1,010 levels: read, but a body that must change (a stream gets include_usage)
    # cannot be written again: a clear 400, never a 500.
    status, answer = await post_chat(rig, chat("field", 1010))
    assert status == 400 and "nested too deeply" in answer["error"]["message"]
    assert_openai_error(answer, "invalid_json")
    # Beyond what any reader takes: the same 400.
    status, answer = await post_chat(rig, chat("content", 5000))
    assert status == 400
    assert_openai_error(answer, "invalid_json")
    no_secret_in(caplog, rig.meter_key)
