"""OpenAI usage objects -> Record keywords, as the proxy and the SDK read them: every
detail kept, parts cut to what is left of their totals, tiers P402 prices kept."""
from __future__ import annotations

from p402_server.gateways.proxy import usage_from, web_searches


def test_chat_usage_with_every_detail():
    got = usage_from("chat", {
        "prompt_tokens": 100, "completion_tokens": 50,
        "prompt_tokens_details": {"cached_tokens": 30, "audio_tokens": 40, "image_tokens": 10},
        "completion_tokens_details": {"reasoning_tokens": 20, "audio_tokens": 25},
    }, "priority")
    assert got == {"input_tokens": 100, "output_tokens": 50, "cached_input_tokens": 30,
                   "audio_input_tokens": 40, "image_input_tokens": 10,
                   "reasoning_tokens": 20, "audio_output_tokens": 25,
                   "service_tier": "priority"}


def test_parts_are_cut_to_their_totals_and_unknown_tiers_left_out():
    got = usage_from("chat", {
        "prompt_tokens": 10, "completion_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 8, "audio_tokens": 8},
        "completion_tokens_details": {"reasoning_tokens": 4, "audio_tokens": 4},
    }, "scale")
    assert got == {"input_tokens": 10, "output_tokens": 5, "cached_input_tokens": 8,
                   "audio_input_tokens": 2, "reasoning_tokens": 4, "audio_output_tokens": 1}
    assert usage_from("chat", {"prompt_tokens": 3}, "default") == \
        {"input_tokens": 3, "output_tokens": 0}
    assert usage_from("chat", None) is None and usage_from("chat", "x") is None


def test_responses_usage_and_its_web_searches():
    answer = {"service_tier": "flex", "output": [
        {"type": "web_search_call", "id": "ws_1"}, {"type": "web_search_call", "id": "ws_2"},
        {"type": "message", "content": []}],
        "usage": {"input_tokens": 900, "output_tokens": 120,
                  "input_tokens_details": {"cached_tokens": 100},
                  "output_tokens_details": {"reasoning_tokens": 64}}}
    assert web_searches(answer) == 2 and web_searches({"output": "x"}) == 0
    got = usage_from("responses", answer["usage"], answer["service_tier"],
                     web_searches(answer))
    assert got == {"input_tokens": 900, "output_tokens": 120, "cached_input_tokens": 100,
                   "reasoning_tokens": 64, "service_tier": "flex", "web_search_calls": 2}


def test_image_api_usage_is_image_tokens():
    # gpt-image-1's answer: text and image input tokens, image output tokens
    got = usage_from("images", {"input_tokens": 50, "output_tokens": 4160,
                                "input_tokens_details": {"text_tokens": 10,
                                                         "image_tokens": 40}})
    assert got == {"input_tokens": 50, "output_tokens": 4160, "image_input_tokens": 40,
                   "image_output_tokens": 4160}
