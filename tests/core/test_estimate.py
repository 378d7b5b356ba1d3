"""Tokenizer-free estimate and its calibration: every test runs on both twins."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p402core import MAX_TOKENS, InvalidArgument


def mp(impl, family="gpt", max_output_tokens=0, model="m"):
    return impl.ModelPrice(model, "p", input_pico=2_000_000, output_pico=8_000_000, family=family,
                           max_output_tokens=max_output_tokens)


def test_estimate_formula(impl):
    est = impl.Estimator()
    p = mp(impl, "gpt")
    assert est.bytes_per_token_milli(p) == impl.FAMILY_BYTES_PER_TOKEN_MILLI["gpt"] == 3000
    # ceil(4000 * 1000 / 3000) = 1334; default cap 4096
    assert est.estimate(p, 4000) == (1334, 4096, (1334 * 2_000_000 + 4096 * 8_000_000 + 500) // 1000)
    assert est.estimate(p, 3000)[0] == 1000  # exact division: no extra token
    assert est.estimate(p, 0) == (0, 4096, 4096 * 8_000)
    assert est.estimate(p, 1)[0] == 1


def test_cost_is_the_worst_case_of_the_price(impl):
    est = impl.Estimator()
    p = impl.ModelPrice("m", "p", input_pico=1_000_000, output_pico=10_000_000, cached_input_pico=1,
                        family="claude",
                        tiers=[impl.PriceTier(1000, input_pico=2_000_000, output_pico=20_000_000)])
    i, o, cost = est.estimate(p, 10_000, 100)
    assert cost == p.cost_nanos(i, o) and i > 1000  # tier applied, no cache discount


def test_unknown_family_uses_the_conservative_default(impl):
    est = impl.Estimator()
    assert est.bytes_per_token_milli(mp(impl, "")) == impl.DEFAULT_BYTES_PER_TOKEN_MILLI
    assert est.bytes_per_token_milli(mp(impl, "martian")) == impl.DEFAULT_BYTES_PER_TOKEN_MILLI
    assert impl.DEFAULT_BYTES_PER_TOKEN_MILLI <= min(impl.FAMILY_BYTES_PER_TOKEN_MILLI.values())


def test_family_ratios_are_conservative(impl):
    # below what tokenizers measure on English prose (~4 bytes/token) and >= 1 byte/token
    for family, milli in impl.FAMILY_BYTES_PER_TOKEN_MILLI.items():
        assert 1000 <= milli <= 3500, family


@pytest.mark.parametrize("requested,model_max,expected", [
    (0, 0, 4096),          # default cap
    (0, 1000, 1000),       # model max below the default cap
    (100, 0, 100),         # requested
    (100, 50, 50),         # model max wins
    (50_000, 32_768, 32_768),
    (999_999, 0, 999_999),  # no model max: the request stands
])
def test_output_cap(impl, requested, model_max, expected):
    est = impl.Estimator()
    assert est.estimate(mp(impl, max_output_tokens=model_max), 100, requested)[1] == expected


def test_default_output_cap_is_configurable(impl):
    assert impl.Estimator(default_output_cap=256).estimate(mp(impl), 10)[1] == 256
    for bad in (0, -1, MAX_TOKENS + 1, 1.5, None):
        with pytest.raises(InvalidArgument) as exc:
            impl.Estimator(default_output_cap=bad)
        assert exc.value.field == "default_output_cap"


@pytest.mark.parametrize("args,field", [
    ((-1,), "input_bytes"), ((MAX_TOKENS + 1,), "input_bytes"), ((1.5,), "input_bytes"),
    ((True,), "input_bytes"), ((10, -1), "max_output_tokens"), ((10, MAX_TOKENS + 1), "max_output_tokens"),
    ((10, "5"), "max_output_tokens"),
])
def test_estimate_validation(impl, args, field):
    with pytest.raises(InvalidArgument) as exc:
        impl.Estimator().estimate(mp(impl), *args)
    assert exc.value.field == field


def test_price_must_be_a_price(impl):
    est = impl.Estimator()
    with pytest.raises(TypeError):
        est.estimate(None, 10)
    with pytest.raises(TypeError):
        est.estimate("gpt-4o", 10)


# -- content -------------------------------------------------------------------

def test_content_str_and_bytes_agree_for_ascii(impl):
    est = impl.Estimator()
    p = mp(impl)
    text = "def f(x):\n    return x * 2\n" * 150
    assert est.estimate_content(p, text) == est.estimate(p, len(text))
    assert est.estimate_content(p, text.encode()) == est.estimate(p, len(text))
    assert est.estimate_content(p, bytearray(text.encode())) == est.estimate(p, len(text))
    assert est.estimate_content(p, memoryview(text.encode()), 7) == est.estimate(p, len(text), 7)


def test_non_ascii_content_counts_more_tokens(impl):
    est = impl.Estimator()
    p = mp(impl, "gpt")
    cjk = "価格は整数で計算する。" * 100          # 3 bytes per character
    raw = cjk.encode("utf-8")
    assert est.estimate_content(p, cjk) == est.estimate_content(p, raw)
    tokens = est.estimate_content(p, cjk)[0]
    assert tokens == -(-len(raw) * 1000 // impl.NON_ASCII_BYTES_PER_TOKEN_MILLI["gpt"])
    assert tokens > est.estimate(p, len(raw))[0]     # the byte-only estimate is lower
    assert tokens >= len(cjk)                        # at least a token per character
    mixed = "hello " * 10 + "ü" * 10                 # 60 ASCII bytes, 20 non-ASCII bytes
    assert est.estimate_content(p, mixed)[0] == -(-60_000 // 3000) + -(-20_000 // 1500)


def test_non_ascii_unknown_family_is_one_token_per_byte(impl):
    est = impl.Estimator()
    raw = ("ж" * 500).encode()
    assert est.estimate_content(mp(impl, ""), raw)[0] == len(raw)


def test_lone_surrogates_are_measured_not_rejected(impl):
    est = impl.Estimator()
    # 2 ASCII bytes at 2.5 bytes/token -> 1 token; the surrogate is 3 bytes at 1 -> 3
    assert est.estimate_content(mp(impl, ""), "a\ud800b")[0] == 1 + 3


@pytest.mark.parametrize("content", [None, 5, ["a"], {"a": 1}])
def test_content_type(impl, content):
    with pytest.raises(InvalidArgument) as exc:
        impl.Estimator().estimate_content(mp(impl), content)
    assert exc.value.field == "content"


def test_content_cap_validation(impl):
    with pytest.raises(InvalidArgument) as exc:
        impl.Estimator().estimate_content(mp(impl), "abc", -5)
    assert exc.value.field == "max_output_tokens"


# -- calibration ----------------------------------------------------------------

def test_calibration_tightens_slowly_toward_observations(impl):
    est = impl.Estimator()
    p = mp(impl, "gpt")
    base = est.bytes_per_token_milli(p)
    seen = [base]
    for _ in range(200):  # real ratio 4.4 bytes/token: target 4.4 * 0.9 = 3960, capped at 4500
        est.observe(p, 44_000, 10_000)
        seen.append(est.bytes_per_token_milli(p))
    assert all(b >= a for a, b in zip(seen, seen[1:]))  # monotone
    assert seen[1] - seen[0] <= (3960 - base) // 16 + 1  # one step is small
    assert 3900 <= seen[-1] <= 3960                      # converges under the observed ratio
    assert est.estimate(p, 44_000)[0] > 10_000           # still over-estimates


def test_calibration_is_bounded_by_a_ceiling(impl):
    est = impl.Estimator()
    p = mp(impl, "claude")
    base = impl.FAMILY_BYTES_PER_TOKEN_MILLI["claude"]
    for _ in range(500):
        est.observe(p, 1_000_000, 1)  # absurd: 1 MB in one token
    assert est.bytes_per_token_milli(p) <= base * 3 // 2
    assert est.bytes_per_token_milli(p) >= base * 3 // 2 - 16


def test_calibration_floor(impl):
    est = impl.Estimator()
    p = mp(impl, "gpt")
    for _ in range(100):
        est.observe(p, 1000, 1000 * 50)  # 50 tokens per byte: impossible, clamps at the floor
    assert est.bytes_per_token_milli(p) == 1000


def test_one_outlier_moves_it_little(impl):
    est = impl.Estimator()
    p = mp(impl, "gpt")
    est.observe(p, 10_000_000, 1)
    base = impl.FAMILY_BYTES_PER_TOKEN_MILLI["gpt"]
    assert est.bytes_per_token_milli(p) - base <= (base // 2) // 16  # <= ~3 % of the base


def test_under_estimates_are_corrected_fast(impl):
    est = impl.Estimator()
    p = mp(impl, "gpt")
    est.observe(p, 2000, 1000)  # 2 bytes/token (code-heavy): target 1800
    assert est.bytes_per_token_milli(p) == 3000 - (3000 - 1800 + 3) // 4


def test_tiny_or_empty_observations_are_ignored(impl):
    est = impl.Estimator()
    p = mp(impl, "gpt")
    est.observe(p, 255, 1)
    est.observe(p, 100_000, 0)
    assert est.snapshot()["ratios"] == {}
    assert est.bytes_per_token_milli(p) == 3000


def test_calibration_is_per_model(impl):
    est = impl.Estimator()
    a, b = mp(impl, "gpt", model="a"), mp(impl, "gpt", model="b")
    for _ in range(50):
        est.observe(a, 40_000, 10_000)
    assert est.bytes_per_token_milli(a) > est.bytes_per_token_milli(b) == 3000


@pytest.mark.parametrize("args,field", [
    ((-1, 10), "input_bytes"), ((10, -1), "input_tokens"), ((1.0, 10), "input_bytes"),
    ((10, MAX_TOKENS + 1), "input_tokens"),
])
def test_observe_validation(impl, args, field):
    with pytest.raises(InvalidArgument) as exc:
        impl.Estimator().observe(mp(impl), *args)
    assert exc.value.field == field


def test_snapshot_restore_round_trip(impl):
    est = impl.Estimator()
    p, q = mp(impl, "gpt", model="a"), mp(impl, "llama", model="b")
    for _ in range(20):
        est.observe(p, 44_000, 10_000)
        est.observe(q, 20_000, 10_000)
    snap = est.snapshot()
    assert snap["version"] == 1 and set(snap["ratios"]) == {"a", "b"}
    other = impl.Estimator()
    other.restore(snap)
    assert other.snapshot() == snap
    assert other.estimate(p, 12_345) == est.estimate(p, 12_345)
    assert other.bytes_per_token_milli(q) == est.bytes_per_token_milli(q)


@pytest.mark.parametrize("state,field", [
    ({"version": 2, "ratios": {}}, "version"),
    ({"version": 1, "ratios": []}, "ratios"),
    ({"version": 1, "ratios": {"m": 999}}, "ratios"),
    ({"version": 1, "ratios": {"m": 10**6}}, "ratios"),
    ({"version": 1, "ratios": {"m": "3000"}}, "ratios"),
    ({"version": 1, "ratios": {"": 3000}}, "ratios"),
    (None, "state"),
])
def test_restore_validation(impl, state, field):
    est = impl.Estimator()
    with pytest.raises(InvalidArgument) as exc:
        est.restore(state)
    assert exc.value.field == field


def test_restored_ratio_is_capped_by_the_model_ceiling(impl):
    est = impl.Estimator()
    est.restore({"version": 1, "ratios": {"m": 4500}})  # valid for gpt, too high for claude
    assert est.bytes_per_token_milli(mp(impl, "claude")) == 2600 * 3 // 2


# -- twins -----------------------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(family=st.sampled_from(["gpt", "claude", "mistral", "", "other"]),
       obs=st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 10**7)), max_size=20),
       nbytes=st.integers(0, MAX_TOKENS), cap=st.integers(0, MAX_TOKENS),
       text=st.text(max_size=200), model_max=st.integers(0, 200_000))
def test_twins_estimate_identically(both, family, obs, nbytes, cap, text, model_max):
    results = []
    for impl in both:
        est = impl.Estimator()
        p = mp(impl, family, max_output_tokens=model_max)
        for n, t in obs:
            est.observe(p, n, t)
        results.append((est.estimate(p, nbytes, cap), est.estimate_content(p, text, cap),
                        est.snapshot(), est.bytes_per_token_milli(p)))
    assert results[0] == results[1]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=5000) | st.text(max_size=3000),
       family=st.sampled_from(["gpt", "", "claude"]))
def test_twins_measure_content_identically(both, content, family):
    py, c = ((impl.Estimator().estimate_content(mp(impl, family), content)) for impl in both)
    assert py == c


@pytest.mark.parametrize("n", [0, 7, 8, 9, 2039, 2040, 2041, 2048, 10_001])
def test_high_byte_count_at_chunk_boundaries(impl, n):
    est = impl.Estimator()
    p = mp(impl, "")  # unknown family: 1 token per non-ASCII byte
    assert est.estimate_content(p, b"\xff" * n)[0] == n
    assert est.estimate_content(p, b"a" * 5 + b"\x80" * n)[0] == 2 + n
    assert est.estimate_content(p, "\U0001F600" * n)[0] == 4 * n   # 4-byte code points
    assert est.estimate_content(p, "é" * n)[0] == 2 * n             # 1-byte-kind str


@pytest.mark.parametrize("n", [0, 3, 4, 5, 1023, 1024, 1025, 65_535 * 4 + 7])
def test_two_byte_kind_str_counts_at_word_and_flush_boundaries(impl, n):
    """UCS-2 strings are counted four code units per word, flushed every
    65,535 words: every lane and the flush must count exactly."""
    est = impl.Estimator()
    p = mp(impl, "")  # unknown family: 1 token per non-ASCII byte
    assert est.estimate_content(p, "日" * n)[0] == 3 * n           # >= 0x800: 3 bytes
    assert est.estimate_content(p, "\u07ff" * n + "\u0100")[0] == 2 * n + 2   # 2 bytes
    mixed = "a\u0080\u07ff\u0800\uffff\ud800" * (n // 6 + 1)
    want = len(mixed.encode("utf-8", "surrogatepass")) - mixed.count("a")
    assert est.estimate_content(p, mixed)[0] == want + est.estimate_content(p, "a" * mixed.count("a"))[0]


def test_compiled_estimator_is_really_compiled(both):
    assert both[1].Estimator.__module__ == "p402core._estimate_c"
