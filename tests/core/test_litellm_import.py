"""Import of LiteLLM's price map, and agreement with LiteLLM's own calculator."""
from __future__ import annotations

import copy
import datetime as dt
import json
import os

import pytest

from p402core import InvalidArgument

SAMPLE = os.path.join(os.path.dirname(__file__), "data", "litellm_sample.json")
TAKEN = "2026-01-15"


@pytest.fixture(scope="module")
def sample():
    with open(SAMPLE, encoding="utf-8") as fh:
        return json.load(fh)


@pytest.fixture
def imported(impl, sample):
    return impl.Catalog.from_litellm(sample, taken=TAKEN)


def test_what_is_priced_and_what_is_skipped(imported, sample):
    skipped = dict(imported.skipped)
    assert len(imported) + len(skipped) == len(sample)
    assert skipped["sample_spec"].startswith("sample_spec")
    # priced by their units (p402core._units), not skipped
    assert imported.lookup("whisper-1").units == {"audio_ms": 100_000}  # 0.0001 USD/s
    assert imported.lookup("tts-1").units == {"characters": 15_000_000}
    assert imported.lookup("1024-x-1024/50-steps/bedrock/amazon.nova-canvas-v1:0").units == \
        {"images": 60_000_000_000}
    assert imported.lookup("rerank-v3.5").units == {"queries": 2_000_000_000}
    assert imported.lookup("sora-2").units == {"video_ms": 100_000_000}  # 0.1 USD/s
    assert imported.cost_nanos("whisper-1", audio_ms=90_500) == 9_050_000
    for name in ("malformed/negative-price", "malformed/not-a-number", "malformed/not-an-object",
                 "malformed/too-expensive", "malformed/range-gap"):
        assert skipped[name].startswith("malformed"), name
        assert name not in imported
    assert "negative" in skipped["malformed/negative-price"]
    # any mode with a per-token price is kept
    assert imported.lookup("text-embedding-3-small").mode == "embedding"
    assert imported.lookup("text-embedding-3-small").output_pico == 0


def test_exact_conversion_and_kept_fields(imported):
    p = imported.lookup("claude-sonnet-4-5")
    assert (p.input_pico, p.output_pico, p.cached_input_pico, p.cache_write_pico) == (
        3_000_000, 15_000_000, 300_000, 3_750_000)
    assert p.reasoning_pico is None and p.tiers == ()
    assert (p.provider, p.mode, p.family) == ("anthropic", "chat", "claude")
    assert (p.max_input_tokens, p.max_output_tokens) == (200_000, 64_000)
    mini = imported.lookup("gpt-4o-mini")
    assert (mini.input_pico, mini.output_pico, mini.cached_input_pico) == (150_000, 600_000, 75_000)
    assert imported.lookup("dashscope/qwen-turbo").reasoning_pico == 500_000


def test_threshold_keys_become_tiers(imported):
    p = imported.lookup("gemini/gemini-2.5-pro")
    (tier,) = p.tiers
    assert tier.threshold_tokens == 200_000
    assert (tier.input_pico, tier.output_pico, tier.cached_input_pico) == (2_500_000, 15_000_000, 250_000)
    # service-tier variants (_priority, _batches, _flex) are not tiers
    assert len(imported.lookup("gpt-5.5").tiers) == 1
    assert imported.lookup("gpt-5.5").tiers[0].threshold_tokens == 272_000


def test_xai_tiers_apply_from_the_threshold_itself(imported):
    p = imported.lookup("xai/grok-4.3")
    assert p.tiers[0].threshold_tokens == 199_999
    assert p.cost_pico(199_999, 0) == 199_999 * 1_250_000
    assert p.cost_pico(200_000, 0) == 200_000 * 2_500_000


def test_fireworks_default_cache_rate(imported):
    p = imported.lookup("fireworks_ai/accounts/fireworks/models/llama-v3p3-70b-instruct")
    assert p.cached_input_pico * 2 == p.input_pico


def test_tiered_pricing_ranges(imported):
    p = imported.lookup("dashscope/qwen-flash")
    assert (p.input_pico, p.output_pico) == (50_000, 400_000)
    assert [t.threshold_tokens for t in p.tiers] == [256_000]
    assert p.cost_pico(256_000, 10) == 256_000 * 50_000 + 10 * 400_000
    assert p.cost_pico(256_001, 10) == 256_001 * 250_000 + 10 * 2_000_000


def test_sub_pico_prices_are_rounded_half_up_and_recorded(imported):
    p = imported.lookup("synthetic/sub-pico")
    assert (p.input_pico, p.output_pico) == (3, 2)  # 2.5 -> 3, 1.5 -> 2
    assert ("synthetic/sub-pico", "input_cost_per_token") in imported.rounded
    assert ("synthetic/sub-pico", "output_cost_per_token") in imported.rounded
    assert ("bigmodel/glm-5.3-flash", "input_cost_per_token") in imported.rounded
    assert not any(name == "gpt-4o" for name, _ in imported.rounded)


def test_version_is_a_content_hash(impl, sample, imported):
    assert imported.version.startswith("litellm-") and len(imported.version) == len("litellm-") + 12
    again = impl.Catalog.from_litellm(copy.deepcopy(sample), taken=TAKEN)
    assert again.version == imported.version and again.to_dict() == imported.to_dict()
    changed = copy.deepcopy(sample)
    changed["gpt-4o"]["input_cost_per_token"] = 2.6e-06
    assert impl.Catalog.from_litellm(changed, taken=TAKEN).version != imported.version
    assert imported.taken == TAKEN


def test_from_path_equals_from_mapping(impl, imported):
    from_path = impl.Catalog.from_litellm(SAMPLE, taken=TAKEN)
    assert from_path.to_dict()["prices"] == imported.to_dict()["prices"]
    assert from_path.version == imported.version
    dt.date.fromisoformat(impl.Catalog.from_litellm(SAMPLE).taken)  # defaults to a real date


def test_not_a_price_map(impl):
    with pytest.raises(InvalidArgument) as exc:
        impl.Catalog.from_litellm([1, 2, 3])
    assert exc.value.field == "path_or_mapping"


def test_import_round_trips(impl, imported):
    again = impl.Catalog.from_dict(json.loads(json.dumps(imported.to_dict())))
    assert again.to_dict() == imported.to_dict()
    assert again.skipped == imported.skipped and again.rounded == imported.rounded


def test_twins_import_identically(both, sample):
    py, c = (impl.Catalog.from_litellm(sample, taken=TAKEN) for impl in both)
    assert py.to_dict() == c.to_dict()


# -- agreement with LiteLLM's calculator over the whole bundled map -------------

USAGES = [  # (input, output, cached, cache_write, reasoning)
    (1, 0, 0, 0, 0), (3, 1, 0, 0, 0), (1000, 500, 0, 0, 0), (1200, 800, 300, 100, 200),
    (9_999, 12_345, 9_000, 999, 12_000), (128_000, 7, 0, 0, 0), (128_001, 7, 0, 0, 0),
    (199_999, 10, 0, 0, 0), (200_000, 10, 0, 0, 0), (200_001, 10, 100_000, 50_000, 5),
    (256_001, 99, 0, 0, 0), (272_000, 1, 0, 0, 0), (272_001, 100, 1000, 1000, 50),
    (1_000_001, 3000, 999_000, 1000, 3000), (100_000_000, 100_000_000, 0, 0, 0),
]


def test_agrees_with_litellm_to_the_nano(impl):
    litellm = pytest.importorskip("litellm", reason="litellm is not installed")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from litellm.litellm_core_utils.llm_cost_calc.utils import generic_cost_per_token
    from litellm.types.utils import CompletionTokensDetailsWrapper, PromptTokensDetailsWrapper, Usage

    path = os.path.join(os.path.dirname(litellm.__file__), "model_prices_and_context_window_backup.json")
    with open(path, encoding="utf-8") as fh:
        mapping = json.load(fh)
    cat = impl.Catalog.from_litellm(mapping)
    rounded = {name for name, _ in cat.rounded}
    when = dt.datetime(2026, 1, 7, 12, 0, tzinfo=dt.timezone.utc)
    checked, models = 0, 0
    for name in cat.models():
        entry = mapping[name]
        # chat models; sub-pico prices (rounded on import) and off-peak windows excluded
        if entry.get("mode") != "chat" or name in rounded or entry.get("off_peak_pricing"):
            continue
        models += 1
        p = cat.lookup(name)
        for i, o, c, w, r in USAGES:
            usage = Usage(
                prompt_tokens=i, completion_tokens=o, total_tokens=i + o,
                prompt_tokens_details=(PromptTokensDetailsWrapper(cached_tokens=c, cache_creation_tokens=w)
                                       if c or w else None),
                completion_tokens_details=(CompletionTokensDetailsWrapper(reasoning_tokens=r)
                                           if r else None))
            prompt_usd, completion_usd = generic_cost_per_token(
                model=name, usage=usage, custom_llm_provider=entry.get("litellm_provider"),
                model_info=entry, current_time=when)
            theirs = (prompt_usd + completion_usd) * 1e9  # float nano-USD
            ours = p.cost_nanos(i, o, c, w, r)
            # ours is exact then rounded once: within half a nano, plus float error
            assert abs(ours - theirs) <= 0.5 + 1e-9 * max(1.0, theirs), (name, (i, o, c, w, r), ours, theirs)
            checked += 1
    assert models > 3000 and checked == models * len(USAGES)
