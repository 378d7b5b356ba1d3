"""The OpenAI-compatible proxy, driven by the real `openai` package, against the
stand-in upstream: what reaches the upstream, what the caller gets, what the ledger
keeps."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

import p402core
from tests.proxy.conftest import UPSTREAM_KEY, start_rig
from tests.support.openai_standin import usage_for

CATALOG = p402core.Catalog.default()
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Summarize the quarterly report in one line, please."}]
CHAT = "/v1/chat/completions"


def cost(model: str, u) -> int:
    return CATALOG.cost_nanos(model, input_tokens=u.input_tokens,
                              output_tokens=u.output_tokens,
                              cached_input_tokens=u.cached_tokens,
                              reasoning_tokens=u.reasoning_tokens)


def assert_usage(ev, u) -> None:
    assert (ev.usage.input_tokens, ev.usage.output_tokens, ev.usage.cached_input_tokens,
            ev.usage.reasoning_tokens) == (u.input_tokens, u.output_tokens,
                                           u.cached_tokens, u.reasoning_tokens)


async def test_chat_non_streaming_is_metered_with_the_upstream_key(rig):
    rig.upstream.cached_tokens = 3
    client = rig.openai(x_p402_customer="acme", x_p402_feature="support",
                        x_p402_label_env="prod")
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=12)
    resp = raw.parse()
    assert resp.choices[0].message.content == " ".join(f"tok{i}" for i in range(12))

    got = rig.upstream.last(CHAT)
    # The upstream sees the proxy's key, never the caller's P402 key or owner headers.
    assert got.api_key == UPSTREAM_KEY
    assert rig.meter_key not in json.dumps(got.headers)
    assert not any(h.startswith("x-p402-") for h in got.headers)
    assert got.body["max_tokens"] == 12  # within the granted cap: unchanged

    u = rig.upstream.usage(CHAT, got.body)
    [ev] = await rig.events()
    assert ev.kind == "record" and ev.outcome.value == "SUCCESS"
    assert_usage(ev, u)
    assert ev.usage.cached_input_tokens == 3
    assert ev.cost_nanos == cost("gpt-4o-mini", u) > 0
    assert ev.evidence.value == "REPORTED"  # the upstream's usage
    assert (ev.owners.customer, ev.owners.feature, ev.labels) == ("acme", "support",
                                                                   {"env": "prod"})
    assert ev.model == "gpt-4o-mini" and ev.provider == "openai"
    # The Record names the call as Authorize did (for a hold lost with a server's
    # crash): the same owners and labels, so not "owners differ".
    assert not ev.reasons
    # The caller learns where its call went in the ledger.
    # The proxy names the event before it is committed (the Record leaves the
    # response path), so the id is known; the cost is read from the ledger.
    assert raw.headers["x-p402-event-id"] == ev.event_id
    assert "x-p402-cost-nanos" not in raw.headers
    assert raw.headers["x-p402-reservation-id"] == ev.reservation_id


async def test_chat_streaming_with_usage_records_the_final_chunk(rig):
    client = rig.openai(x_p402_customer="acme")
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(f"tok{i}" for i in range(20))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20

    got = rig.upstream.last(CHAT)
    u = rig.upstream.usage(CHAT, got.body)
    [ev] = await rig.events()
    assert ev.outcome.value == "SUCCESS"
    assert_usage(ev, u)
    assert ev.cost_nanos == cost("gpt-4o-mini", u)


async def test_chat_streaming_without_usage_asks_upstream_and_strips_it(rig):
    client = rig.openai(x_p402_customer="acme")
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                  stream=True, max_tokens=7)
    chunks = [c async for c in stream]
    # The caller gets exactly what it asked for: no usage chunk, no usage key.
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).count("tok") == 7

    got = rig.upstream.last(CHAT)
    assert got.body["stream_options"] == {"include_usage": True}
    [ev] = await rig.events()
    assert_usage(ev, rig.upstream.usage(CHAT, got.body))
    assert ev.usage.output_tokens == 7


async def test_raw_stream_without_usage_has_no_usage_field_at_all(rig):
    # The openai package hides a null usage; check the bytes the caller receives.
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True, "max_tokens": 3}
    async with aiohttp.ClientSession() as s:
        async with s.post(rig.base_url + "/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {rig.meter_key}",
                                   "x-p402-customer": "acme"}) as r:
            assert r.status == 200
            raw = (await r.read()).decode()
    frames = [f[len("data: "):] for f in raw.split("\n\n") if f.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    payloads = [json.loads(f) for f in frames[:-1]]
    assert payloads and all("usage" not in p for p in payloads)
    await rig.events()


async def test_responses_api_non_streaming_and_streaming(rig):
    client = rig.openai(x_p402_customer="globex", x_p402_workflow="triage")
    r = await client.responses.create(model="gpt-4o-mini", input="Classify this ticket.",
                                      instructions="One word.", max_output_tokens=9)
    assert r.output_text.count("tok") == 9
    first = rig.upstream.last("/v1/responses")
    assert first.body["max_output_tokens"] == 9

    events = [e async for e in await client.responses.create(
        model="gpt-4o-mini", input="And this one?", stream=True)]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    second = rig.upstream.last("/v1/responses")
    # No cap asked and no HARD budget: forwarded uncapped, metered at what it used.
    assert "max_output_tokens" not in second.body

    evs = await rig.events(2)
    assert [e.owners.workflow for e in evs] == ["triage", "triage"]
    for ev, got in zip(evs, (first, second)):
        u = rig.upstream.usage("/v1/responses", got.body)
        assert_usage(ev, u)
        assert ev.cost_nanos == cost("gpt-4o-mini", u)


async def test_embeddings(rig):
    client = rig.openai(x_p402_customer="acme", x_p402_feature="search")
    e = await client.embeddings.create(model="text-embedding-3-small",
                                       input=["first document", "second, longer document"])
    assert len(e.data) == 2 and len(e.data[0].embedding) == 8
    got = rig.upstream.last("/v1/embeddings")
    u = rig.upstream.usage("/v1/embeddings", got.body)
    [ev] = await rig.events()
    assert (ev.usage.input_tokens, ev.usage.output_tokens) == (u.input_tokens, 0)
    assert ev.cost_nanos == cost("text-embedding-3-small", u)
    assert "max_tokens" not in got.body and "max_completion_tokens" not in got.body


async def test_budget_denial_is_402_with_an_openai_style_body(rig):
    await rig.admin.put_budget("acme-tiny", limit_nanos=1_000, period="TOTAL",
                               enforcement="HARD", scope={"customer": "acme"})
    client = rig.openai(x_p402_customer="acme")
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    err = info.value
    assert err.status_code == 402
    body = err.response.json()
    assert body["error"] == {"message": body["error"]["message"],
                             "type": "insufficient_quota", "code": "budget.exceeded",
                             "param": None}
    assert "budget.exceeded" in body["p402"]["reasons"]
    assert rig.upstream.requests == []  # never forwarded
    [ev] = await rig.events()
    assert ev.kind == "denied" and ev.outcome.value == "DENIED" and ev.cost_nanos == 0
    assert ev.owners.customer == "acme"
    # Another customer is not affected by acme's budget.
    ok = await rig.openai(x_p402_customer="globex").chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES)
    assert ok.choices[0].message.content


async def test_rate_limit_is_429_with_retry_after(rig):
    await rig.admin.put_policy_rule("one-a-minute", "RATE_LIMIT", rate_limit=1,
                                    rate_unit="REQUESTS", window_seconds=60,
                                    per="customer")
    client = rig.openai(x_p402_customer="acme")
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    err = info.value
    assert err.status_code == 429
    retry_after = int(err.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert err.response.json()["error"]["code"] == "policy.rate_limited"
    assert len(rig.upstream.requests) == 1


async def test_policy_denial_is_403(rig):
    await rig.admin.put_policy_rule("only-mini", "ALLOW_MODELS", allow_models=["*-mini"])
    client = rig.openai(x_p402_customer="acme")
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.response.json()["error"]["code"] == "policy.model_not_allowed"
    assert rig.upstream.requests == []


async def test_output_cap_from_policy_is_written_into_the_forwarded_request(rig):
    await rig.admin.put_policy_rule("short", "MAX_OUTPUT_TOKENS", max_output_tokens=5)
    client = rig.openai(x_p402_customer="acme")
    r = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                             max_completion_tokens=100)
    got = rig.upstream.last(CHAT)
    assert got.body["max_completion_tokens"] == 5 and "max_tokens" not in got.body
    assert r.usage.completion_tokens == 5
    [ev] = await rig.events()
    assert ev.usage.output_tokens == 5


async def test_upstream_500_passes_through_and_records_provider_error(rig):
    rig.upstream.fail_next(500, message="the stand-in broke")
    client = rig.openai(x_p402_customer="acme")
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 500
    assert info.value.response.json()["error"]["message"] == "the stand-in broke"
    [ev] = await rig.events()
    assert ev.outcome.value == "PROVIDER_ERROR" and ev.cost_nanos == 0
    assert ev.usage.output_tokens == 0
    assert ev.evidence.value == "ESTIMATED"  # no usage was reported


async def test_upstream_429_passes_through_with_its_retry_after(rig):
    rig.upstream.fail_next(429, retry_after=7)
    client = rig.openai(x_p402_customer="acme")
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.response.headers["retry-after"] == "7"
    [ev] = await rig.events()
    assert ev.outcome.value == "PROVIDER_ERROR"


async def _answered_504_and_recorded_timeout(rig, client) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.status_code == 504
    assert info.value.response.json()["error"]["code"] == "upstream_timeout"
    [ev] = await rig.events()
    assert ev.outcome.value == "TIMEOUT"


async def test_upstream_timeout_is_504_and_recorded(tmp_path):
    rig, stop = await start_rig(tmp_path, upstream_timeout=0.3)
    try:
        rig.upstream.hang_next(5.0)
        await _answered_504_and_recorded_timeout(rig, rig.openai(x_p402_customer="acme"))
    finally:
        await stop()


async def test_client_disconnect_mid_stream_records_what_was_streamed(tmp_path):
    rig, stop = await start_rig(tmp_path, output_tokens=200, chunk_delay=0.01)
    try:
        body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}
        received = 0
        async with aiohttp.ClientSession() as s:
            async with s.post(rig.base_url + "/chat/completions", json=body,
                              headers={"Authorization": f"Bearer {rig.meter_key}",
                                       "x-p402-customer": "acme"}) as r:
                async for line in r.content:
                    if line.startswith(b"data: ") and b'"content":"tok' in line.replace(
                            b" ", b""):
                        received += 1
                    if received >= 5:
                        break  # leaving the block closes the connection mid-stream
        [ev] = await rig.events(timeout=10.0)
        assert ev.outcome.value == "CANCELLED"
        # At least what the caller received, never the whole answer.
        assert 5 <= ev.usage.output_tokens < 200
        u = usage_for(CHAT, body, output_tokens=200)
        assert ev.usage.input_tokens >= u.input_tokens  # the (conservative) estimate
    finally:
        await stop()


async def test_upstream_cut_mid_stream_records_provider_error(rig):
    rig.upstream.cut_stream_after(4)
    client = rig.openai(x_p402_customer="acme")
    got = []
    with pytest.raises(openai.APIError) as info:
        async for c in await client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, stream=True):
            got.append(c)
    assert info.value.body["code"] == "upstream_stream_broken"
    content = [c for c in got if c.choices and c.choices[0].delta.content]
    assert len(content) == 4
    [ev] = await rig.events()
    assert ev.outcome.value == "PROVIDER_ERROR"
    # What reached the caller is charged: one token per content chunk, at least
    # ceil(bytes / 4) (the proxy's documented rule, never below what was received).
    text = "".join(c.choices[0].delta.content for c in content)
    assert ev.usage.output_tokens == max(4, -(-len(text.encode()) // 4))
    assert ev.evidence.value == "ESTIMATED"  # counted by the proxy, not reported


async def test_models_pass_through_for_a_valid_key_only(rig):
    models = [m.id async for m in rig.openai().models.list()]
    assert models == list(rig.upstream.models)
    assert rig.upstream.last("/v1/models").api_key == UPSTREAM_KEY

    bad = openai.AsyncOpenAI(base_url=rig.base_url, api_key="p402_" + "x" * 40,
                             max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.models.list()


async def test_a_non_p402_key_is_refused_before_anything_happens(rig):
    client = openai.AsyncOpenAI(base_url=rig.base_url, api_key="sk-someone-elses",
                                max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert info.value.response.json()["error"]["code"] == "invalid_api_key"
    assert rig.upstream.requests == []


async def test_a_revoked_or_unknown_p402_key_is_401(rig):
    client = openai.AsyncOpenAI(base_url=rig.base_url, api_key="p402_" + "y" * 40,
                                max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert rig.upstream.requests == []


async def test_bad_owner_header_is_400_naming_the_field(rig):
    client = rig.openai(x_p402_customer="x" * 5000)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert "customer" in (info.value.response.json()["error"]["param"] or "")


async def test_retries_are_attributed_from_headers(rig):
    client = rig.openai(x_p402_customer="acme", x_p402_attempt="2",
                        x_p402_retry_of="evt-first")
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    [ev] = await rig.events()
    assert (ev.attempt, ev.retry_of) == (2, "evt-first")


async def test_unknown_path_is_404_and_not_forwarded(rig):
    async with aiohttp.ClientSession() as s:
        async with s.post(rig.base_url + "/fine_tuning/jobs", json={},
                          headers={"Authorization": f"Bearer {rig.meter_key}"}) as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "unknown_url"
    assert rig.upstream.requests == []


async def test_spend_by_customer_from_proxied_calls(rig):
    for customer, n in (("acme", 2), ("globex", 1)):
        client = rig.openai(x_p402_customer=customer)
        for _ in range(n):
            await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    await rig.events(3)
    rows = {r.group["customer"]: r for r in
            (await rig.admin.query(group_by=["customer"], page_size=10)).items}
    assert rows["acme"].event_count == 2 and rows["globex"].event_count == 1
    assert rows["acme"].cost_nanos == 2 * rows["globex"].cost_nanos > 0
    await asyncio.sleep(0)


async def test_embedded_mode_serves_with_its_own_p402_server(tmp_path):
    """`p402 proxy --db URL`: a P402 server inside the proxy process, same behaviour."""
    from p402_server.gateways.proxy import ProxyConfig, serve_proxy
    from p402_server.server import init_tenant
    from p402_server.ledger import open_store
    from tests.support.openai_standin import OpenAIStandin

    url = f"sqlite+aiosqlite:///{tmp_path}/embedded.db"
    store = await open_store(url)
    tenant, key = await init_tenant(store, "embedded")  # as `p402 init` would
    await store.close()
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()
    async with OpenAIStandin(api_key=UPSTREAM_KEY) as up:
        task = asyncio.ensure_future(serve_proxy(
            ProxyConfig(upstream=up.base_url, upstream_key=UPSTREAM_KEY), "127.0.0.1:0",
            db=url, ready=ready.set_result, stop_event=stop))
        port = await asyncio.wait_for(ready, 30)
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key,
                                    max_retries=0,
                                    default_headers={"x-p402-customer": "acme"})
        r = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert r.usage.completion_tokens == 20
        stop.set()
        await asyncio.wait_for(task, 30)
        u = up.usage(CHAT, up.last(CHAT).body)
    store = await open_store(url)
    try:
        from p402_server.ledger.model import EventFilter

        events, _ = await store.query_events(tenant, EventFilter(), page_size=10)
    finally:
        await store.close()
    [ev] = events
    assert (ev.customer, ev.input_tokens, ev.output_tokens) == ("acme", u.input_tokens,
                                                                 u.output_tokens)


async def test_a_body_within_its_grant_is_forwarded_byte_for_byte(rig):
    """Nothing to change (the cap is within the grant, or no cap and no HARD
    budget): the caller's bytes go upstream as they came, key order and spacing
    included; a body that needs the grant's cap is rewritten."""
    sent = (b'{ "messages": [{"role": "user", "content": "caf\\u00e9 \\ud83d\\ude00"}],'
            b'  "max_tokens": 12, "model": "gpt-4o-mini", "temperature": 0.70 }')
    headers = {"Authorization": f"Bearer {rig.meter_key}", "x-p402-customer": "acme",
               "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as s:
        async with s.post(rig.base_url + "/chat/completions", data=sent,
                          headers=headers) as r:
            assert r.status == 200
        assert rig.upstream.last(CHAT).raw == sent
        uncapped = sent.replace(b'  "max_tokens": 12,', b"")
        async with s.post(rig.base_url + "/chat/completions", data=uncapped,
                          headers=headers) as r:
            assert r.status == 200
        assert rig.upstream.last(CHAT).raw == uncapped
        await rig.admin.put_budget("acme-hard", limit_nanos=10**12, period="TOTAL",
                                   enforcement="HARD", scope={"customer": "acme"})
        async with s.post(rig.base_url + "/chat/completions", data=uncapped,
                          headers=headers) as r:
            assert r.status == 200
    got = rig.upstream.last(CHAT)
    assert got.raw != uncapped and got.body["max_tokens"] > 0
    assert got.body["messages"][0]["content"] == "café 😀"


@pytest.mark.parametrize("stream", [False, True])
async def test_every_usage_detail_and_the_service_tier_are_metered(rig, stream):
    """Audio tokens inside the totals and the tier the answer names reach the
    ledger, priced at the model's audio and tier rates (streaming included)."""
    rig.upstream.audio_input_tokens, rig.upstream.audio_output_tokens = 5, 4
    rig.upstream.cached_tokens = 2
    rig.upstream.service_tier = "flex" if stream else "default"
    client = rig.openai(x_p402_customer="acme")
    r = await client.chat.completions.create(model="gpt-audio", messages=MESSAGES,
                                             stream=stream)
    if stream:
        [x async for x in r]
    u = rig.upstream.usage(CHAT, rig.upstream.last(CHAT).body)
    [ev] = await rig.events()
    assert (ev.usage.units["audio_input_tokens"], ev.usage.units["audio_output_tokens"]) \
        == (5, 4)
    tier = "flex" if stream else ""
    assert ev.usage.service_tier == tier
    assert ev.cost_nanos == CATALOG.cost_nanos(
        "gpt-audio", input_tokens=u.input_tokens, output_tokens=u.output_tokens,
        cached_input_tokens=2, audio_input_tokens=5, audio_output_tokens=4,
        service_tier=tier)
    assert ev.cost_nanos > cost("gpt-audio", u)  # audio tokens cost more than text



@pytest.mark.parametrize("line_end,piece", [("\r\n", 7), ("\r", 5), ("\n", 3)])
async def test_streams_cut_anywhere_with_any_line_end_are_relayed_and_metered(
        rig, line_end, piece):
    # The upstream writes its SSE in pieces cut anywhere (mid-event, between "\r" and
    # "\n", inside a UTF-8 character), with another valid line end (a byte at a time
    # is SseEvents' own test, test_sse_relay.py).
    rig.upstream.sse_line_end, rig.upstream.sse_piece = line_end, piece
    rig.upstream.chunk_delay = 0.0005  # pieces reach the proxy in separate reads
    client = rig.openai(x_p402_customer="acme")
    chunks = [c async for c in await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, max_tokens=6)]
    assert chunks and all(c.choices and c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks).count("tok") == 6
    chat = rig.upstream.last(CHAT)
    events = [e async for e in await client.responses.create(
        model="gpt-4o-mini", input="Classify this ticket.", stream=True,
        max_output_tokens=5)]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    responses = rig.upstream.last("/v1/responses")
    chat_ev, resp_ev = await rig.events(2)
    assert_usage(chat_ev, rig.upstream.usage(CHAT, chat.body))
    assert_usage(resp_ev, rig.upstream.usage("/v1/responses", responses.body))
    assert chat_ev.evidence.value == resp_ev.evidence.value == "REPORTED"


async def _post_raw(rig, raw: bytes) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.post(rig.base_url + "/chat/completions", data=raw,
                          headers={"Authorization": f"Bearer {rig.meter_key}",
                                   "Content-Type": "application/json",
                                   "x-p402-customer": "acme"}) as r:
            return r.status, await r.read()


async def test_integers_beyond_64_bits_in_a_prompt_reach_the_upstream_exactly(rig):
    # A prompt's numbers are not read by the proxy; when the body must be written
    # again (here: usage asked for on a stream) they still go upstream as sent.
    big, small = 2**70, -(2**64) - 1
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "hi", "meta": {"n": big, "m": [small, 1.5, 2**63]}}]}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "maximum": big}}}}}]
    body = {"model": "gpt-4o-mini", "messages": messages, "tools": tools,
            "stream": True, "max_tokens": 5}
    status, _ = await _post_raw(rig, json.dumps(body).encode())
    assert status == 200
    got = json.loads(rig.upstream.last(CHAT).raw)
    assert got["stream_options"] == {"include_usage": True}
    assert got["messages"] == messages and got["tools"] == tools
    n = got["messages"][0]["content"][0]["meta"]["n"]
    assert n == big and type(n) is int
    # Nothing to change: forwarded byte for byte.
    raw = json.dumps({**body, "stream": False}).encode()
    status, _ = await _post_raw(rig, raw)
    assert status == 200 and rig.upstream.last(CHAT).raw == raw
    await rig.events(2)


async def test_a_cap_beyond_64_bits_is_refused_as_it_was_read_exactly(rig):
    # Numbers the proxy reads (outside the prompt) are read exactly: 2**70 is an
    # integer too large to reserve, not a float the cap check would refuse otherwise.
    raw = json.dumps({"model": "gpt-4o-mini", "max_tokens": 2**70,
                      "messages": [{"role": "user", "content": "hi"}]}).encode()
    status, answer = await _post_raw(rig, raw)
    err = json.loads(answer)["error"]
    assert status == 400 and "max_output_tokens" in err["message"], err
    assert not [r for r in rig.upstream.requests if r.path == CHAT]


async def test_an_upstream_that_never_accepts_is_a_504_after_the_connect_timeout(tmp_path):
    """The connect bound applies to every upstream call (a per-request timeout used to
    replace the session's and drop it: the call waited for the whole-answer bound)."""
    import socket

    from p402_server.gateways.proxy import ProxyConfig, start_proxy

    rig, stop = await start_rig(tmp_path)
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)  # one connection fills the accept queue; later SYNs are dropped
    filler = socket.create_connection(hole.getsockname())
    config = ProxyConfig(upstream=f"http://127.0.0.1:{hole.getsockname()[1]}/v1",
                         upstream_key=UPSTREAM_KEY, upstream_timeout=60.0,
                         connect_timeout=0.3)
    runner, port = await start_proxy(config, rig.p402_target, "127.0.0.1:0")
    try:
        client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1",
                                    api_key=rig.meter_key, max_retries=0, timeout=20.0,
                                    default_headers={"x-p402-customer": "acme"})
        await _answered_504_and_recorded_timeout(rig, client)
    finally:
        await runner.cleanup()
        filler.close()
        hole.close()
        await stop()


async def test_a_usage_the_ledger_cannot_take_is_logged_and_left_to_the_hold(
        rig, monkeypatch, caplog):
    # The Record is checked when its batch is built, off the response path: the
    # answer goes out as the upstream gave it, the refusal is logged naming the
    # field, nothing of it is committed (its hold expires at its estimate), and
    # the next call is recorded as usual.
    from p402_server.gateways import proxy

    real = proxy.answer_usage
    monkeypatch.setattr(proxy, "answer_usage",
                        lambda kind, raw: {"input_tokens": 2**70, "output_tokens": 1})
    client = rig.openai(x_p402_customer="acme")
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    assert raw.http_response.status_code == 200
    refused = raw.headers["x-p402-event-id"]
    for _ in range(250):
        if any(refused in r.getMessage() for r in caplog.records):
            break
        await asyncio.sleep(0.02)
    [line] = [r.getMessage() for r in caplog.records if refused in r.getMessage()]
    assert "refused" in line and "usage.input_tokens" in line

    monkeypatch.setattr(proxy, "answer_usage", real)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MESSAGES, max_tokens=5)
    [ev] = await rig.events()
    assert ev.event_id == raw.headers["x-p402-event-id"] != refused
    assert ev.usage.input_tokens == rig.upstream.usage(CHAT, rig.upstream.last(CHAT).body
                                                       ).input_tokens
