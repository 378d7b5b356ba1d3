"""`wrap_openai` with the real `openai` package against a real P402 server and an
OpenAI stand-in on 127.0.0.1 (tests/support/openai_standin.py): chat and responses,
sync and async, streaming with the usage chunk, the output cap written back,
denials before any upstream call, and retries attributed attempt by attempt."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

openai = pytest.importorskip("openai")

import p402_client as pc  # noqa: E402
from p402_client.openai import (  # noqa: E402
    measure_input_bytes,
    usage_from_openai,
    wrap_openai,
)
from tests.support.openai_standin import OpenAIStandin, prompt_bytes  # noqa: E402

MODEL = "gpt-4o-mini"
UPSTREAM_KEY = "sk-upstream-test"
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Summarise the quarterly report in one line, please."}]


@pytest.fixture(scope="module")
def upstream():
    with OpenAIStandin.in_thread(api_key=UPSTREAM_KEY) as up:
        yield up


@pytest.fixture
def up(upstream):
    upstream.reset()
    # Settings go to the stand-in itself (the threaded wrapper only forwards reads).
    upstream.standin.output_tokens = 20
    upstream.standin.cached_tokens = upstream.standin.reasoning_tokens = 0
    return upstream


def make_client(up, **kw):
    kw.setdefault("max_retries", 2)
    return openai.OpenAI(base_url=up.base_url, api_key=UPSTREAM_KEY, **kw)


def events(p402, **filters) -> list[pc.Event]:
    return sorted(p402.iter_query(page_size=1000, **filters), key=lambda e: e.sequence)


# ---------------------------------------------------------------- pure helpers


def test_input_bytes_are_the_prompt_text_bytes():
    body = {"model": MODEL, "messages": MESSAGES}
    assert measure_input_bytes("chat", body) == prompt_bytes("/v1/chat/completions", body)
    parts = [{"role": "user", "content": [
        {"type": "text", "text": "héllo"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 999}}]}]
    assert measure_input_bytes("chat", {"messages": parts}) == len("héllo".encode())
    rbody = {"model": MODEL, "instructions": "Be brief.", "input": "What is P402?"}
    assert measure_input_bytes("responses", rbody) == prompt_bytes("/v1/responses", rbody)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert measure_input_bytes("chat", {"messages": MESSAGES, "tools": tools}) > \
        measure_input_bytes("chat", {"messages": MESSAGES})


def test_usage_from_both_openai_shapes():
    chat = {"prompt_tokens": 30, "completion_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 10},
            "completion_tokens_details": {"reasoning_tokens": 3}}
    assert usage_from_openai(chat) == {"input_tokens": 30, "output_tokens": 7,
                                       "cached_input_tokens": 10, "reasoning_tokens": 3}
    resp = {"input_tokens": 5, "output_tokens": 2, "input_tokens_details": None}
    assert usage_from_openai(resp) == {"input_tokens": 5, "output_tokens": 2}
    assert usage_from_openai(None) is None and usage_from_openai({}) is None
    # The answer's service tier: a tier P402 prices, or not read (whatever its type).
    assert usage_from_openai(resp, "flex")["service_tier"] == "flex"
    for odd in ([], {}, {"flex": 1}, ["flex"], 3, None, "default", "FLEX"):
        assert usage_from_openai(resp, odd) == {"input_tokens": 5, "output_tokens": 2}


_COUNT = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**64), st.text(max_size=3))
_DETAILS = st.one_of(st.none(), st.dictionaries(
    st.sampled_from(["cached_tokens", "cache_write_tokens", "audio_tokens",
                     "image_tokens", "reasoning_tokens", "other"]), _COUNT, max_size=4))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(
    ["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
     "total_tokens"]), _COUNT, max_size=4), _DETAILS, _DETAILS,
    st.sampled_from([None, "flex", "default", "priority"]))
def test_usage_reads_alike_from_dicts_mappings_and_objects(usage, ins, outs, tier):
    # A parsed answer (plain dicts) takes a short path; any other mapping, or the
    # SDK's objects, must read the same.
    import types

    usage = dict(usage)
    for key, details in (("prompt_tokens_details", ins), ("completion_tokens_details", outs),
                         ("input_tokens_details", ins), ("output_tokens_details", outs)):
        if details is not None:
            usage[key] = details
    as_mapping = types.MappingProxyType(
        {k: types.MappingProxyType(v) if isinstance(v, dict) else v for k, v in usage.items()})
    as_object = types.SimpleNamespace(
        **{k: types.SimpleNamespace(**v) if isinstance(v, dict) else v
           for k, v in usage.items()})
    expected = usage_from_openai(as_mapping, tier)
    assert usage_from_openai(usage, tier) == expected
    assert usage_from_openai(as_object, tier) == expected


# ---------------------------------------------------------------- chat


def test_chat_is_authorized_capped_and_recorded_with_the_reported_usage(p402, up):
    p402.put_budget("acme", limit_nanos=10**9, scope={"customer": "acme"})
    client = wrap_openai(make_client(up), p402, owners={"feature": "support"},
                         labels={"env": "test"})
    reply = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12,
        p402={"owners": {"customer": "acme"}, "labels": {"ticket": "T-1"},
              "revenue_nanos": 5_000_000})
    assert reply.choices[0].message.content.startswith("tok0")
    sent = up.last("/chat/completions").body
    assert "p402" not in sent and sent["max_tokens"] == 12  # the caller's parameter
    expected = up.usage("/v1/chat/completions", sent)
    (ev,) = events(p402)
    assert ev.outcome is pc.Outcome.SUCCESS and ev.provider == "openai"
    assert ev.usage == pc.Usage(input_tokens=expected.input_tokens,
                                output_tokens=expected.output_tokens)
    assert reply.usage.prompt_tokens == expected.input_tokens
    assert ev.owners == pc.Owners(customer="acme", feature="support")
    assert ev.labels == {"env": "test", "ticket": "T-1"}
    assert ev.revenue_nanos == 5_000_000
    assert ev.attempt == 0 and ev.retry_of == ""
    assert p402.list_budgets().items[0].status.held_nanos == 0


def test_the_policy_cap_is_written_into_the_request(p402, up):
    p402.put_policy_rule("cap", "MAX_OUTPUT_TOKENS", max_output_tokens=5)
    client = wrap_openai(make_client(up), p402, owners={"customer": "acme"})
    client.chat.completions.create(model=MODEL, messages=MESSAGES)
    # No cap asked: the allowed one goes in max_completion_tokens.
    assert up.last("/chat/completions").body["max_completion_tokens"] == 5
    client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                   max_completion_tokens=500)
    assert up.last("/chat/completions").body["max_completion_tokens"] == 5
    assert [e.usage.output_tokens for e in events(p402)] == [5, 5]


def test_cached_and_reasoning_tokens_are_recorded(p402, up):
    up.standin.cached_tokens, up.standin.reasoning_tokens = 4, 2
    client = wrap_openai(make_client(up), p402, owners={"customer": "acme"})
    client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10)
    (ev,) = events(p402)
    assert ev.usage.cached_input_tokens == 4 and ev.usage.reasoning_tokens == 2


def test_chat_stream_asks_for_usage_and_records_it_at_the_end(p402, up):
    client = wrap_openai(make_client(up), p402, owners={"customer": "acme"})
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                            max_tokens=8,
                                            stream_options={"include_obfuscation": False})
    assert events(p402) == []  # nothing recorded before the stream ends
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "".join(["tok0"] + [f" tok{i}" for i in range(1, 8)])
    sent = up.last("/chat/completions").body
    assert sent["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    expected = up.usage("/v1/chat/completions", sent)
    (ev,) = events(p402)
    assert ev.outcome is pc.Outcome.SUCCESS
    assert ev.usage == pc.Usage(input_tokens=expected.input_tokens, output_tokens=8)
    assert ev.cost_nanos > 0
    assert ev.evidence is pc.Evidence.REPORTED  # the usage chunk: a provider report


def test_breaking_out_of_a_stream_records_cancelled_with_what_was_seen(p402, up):
    client = wrap_openai(make_client(up), p402, owners={"customer": "acme"})
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                            max_tokens=20)
    seen = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            seen += 1
            if seen == 3:
                break
    (ev,) = events(p402)
    assert ev.outcome is pc.Outcome.CANCELLED
    auth_input = stream.meter.authorization.estimated_input_tokens
    assert ev.usage == pc.Usage(input_tokens=auth_input, output_tokens=3)
    # No usage chunk arrived: the estimate's input and the deltas seen are an estimate.
    assert ev.evidence is pc.Evidence.ESTIMATED


def test_stream_closed_with_a_context_manager_settles(p402, up):
    client = wrap_openai(make_client(up), p402, owners={"customer": "acme"})
    with client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True) as s:
        next(s)  # the role chunk only
    (ev,) = events(p402)
    assert ev.outcome is pc.Outcome.CANCELLED and ev.usage.output_tokens == 0


# ---------------------------------------------------------------- responses


def test_responses_create_and_stream(p402, up):
    client = wrap_openai(make_client(up), p402, owners={"customer": "acme"})
    resp = client.responses.create(model=MODEL, instructions="Be brief.",
                                   input="What does P402 do?", max_output_tokens=6)
    sent = up.last("/responses").body
    assert sent["max_output_tokens"] == 6
    expected = up.usage("/v1/responses", sent)
    assert resp.usage.output_tokens == 6
    stream = client.responses.create(model=MODEL, input="Stream it.", stream=True)
    kinds = [ev.type for ev in stream]
    assert kinds[-1] == "response.completed"
    sent2 = up.last("/responses").body
    assert sent2["max_output_tokens"] > 0  # the default cap was applied
    expected2 = up.usage("/v1/responses", sent2)
    first, second = events(p402)
    assert first.usage == pc.Usage(input_tokens=expected.input_tokens, output_tokens=6)
    assert second.usage == pc.Usage(input_tokens=expected2.input_tokens,
                                    output_tokens=expected2.output_tokens)
    assert second.outcome is pc.Outcome.SUCCESS


# ---------------------------------------------------------------- denials and retries


def test_a_denial_raises_before_any_upstream_call(p402, up):
    p402.put_budget("tiny", limit_nanos=1)
    client = wrap_openai(make_client(up), p402, owners={"customer": "acme"})
    with pytest.raises(pc.BudgetDenied) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert "budget.exceeded" in err.value.reasons
    assert up.requests == []


def test_retries_are_separate_attributed_attempts(p402, up):
    up.fail_next(500, retry_after=0.01)
    up.fail_next(429, retry_after=0.01)
    client = wrap_openai(make_client(up, max_retries=2), p402, owners={"customer": "acme"})
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert reply.usage.completion_tokens == 4
    assert len(up.requests) == 3  # the wrapper retried, not the SDK on its own
    first, second, third = events(p402)
    assert (first.attempt, second.attempt, third.attempt) == (0, 1, 2)
    assert first.outcome is second.outcome is pc.Outcome.PROVIDER_ERROR
    assert first.cost_nanos == second.cost_nanos == 0
    assert third.outcome is pc.Outcome.SUCCESS and third.usage.output_tokens == 4
    assert first.retry_of == ""
    assert second.retry_of == third.retry_of == first.reservation_id


def test_a_non_retryable_error_is_recorded_once_and_raised(p402, up):
    up.fail_next(400, message="bad request")
    client = wrap_openai(make_client(up), p402, owners={"customer": "acme"})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    (ev,) = events(p402)
    assert ev.outcome is pc.Outcome.PROVIDER_ERROR and ev.cost_nanos == 0
    assert len(up.requests) == 1


def test_retries_exhausted_raise_the_last_error(p402, up):
    up.fail_next(503, times=2, retry_after=0.01)
    client = wrap_openai(make_client(up), p402, owners={"customer": "acme"}, max_retries=1)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert [e.attempt for e in events(p402)] == [0, 1]


def test_an_upstream_timeout_is_recorded_as_timeout(p402, up):
    up.hang_next(3.0)
    client = wrap_openai(make_client(up, max_retries=0, timeout=0.3), p402,
                         owners={"customer": "acme"})
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model=MODEL, messages=MESSAGES)
    (ev,) = events(p402)
    assert ev.outcome is pc.Outcome.TIMEOUT and ev.usage.input_tokens > 0


def test_caller_attributed_retry(p402, up):
    client = wrap_openai(make_client(up), p402, owners={"customer": "acme"})
    client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                   p402={"attempt": 3, "retry_of": "orig-123"})
    (ev,) = events(p402)
    assert ev.attempt == 3 and ev.retry_of == "orig-123"
    with pytest.raises(pc.InvalidArgument) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                       p402={"customer": "x"})
    assert err.value.field == "p402.customer"


def test_everything_else_passes_through(p402, up):
    client = wrap_openai(make_client(up), p402, owners={"customer": "acme"})
    assert [m.id for m in client.models.list()][0] == MODEL
    raw = client.chat.completions.with_raw_response  # the SDK's own resource
    assert raw is not None
    assert client.unwrapped.base_url == make_client(up).base_url
    assert events(p402) == []
    with pytest.raises(pc.InvalidArgument):
        wrap_openai(make_client(up), object())


# ---------------------------------------------------------------- async


async def test_async_chat_and_stream(server, tenant):
    async with OpenAIStandin(api_key=UPSTREAM_KEY) as aup, \
            pc.AsyncP402Client(server.target, api_key=tenant[1]) as ap:
        client = wrap_openai(openai.AsyncOpenAI(base_url=aup.base_url, api_key=UPSTREAM_KEY),
                             ap, owners={"customer": "acme"})
        reply = await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                     max_tokens=3)
        assert reply.usage.completion_tokens == 3
        stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES,
                                                      stream=True, max_tokens=5)
        n = 0
        async for chunk in stream:
            n += bool(chunk.choices and chunk.choices[0].delta.content)
        assert n == 5
        rstream = await client.responses.create(model=MODEL, input="hi", stream=True,
                                                max_output_tokens=2)
        async with rstream:
            async for _ in rstream:
                pass
        evs = sorted([e async for e in ap.iter_query()], key=lambda e: e.sequence)
        assert [e.usage.output_tokens for e in evs] == [3, 5, 2]
        assert all(e.outcome is pc.Outcome.SUCCESS for e in evs)

        aup.fail_next(500, retry_after=0.01)
        await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1)
        evs = sorted([e async for e in ap.iter_query()], key=lambda e: e.sequence)
        assert [e.attempt for e in evs[3:]] == [0, 1]
        assert evs[4].retry_of == evs[3].reservation_id
        with pytest.raises(pc.InvalidArgument):
            wrap_openai(openai.AsyncOpenAI(base_url=aup.base_url, api_key="k"),
                        pc.P402Client(server.target, api_key=tenant[1]))
