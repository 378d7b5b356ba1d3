"""The output cap the proxy forwards: lowered to the grant in the caller's own
parameter, added to an uncapped call only when a HARD budget is in scope,
and never as `max_tokens` to a model that takes `max_completion_tokens` — driven by
the real `openai` package against a stand-in that refuses `max_tokens` on reasoning
models as OpenAI does."""
from __future__ import annotations

import openai
import pytest

from p402_server.gateways.proxy import cap_edits, takes_max_completion_tokens

MESSAGES = [{"role": "user", "content": "Think hard, then answer in one word."}]
CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("model,expected", [
    ("o1", True), ("o3-mini", True), ("o4-mini-2025-04-16", True), ("o3-pro", True),
    ("openai/o3-mini", True), ("azure/o1-preview", True), ("gpt-5", True),
    ("gpt-5.1-mini", True), ("GPT-5-nano", True), ("codex-mini-latest", True),
    ("gpt-4o", False), ("gpt-4o-mini", False), ("omni-moderation-latest", False),
    ("gpt-50x", False), ("o", False), ("claude-3-5-sonnet", False), ("ollama/o3x", False),
])
def test_reasoning_families_are_recognised(model, expected):
    assert takes_max_completion_tokens(model) is expected


@pytest.mark.parametrize("kind,model,body,cap_field,cap,granted,must,expected", [
    # the caller's cap within the grant: nothing changes
    ("chat", "gpt-4o", {"max_tokens": 10}, "max_tokens", 10, 50, True, {}),
    # above the grant: lowered, in the caller's parameter
    ("chat", "gpt-4o", {"max_tokens": 99}, "max_tokens", 99, 50, False, {"max_tokens": 50}),
    ("chat", "gpt-4o", {"max_completion_tokens": 99}, "max_completion_tokens", 99, 50, False,
     {"max_completion_tokens": 50}),
    ("responses", "gpt-4o", {"max_output_tokens": 99}, "max_output_tokens", 99, 50, False,
     {"max_output_tokens": 50}),
    # uncapped: only when the call must not pass its reservation
    ("chat", "gpt-4o", {}, "", 0, 4096, False, {}),
    ("chat", "gpt-4o", {}, "", 0, 4096, True, {"max_tokens": 4096}),
    ("responses", "o3", {}, "", 0, 4096, True, {"max_output_tokens": 4096}),
    # reasoning chat: max_completion_tokens only, a caller's max_tokens moved there
    ("chat", "o3-mini", {}, "", 0, 4096, False, {}),
    ("chat", "o3-mini", {}, "", 0, 4096, True, {"max_completion_tokens": 4096}),
    ("chat", "o3-mini", {"max_tokens": 30}, "max_tokens", 30, 4096, False,
     {"max_tokens": None, "max_completion_tokens": 30}),
    ("chat", "gpt-5", {"max_tokens": 9000}, "max_tokens", 9000, 4096, False,
     {"max_tokens": None, "max_completion_tokens": 4096}),
    ("chat", "o1", {"max_completion_tokens": 8, "max_tokens": 9}, "max_completion_tokens", 8,
     100, False, {"max_tokens": None}),
    # embeddings carry no cap
    ("embeddings", "text-embedding-3-small", {}, "", 0, 0, True, {}),
])
def test_cap_edits(kind, model, body, cap_field, cap, granted, must, expected):
    assert cap_edits(kind, model, body, cap_field, cap, granted, must) == expected


async def test_uncapped_reasoning_call_goes_through_as_sent(rig):
    """ChatOpenAI(model="o3-mini").invoke() with no cap and no HARD budget: the
    stand-in (like OpenAI) would refuse a `max_tokens`; the proxy adds none."""
    rig.upstream.models = (*rig.upstream.models, "o3-mini")
    rig.upstream.reasoning_tokens = 12
    r = await rig.openai(x_p402_customer="acme").chat.completions.create(
        model="o3-mini", messages=MESSAGES)
    assert r.choices[0].message.content
    got = rig.upstream.last(CHAT)
    assert "max_tokens" not in got.body and "max_completion_tokens" not in got.body
    [ev] = await rig.events()
    assert ev.model == "o3-mini" and ev.usage.reasoning_tokens == 12


async def test_reasoning_call_under_a_hard_budget_is_capped_in_max_completion_tokens(rig):
    await rig.admin.put_budget("acme-hard", limit_nanos=10**12, period="TOTAL",
                               enforcement="HARD", scope={"customer": "acme"})
    client = rig.openai(x_p402_customer="acme")
    await client.chat.completions.create(model="o3-mini", messages=MESSAGES)
    got = rig.upstream.last(CHAT)
    assert "max_tokens" not in got.body
    assert got.body["max_completion_tokens"] == 4096  # the default estimate's cap
    # a caller's max_tokens is moved to the parameter the model takes
    await client.chat.completions.create(model="o3-mini", messages=MESSAGES, max_tokens=7)
    got = rig.upstream.last(CHAT)
    assert "max_tokens" not in got.body and got.body["max_completion_tokens"] == 7
    events = await rig.events(2)
    assert [e.usage.output_tokens for e in events] == [20, 7]
    # an ordinary model under the same budget keeps max_tokens
    await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert rig.upstream.last(CHAT).body["max_tokens"] == 4096


async def test_the_standin_refuses_max_tokens_on_reasoning_models_like_openai():
    """The check above means something only if the upstream would refuse."""
    from tests.support.openai_standin import OpenAIStandin

    async with OpenAIStandin(api_key=None) as up:
        client = openai.AsyncOpenAI(base_url=up.base_url, api_key="k")
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="o3-mini", messages=MESSAGES,
                                                 max_tokens=5)
        assert info.value.body["param"] == "max_tokens"
