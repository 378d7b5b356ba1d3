"""Usage units beyond text tokens and service tiers: the formula of p402core._units,
its fallbacks and bounds, on both twins, and the twins agreeing on random usage."""
from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p402core import MAX_TOKENS, InvalidArgument, UnknownModel
from p402core._units import MAX_COST_PICO, QUANTITY_UNITS, UNITS

M = 10**6  # pico per token of 1 USD per million tokens


def gpt4o_audio(impl, **kw):
    # gpt-4o-audio-preview style: text 2.5/10, audio 40/80 USD per million tokens
    return impl.ModelPrice("audio-model", "openai", input_pico=2_500_000,
                           output_pico=10_000_000, cached_input_pico=1_250_000,
                           units={"audio_input_tokens": 40 * M, "audio_output_tokens": 80 * M},
                           **kw)


def test_token_units_are_part_of_their_totals(impl):
    p = gpt4o_audio(impl)
    # 1,000 input of which 100 cached and 300 audio; 500 output of which 200 audio
    got = p.cost_units_pico(1000, 500, 100, units={"audio_input_tokens": 300,
                                                   "audio_output_tokens": 200})
    assert got == (600 * 2_500_000 + 100 * 1_250_000 + 300 * 40 * M
                   + 300 * 10_000_000 + 200 * 80 * M)
    assert p.cost_units_nanos(1000, 500, 100, units={"audio_input_tokens": 300,
                                                     "audio_output_tokens": 200}) == \
        (got + 500) // 1000
    # without units it is the text price exactly
    assert p.cost_units_pico(1000, 500, 100) == p.cost_pico(1000, 500, 100)


def test_token_units_without_a_rate_fall_back(impl):
    p = impl.ModelPrice("m", "p", input_pico=3 * M, output_pico=15 * M, cache_write_pico=4 * M)
    units = {"cache_write_1h_tokens": 10, "image_input_tokens": 20, "image_output_tokens": 5}
    # 1h write -> the cache-write rate; image input -> input; image output -> output
    assert p.cost_units_pico(100, 50, 0, 30, units=units) == (
        (100 - 30 - 10 - 20) * 3 * M + 30 * 4 * M + 10 * 4 * M + 20 * 3 * M
        + 45 * 15 * M + 5 * 15 * M)
    with_1h = impl.ModelPrice("m", "p", input_pico=3 * M, output_pico=15 * M,
                              cache_write_pico=4 * M, units={"cache_write_1h_tokens": 6 * M})
    assert (with_1h.cost_units_pico(100, 0, 0, 30, units={"cache_write_1h_tokens": 10})
            == 60 * 3 * M + 30 * 4 * M + 10 * 6 * M)


def test_quantities_price_per_unit_and_unpriced_ones_cost_nothing(impl):
    whisper = impl.ModelPrice("whisper-1", "openai", input_pico=0, output_pico=0,
                              mode="audio_transcription", units={"audio_ms": 100_000})
    # 0.0001 USD per second = 100,000 pico per millisecond; 61.5 s of audio
    assert whisper.cost_units_nanos(units={"audio_ms": 61_500}) == 6_150_000
    dalle = impl.ModelPrice("hd/1024-x-1792/dall-e-3", "openai", input_pico=0, output_pico=0,
                            mode="image_generation", units={"images": 120_000_000_000})
    assert dalle.cost_units_nanos(units={"images": 3}) == 360_000_000  # 3 x 0.12 USD
    assert dalle.cost_units_nanos(units={"characters": 10_000}) == 0


def test_the_tier_is_chosen_by_the_whole_input(impl):
    p = impl.ModelPrice("m", "p", input_pico=1 * M, output_pico=2 * M,
                        tiers=[impl.PriceTier(200, input_pico=5 * M, output_pico=7 * M)],
                        units={"audio_input_tokens": 9 * M})
    # 300 input (100 audio): above the 200 threshold, text at the tier's rate
    assert p.cost_units_pico(300, 10, units={"audio_input_tokens": 100}) == \
        200 * 5 * M + 100 * 9 * M + 10 * 7 * M
    assert p.rates_at(300) == (5 * M, 7 * M, 5 * M, 5 * M, 7 * M)
    assert p.rates_at(200) == (1 * M, 2 * M, 1 * M, 1 * M, 2 * M)


def test_service_tiers_use_their_own_rates(impl):
    batch = impl.ModelPrice("m", "p", input_pico=1 * M, output_pico=4 * M)
    priority = impl.ModelPrice("m", "p", input_pico=5 * M, output_pico=20 * M,
                               cached_input_pico=M // 2)
    p = impl.ModelPrice("m", "p", input_pico=2 * M, output_pico=8 * M,
                        service_tiers={"batch": batch, "priority": priority})
    assert p.cost_units_pico(100, 10) == 100 * 2 * M + 10 * 8 * M
    assert p.cost_units_pico(100, 10, service_tier="standard") == 100 * 2 * M + 10 * 8 * M
    assert p.cost_units_pico(100, 10, service_tier="batch") == 100 * M + 10 * 4 * M
    assert p.cost_units_pico(100, 10, 50, service_tier="priority") == \
        50 * 5 * M + 50 * (M // 2) + 10 * 20 * M
    # a tier the model has no rates for bills at the standard rates
    assert p.cost_units_pico(100, 10, service_tier="flex") == p.cost_units_pico(100, 10)
    assert p.for_tier("batch") == batch and p.for_tier("") is p
    cat = impl.Catalog([p], version="t", taken="2026-01-02")
    assert cat.cost_nanos("m", input_tokens=100, output_tokens=10, service_tier="batch") == \
        (100 * M + 10 * 4 * M + 500) // 1000


def test_round_trip_and_pickle_keep_units_and_tiers(impl):
    p = gpt4o_audio(impl, service_tiers={"flex": impl.ModelPrice(
        "audio-model", "openai", input_pico=M, output_pico=M, units={"images": 5})})
    d = p.to_dict()
    assert d["units"] == {"audio_input_tokens": 40 * M, "audio_output_tokens": 80 * M}
    assert d["service_tiers"]["flex"]["units"] == {"images": 5}
    assert impl.ModelPrice.from_dict(d) == p
    assert pickle.loads(pickle.dumps(p)) == p
    assert p.units == {"audio_input_tokens": 40 * M, "audio_output_tokens": 80 * M}


@pytest.mark.parametrize("kwargs,field", [
    ({"units": {"audio_input_tokens": 901}}, "audio_input_tokens"),   # 100 cached + 901 > 1000
    ({"units": {"image_output_tokens": 501}}, "image_output_tokens"),
    ({"units": {"bananas": 1}}, "bananas"),
    ({"units": {"images": -1}}, "images"),
    ({"units": {"images": True}}, "images"),
    ({"units": {"pages": MAX_TOKENS + 1}}, "pages"),
    ({"units": {"audio_ms": 1.5}}, "audio_ms"),
    ({"service_tier": "gold"}, "service_tier"),
    ({"service_tier": 3}, "service_tier"),
    ({"units": "images"}, "units"),
])
def test_bad_usage_names_the_field(impl, kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        gpt4o_audio(impl).cost_units_pico(1000, 500, 100, **kwargs)
    assert info.value.field == field


@pytest.mark.parametrize("kwargs,field", [
    ({"units": {"images": 10**13 + 1}}, "units.images"),
    ({"units": {"audio_input_tokens": 10**10 + 1}}, "units.audio_input_tokens"),
    ({"units": {"nope": 1}}, "units.nope"),
    ({"service_tiers": {"standard": None}}, "service_tiers"),
    ({"service_tiers": {"gold": None}}, "service_tier"),
    ({"service_tiers": {"batch": "cheap"}}, "service_tiers"),
])
def test_bad_prices_name_the_field(impl, kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        impl.ModelPrice("m", "p", input_pico=1, output_pico=1, **kwargs)
    assert info.value.field == field


def test_a_tier_must_price_the_same_model(impl):
    with pytest.raises(InvalidArgument) as info:
        impl.ModelPrice("m", "p", input_pico=1, output_pico=1, service_tiers={
            "batch": impl.ModelPrice("other", "p", input_pico=1, output_pico=1)})
    assert info.value.field == "service_tiers"


def test_a_cost_past_64_bits_is_refused_not_wrapped(impl):
    p = impl.ModelPrice("m", "p", input_pico=0, output_pico=0,
                        units={u: 10**13 for u in QUANTITY_UNITS})
    with pytest.raises(InvalidArgument) as info:
        p.cost_units_pico(units={u: MAX_TOKENS for u in QUANTITY_UNITS})
    assert info.value.field == "usage"
    # the largest cost kept is exactly MAX_COST_PICO (9e18 pico = 9 million USD)
    assert p.cost_units_pico(units={"images": 900_000}) == MAX_COST_PICO
    with pytest.raises(InvalidArgument):
        p.cost_units_pico(units={"images": 900_001})


_usage = st.fixed_dictionaries({
    "i": st.integers(0, 10**6), "o": st.integers(0, 10**6),
}).flatmap(lambda d: st.fixed_dictionaries({
    "i": st.just(d["i"]), "o": st.just(d["o"]),
    "c": st.integers(0, d["i"] // 4), "w": st.integers(0, d["i"] // 4),
    "r": st.integers(0, d["o"] // 3),
    "units": st.fixed_dictionaries({
        "cache_write_1h_tokens": st.integers(0, d["i"] // 8),
        "audio_input_tokens": st.integers(0, d["i"] // 8),
        "image_input_tokens": st.integers(0, d["i"] // 8),
        "audio_output_tokens": st.integers(0, d["o"] // 3),
        "image_output_tokens": st.integers(0, d["o"] // 3),
        **{u: st.integers(0, 10**5) for u in QUANTITY_UNITS},
    }),
    "tier": st.sampled_from(["", "standard", "batch", "flex", "priority"]),
}))


@settings(max_examples=300, deadline=None)
@given(u=_usage, rates=st.dictionaries(st.sampled_from(UNITS), st.integers(0, 10**9)))
def test_twins_agree_on_any_usage(both, u, rates):
    py, c = both
    costs = []
    for impl in (py, c):
        tiers = {"batch": impl.ModelPrice("m", "p", input_pico=M, output_pico=2 * M,
                                          units=rates)}
        p = impl.ModelPrice("m", "p", input_pico=3 * M, output_pico=9 * M,
                            cached_input_pico=M, reasoning_pico=11 * M, units=rates,
                            tiers=[impl.PriceTier(500_000, input_pico=6 * M,
                                                  output_pico=18 * M)],
                            service_tiers=tiers)
        costs.append(p.cost_units_pico(u["i"], u["o"], u["c"], u["w"], u["r"],
                                       units=u["units"], service_tier=u["tier"]))
    assert costs[0] == costs[1]


def test_an_image_size_or_quality_without_a_price_falls_back_to_the_shorter_name(impl):
    from p402core._units import image_name

    sized = impl.ModelPrice("hd/1024-x-1792/img", "p", input_pico=0, output_pico=0,
                            units={"images": 8 * 10**10})
    plain = impl.ModelPrice("img", "p", input_pico=0, output_pico=0, units={"images": 10**10})
    cat = impl.Catalog([sized, plain], version="t", taken="2026-01-02")
    assert cat.lookup(image_name("img", "1024x1792", "hd")) == sized
    assert cat.lookup(image_name("img", "1024x1024", "hd")) == plain   # no such size
    assert cat.lookup(image_name("img", "512x512", None)) == plain
    assert cat.lookup("standard/img") == plain
    assert image_name("img", "1024X1792", "HD") == "hd/1024-x-1792/img"
    assert image_name("img", "big", "ultra") == "img"
    with pytest.raises(UnknownModel):
        cat.lookup("hd/1024-x-1792/other")
