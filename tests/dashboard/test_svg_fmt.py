"""The SVG chart helper and the money/time formatting of the dashboard (pure functions)."""
from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from p402_server.dashboard import filters as F
from p402_server.dashboard import fmt, svg

NS = "{http://www.w3.org/2000/svg}"


def parse(markup) -> ET.Element:
    root = ET.fromstring(str(markup))  # well-formed XML or this raises
    assert root.tag == NS + "svg"
    return root


# --- money -------------------------------------------------------------------------


@pytest.mark.parametrize("nanos, text", [
    (0, "$0.00"),
    (1, "$0.000000001"),
    (10_000_000, "$0.01"),
    (1_500_000_000, "$1.50"),
    (123_456, "$0.000123456"),
    (1_234_567_890_123, "$1,234.567890123"),
    (-250_000_000, "-$0.25"),
    (2**63 - 1, "$9,223,372,036.854775807"),
])
def test_usd_is_exact(nanos, text):
    assert fmt.usd(nanos) == text


def test_usd_plain_round_trips_through_decimal():
    from decimal import Decimal

    for n in (0, 1, 999_999_999, 10**9, 123_456_789_012, -7):
        assert Decimal(fmt.usd_plain(n)).scaleb(9) == n


def test_pct_in_integer_arithmetic():
    assert fmt.pct(1, 3) == "33.3%"
    assert fmt.pct(2, 3) == "66.7%"
    assert fmt.pct(-1, 4) == "-25.0%"
    assert fmt.pct(1, 10**9) == "<0.1%"  # spent something: never shown as 0.0%
    assert fmt.pct(0, 5) == "0.0%"
    assert fmt.pct(5, 0) == ""


def test_enum_names_from_ints_and_from_store_names():
    assert fmt.outcome_name(1) == "success" == fmt.outcome_name("SUCCESS")
    assert fmt.outcome_name(2) == "provider error"
    assert fmt.decision_name(3) == "deny" == fmt.decision_name("DENY")
    assert fmt.evidence_name(0) == "—"
    assert fmt.evidence_name(99) == "99"  # a newer server's value is shown, not hidden


def test_times_are_utc():
    assert fmt.ms_to_utc(0) == ""
    assert fmt.ms_to_utc(1_700_000_000_123) == "2023-11-14 22:13:20 UTC"
    assert fmt.ms_to_utc(1_700_000_000_123, zone=False) == "2023-11-14 22:13:20"
    assert fmt.ms_to_iso(1_700_000_000_123) == "2023-11-14T22:13:20.123Z"
    assert fmt.bucket_label(1_700_000_000_000, "hour") == "11-14 22:00"


# --- filters -----------------------------------------------------------------------


def test_filter_parsing():
    now = 1_700_000_000_000
    f = F.parse({"range": "24h", "customer": "acme", "outcome": "timeout"}, now=now)
    assert f.flt.since_ms == now - 24 * 3_600_000 and f.flt.until_ms == 0
    assert dict(f.flt.owners) == {"customer": "acme"} and f.flt.outcomes == (3,)
    aligned = F.parse({"range": "24h"}, now=now, align_hours=True)
    assert aligned.flt.since_ms % 3_600_000 == 0 and aligned.flt.since_ms <= now - 86_400_000
    f = F.parse({"from": "2023-11-14T22:13", "until": "2023-11-15T00:00"})
    assert f.flt.since_ms == 1_699_999_980_000 and f.flt.until_ms == 1_700_006_400_000
    assert F.parse({}, default_range="30d", now=now).flt.since_ms == now - 30 * 86_400_000
    assert F.parse({"range": ""}, default_range="30d", now=now).flt.since_ms == 0
    assert "range=" in F.parse({"range": ""}).query()  # "all time" survives a link


@pytest.mark.parametrize("query, field", [
    ({"range": "2y"}, "range"),
    ({"from": "2023-13-01T00:00"}, "from"),
    ({"from": "next tuesday"}, "from"),
    ({"evidence": "signed"}, "evidence"),
    ({"from": "2023-01-02T00:00", "until": "2023-01-01T00:00"}, "until"),
    ({"customer": "x" * 300}, "customer"),
])
def test_filter_errors_name_the_field(query, field):
    with pytest.raises(F.FilterError) as exc:
        F.parse(query)
    assert exc.value.field == field


# --- charts ------------------------------------------------------------------------


def test_nice_steps_and_axis():
    assert svg.nice_step(10) == 5
    assert svg.nice_step(7) == 2
    assert svg.nice_step(1_000_000) == 500_000
    assert svg.nice_step(1) == 1
    assert svg.axis(0, 9, empty_hi=1) == [0, 5, 10]
    assert svg.axis(-3, 9, empty_hi=1) == [-5, 0, 5, 10]
    assert svg.axis(0, 0, empty_hi=10_000_000) == [0, 5_000_000, 10_000_000]
    ticks = svg.axis(0, 1_590_000, empty_hi=1)
    assert ticks[0] == 0 and ticks[-1] >= 1_590_000 and len(ticks) <= 6


def test_bar_chart_bars_are_proportional_and_escaped():
    items = [("acme", 400), ("<script>x</script>", 200), ("", 100)]
    root = parse(svg.bar_chart(items, title="Cost by customer", fmt=fmt.usd))
    bars = root.findall(f".//{NS}rect")
    assert [int(b.get("data-value")) for b in bars] == [400, 200, 100]
    widths = [float(b.get("width")) for b in bars]
    assert widths[0] == pytest.approx(2 * widths[1], rel=0.01)
    assert widths[1] == pytest.approx(2 * widths[2], rel=0.02)
    labels = [t.text for t in root.findall(f".//{NS}text") if t.get("class") == "bar-label"]
    assert labels == ["acme", "<script>x</script>", "(none)"]
    assert "<script>" not in str(svg.bar_chart(items, title="t"))  # escaped in markup
    values = [t.text for t in root.findall(f".//{NS}text") if t.get("class") == "bar-value"]
    assert values == [fmt.usd(400), fmt.usd(200), fmt.usd(100)]


def test_bar_chart_negative_values_grow_left_of_zero():
    root = parse(svg.bar_chart([("up", 300), ("down", -100)], title="Margin"))
    up, down = root.findall(f".//{NS}rect")
    zero = root.find(f".//{NS}line")
    assert zero is not None and "zero-line" in zero.get("class")
    zx = float(zero.get("x1"))
    assert float(up.get("x")) == pytest.approx(zx)
    assert float(down.get("x")) + float(down.get("width")) == pytest.approx(zx, abs=0.2)
    assert "negative" in down.get("class")


def test_empty_charts_say_so():
    for markup in (svg.bar_chart([], title="x"), svg.time_series([], [], title="x")):
        root = parse(markup)
        assert "No spend" in "".join(root.itertext())


def test_time_series_points_follow_the_values():
    buckets = [("d1", {"cost": 0, "margin": 5}), ("d2", {"cost": 10, "margin": -5}),
               ("d3", {"cost": 20, "margin": 0})]
    root = parse(svg.time_series(buckets, [("cost", "Cost", "series-cost"),
                                           ("margin", "Margin", "series-margin")],
                                 title="Cost", fmt=str))
    cost = [c for c in root.findall(f".//{NS}circle") if "series-cost" in c.get("class")]
    margin = [c for c in root.findall(f".//{NS}circle") if "series-margin" in c.get("class")]
    assert [int(c.get("data-value")) for c in cost] == [0, 10, 20]
    ys = [float(c.get("cy")) for c in cost]
    assert ys[0] > ys[1] > ys[2]  # higher value, higher on the page (smaller y)
    assert ys[0] - ys[1] == pytest.approx(ys[1] - ys[2], abs=0.2)  # 0.1 px rounding
    xs = [float(c.get("cx")) for c in cost]
    assert xs[1] - xs[0] == pytest.approx(xs[2] - xs[1], abs=0.2)
    # Negative margin is below the zero line.
    zero_y = [float(line.get("y1")) for line in root.findall(f".//{NS}line")
              if "zero-line" in line.get("class")][0]
    assert float(margin[1].get("cy")) > zero_y > float(margin[0].get("cy"))
    # The margin line is drawn twice, clipped at zero: its part below zero (and the
    # point there) in the below-zero class (red), never in the margin's green.
    lines = {p.get("class"): p for p in root.findall(f".//{NS}polyline")}
    assert set(lines) == {"line series-cost", "line series-margin",
                          "line series-margin below-zero"}
    below = lines["line series-margin below-zero"].get("clip-path")
    (clip,) = [c for c in root.findall(f".//{NS}clipPath") if f"url(#{c.get('id')})" == below]
    assert float(clip.find(f"{NS}rect").get("y")) == pytest.approx(zero_y, abs=0.1)
    assert "below-zero" in margin[1].get("class") and "below-zero" not in margin[0].get("class")
    assert "below-zero" not in " ".join(c.get("class") for c in cost)


def test_time_series_without_negative_values_has_no_red_part():
    buckets = [("d1", {"cost": 1, "margin": 5}), ("d2", {"cost": 10, "margin": 0})]
    markup = str(svg.time_series(buckets, [("cost", "Cost", "series-cost"),
                                           ("margin", "Margin", "series-margin")],
                                 title="t"))
    assert "below-zero" not in markup and "clipPath" not in markup


def test_time_series_x_labels_never_crowd():
    buckets = [(f"2026-01-{i:02d}", {"cost": i}) for i in range(1, 32)]
    root = parse(svg.time_series(buckets, [("cost", "Cost", "series-cost")], title="t"))
    xt = [t for t in root.findall(f".//{NS}text") if "x-tick" in (t.get("class") or "")]
    assert xt[-1].text == "2026-01-31"  # the latest bucket is always labelled
    xs = [float(t.get("x")) for t in xt]
    gaps = [b - a for a, b in zip(xs, xs[1:])]
    assert min(gaps) >= 7 * len("2026-01-31")  # no two labels overlap


def test_usage_bar():
    root = parse(svg.usage_bar(500, 250, 1000, soft_limit=800, width=200))
    rects = {r.get("class"): r for r in root.findall(f".//{NS}rect")}
    assert float(rects["used"].get("width")) == pytest.approx(100)
    assert float(rects["held"].get("width")) == pytest.approx(50)
    assert float(rects["held"].get("x")) == pytest.approx(100)
    assert float(root.find(f".//{NS}line").get("x1")) == pytest.approx(160)
    over = parse(svg.usage_bar(900, 300, 1000, width=200))
    assert "over" in over.get("class")
    rects = {r.get("class"): r for r in over.findall(f".//{NS}rect")}
    assert float(rects["used"].get("width")) + float(rects["held"].get("width")) <= 200.01
