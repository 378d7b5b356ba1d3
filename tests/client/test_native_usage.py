"""Anthropic- and Gemini-native usage objects -> Record keywords (p402_client.usage),
as JSON and as SDK-like objects, and priced: the keywords go straight into
Catalog.cost_nanos and P402Client.record."""
from __future__ import annotations

from types import SimpleNamespace as NS

import pytest

import p402core
from p402_client import InvalidArgument, usage_from_anthropic, usage_from_gemini

CATALOG = p402core.Catalog.default()

ANTHROPIC = {"input_tokens": 12, "output_tokens": 340, "cache_read_input_tokens": 2000,
             "cache_creation_input_tokens": 800,
             "cache_creation": {"ephemeral_5m_input_tokens": 300,
                                "ephemeral_1h_input_tokens": 500},
             "server_tool_use": {"web_search_requests": 2}, "service_tier": "priority"}


def test_anthropic_counts_cache_reads_and_writes_inside_the_input():
    kw = usage_from_anthropic(ANTHROPIC)
    assert kw == {"input_tokens": 2812, "output_tokens": 340, "cached_input_tokens": 2000,
                  "cache_write_tokens": 300, "cache_write_1h_tokens": 500,
                  "web_search_calls": 2, "service_tier": "priority"}
    # the SDK's objects read the same
    sdk = NS(input_tokens=12, output_tokens=340, cache_read_input_tokens=2000,
             cache_creation_input_tokens=800,
             cache_creation=NS(ephemeral_5m_input_tokens=300, ephemeral_1h_input_tokens=500),
             server_tool_use=NS(web_search_requests=2), service_tier="priority")
    assert usage_from_anthropic(sdk) == kw


def test_anthropic_without_the_cache_split_or_extras():
    kw = usage_from_anthropic({"input_tokens": 10, "output_tokens": 3,
                               "cache_creation_input_tokens": 40, "service_tier": "standard"})
    assert kw == {"input_tokens": 50, "output_tokens": 3, "cache_write_tokens": 40}
    assert usage_from_anthropic({"output_tokens": 7}) == {"input_tokens": 0, "output_tokens": 7}
    assert usage_from_anthropic(None) is None and usage_from_anthropic({}) is None


def test_anthropic_usage_prices_the_one_hour_write_at_its_rate():
    price = CATALOG.lookup("claude-sonnet-4-5")
    assert price.units.get("cache_write_1h_tokens")  # the default catalog has the rate
    kw = usage_from_anthropic({k: v for k, v in ANTHROPIC.items() if k != "service_tier"})
    kw.pop("web_search_calls")
    got = CATALOG.cost_nanos("claude-sonnet-4-5", **kw)
    r = price.rates_at(kw["input_tokens"])
    want_pico = (12 * r[0] + 2000 * r[2] + 300 * r[3]
                 + 500 * price.units["cache_write_1h_tokens"] + 340 * r[1])
    assert got == (want_pico + 500) // 1000


GEMINI = {"promptTokenCount": 1200, "candidatesTokenCount": 300, "thoughtsTokenCount": 700,
          "toolUsePromptTokenCount": 50, "cachedContentTokenCount": 400,
          "totalTokenCount": 2250,
          "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 900},
                                  {"modality": "AUDIO", "tokenCount": 200},
                                  {"modality": "IMAGE", "tokenCount": 100}],
          "candidatesTokensDetails": [{"modality": "AUDIO", "tokenCount": 120}]}


def test_gemini_bills_thoughts_as_output_and_reads_modalities():
    kw = usage_from_gemini(GEMINI)
    assert kw == {"input_tokens": 1250, "output_tokens": 1000, "cached_input_tokens": 400,
                  "audio_input_tokens": 200, "image_input_tokens": 100,
                  "reasoning_tokens": 700, "audio_output_tokens": 120}
    # snake_case SDK objects with enum modalities read the same
    mod = lambda name: NS(name=name)  # noqa: E731 - the SDK's MediaModality enum
    sdk = NS(prompt_token_count=1200, candidates_token_count=300, thoughts_token_count=700,
             tool_use_prompt_token_count=50, cached_content_token_count=400,
             prompt_tokens_details=[NS(modality=mod("TEXT"), token_count=900),
                                    NS(modality=mod("AUDIO"), token_count=200),
                                    NS(modality=mod("IMAGE"), token_count=100)],
             candidates_tokens_details=[NS(modality=mod("AUDIO"), token_count=120)])
    assert usage_from_gemini(sdk) == kw
    assert CATALOG.cost_nanos("gemini/gemini-2.5-flash", **kw) > 0


def test_gemini_parts_are_cut_to_their_totals():
    kw = usage_from_gemini({"promptTokenCount": 10, "candidatesTokenCount": 0,
                            "cachedContentTokenCount": 8,
                            "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 9}]})
    assert kw == {"input_tokens": 10, "output_tokens": 0, "cached_input_tokens": 8,
                  "audio_input_tokens": 2}
    assert usage_from_gemini({"totalTokenCount": 5}) is None


def test_the_keywords_build_a_record_request():
    from p402_client import _convert as cv

    req = cv.record_request("r1", event_id="e1", **usage_from_anthropic(ANTHROPIC))
    assert (req.usage.input_tokens, req.usage.cache_write_1h_tokens,
            req.usage.web_search_calls, req.usage.service_tier) == (2812, 500, 2, "priority")
    with pytest.raises(InvalidArgument) as info:
        cv.record_request("r1", event_id="e1", bananas=1)
    assert info.value.field == "bananas"
