"""Provider-native usage objects -> Record keywords, for gateways that speak the
Anthropic or Gemini wire rather than OpenAI's (`p402_client.openai.usage_from_openai`
reads OpenAI's).

Each returns the keywords of `P402Client.record` (the Usage field names, p402core's
README) in P402's counting: cached, cache-write, audio and image input tokens are
parts of `input_tokens`; reasoning, audio and image output tokens parts of
`output_tokens`. The objects may be the providers' SDK types or their JSON (dicts),
camelCase or snake_case. Counts that are missing, negative or not integers are 0; a
part larger than what is left of its total is cut to it.
"""
from __future__ import annotations

from typing import Any, Mapping

from .meter import usage_kwargs

__all__ = ["usage_from_anthropic", "usage_from_gemini"]


def _get(obj: Any, *names: str) -> Any:
    for name in names:
        if obj is None:
            return None
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _n(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _parts(kw: dict, total: str, parts: list[tuple[str, int]]) -> None:
    left = kw[total]
    for name, n in parts:
        n = min(n, left)
        if n:
            kw[name] = kw.get(name, 0) + n
            left -= n


def usage_from_anthropic(usage: Any) -> dict[str, Any] | None:
    """Anthropic's `usage` (Messages API, streaming `message_delta` included) ->
    Record keywords, or None.

    Anthropic's `input_tokens` leaves out the tokens read from and written to the
    cache: P402's input_tokens adds them back. Cache writes split into 5-minute
    (`cache_write_tokens`) and 1-hour (`cache_write_1h_tokens`) by
    `cache_creation.ephemeral_5m_input_tokens` / `ephemeral_1h_input_tokens` (all
    5-minute when the split is absent); `server_tool_use.web_search_requests` are
    web-search calls; `service_tier` ("standard", "priority", "batch") is kept when
    P402 prices it. Thinking tokens are inside `output_tokens` and not reported
    apart, so `reasoning_tokens` stays 0 (they bill at the output rate)."""
    if usage is None:
        return None
    plain = _n(_get(usage, "input_tokens"))
    read = _n(_get(usage, "cache_read_input_tokens"))
    written = _n(_get(usage, "cache_creation_input_tokens"))
    split = _get(usage, "cache_creation")
    w5, w1h = _n(_get(split, "ephemeral_5m_input_tokens")), _n(_get(split, "ephemeral_1h_input_tokens"))
    if split is None or w5 + w1h == 0:
        w5, w1h = written, 0
    out = _get(usage, "output_tokens")
    if _get(usage, "input_tokens") is None and out is None:
        return None
    kw: dict[str, Any] = {"input_tokens": plain + read + max(written, w5 + w1h),
                          "output_tokens": _n(out)}
    _parts(kw, "input_tokens", [("cached_input_tokens", read), ("cache_write_tokens", w5),
                                ("cache_write_1h_tokens", w1h)])
    searches = _n(_get(_get(usage, "server_tool_use"), "web_search_requests"))
    if searches:
        kw["web_search_calls"] = searches
    tier = _get(usage, "service_tier")
    if tier in ("priority", "batch"):
        kw["service_tier"] = tier
    return usage_kwargs(**kw)


_GEMINI_MODALITY = {"AUDIO": "audio", "IMAGE": "image"}


def _modalities(details: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    if isinstance(details, (list, tuple)):
        for d in details:
            modality = _get(d, "modality")
            modality = getattr(modality, "name", modality)  # an SDK enum or its name
            kind = _GEMINI_MODALITY.get(str(modality).upper())
            if kind:
                counts[kind] = counts.get(kind, 0) + _n(_get(d, "tokenCount", "token_count"))
    return counts


def usage_from_gemini(usage_metadata: Any) -> dict[str, Any] | None:
    """Gemini's `usageMetadata` (REST JSON, or the google-genai SDK's
    `usage_metadata`) -> Record keywords, or None.

    Gemini bills thinking tokens as output but counts them apart from the candidates:
    `output_tokens` = candidates + thoughts, `reasoning_tokens` = thoughts. The input
    is the prompt plus the tool-use prompt; `cachedContentTokenCount` is the cached
    part. Audio and image tokens come from the per-modality details of the prompt and
    of the candidates."""
    if usage_metadata is None:
        return None
    prompt = _get(usage_metadata, "promptTokenCount", "prompt_token_count")
    cands = _get(usage_metadata, "candidatesTokenCount", "candidates_token_count")
    if prompt is None and cands is None:
        return None
    thoughts = _n(_get(usage_metadata, "thoughtsTokenCount", "thoughts_token_count"))
    tool = _n(_get(usage_metadata, "toolUsePromptTokenCount", "tool_use_prompt_token_count"))
    kw: dict[str, Any] = {"input_tokens": _n(prompt) + tool,
                          "output_tokens": _n(cands) + thoughts}
    ins = _modalities(_get(usage_metadata, "promptTokensDetails", "prompt_tokens_details"))
    outs = _modalities(_get(usage_metadata, "candidatesTokensDetails",
                            "candidates_tokens_details"))
    _parts(kw, "input_tokens", [
        ("cached_input_tokens", _n(_get(usage_metadata, "cachedContentTokenCount",
                                        "cached_content_token_count"))),
        ("audio_input_tokens", ins.get("audio", 0)), ("image_input_tokens", ins.get("image", 0))])
    _parts(kw, "output_tokens", [
        ("reasoning_tokens", thoughts), ("audio_output_tokens", outs.get("audio", 0)),
        ("image_output_tokens", outs.get("image", 0))])
    return usage_kwargs(**kw)
