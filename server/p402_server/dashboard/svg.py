"""Server-side SVG charts: horizontal bars and a time series, as inline markup.

Owns the chart geometry. Charts are drawn on the server so the dashboard works
offline and under a strict Content-Security-Policy (no script, no CDN, no inline
``style`` attributes: colours come from classes in dashboard.css). Values are ints
(nano-USD or counts); axis ticks are chosen in integer arithmetic (1, 2 or 5 × 10^k
of the unit), so tick labels are exact amounts. Only pixel positions are floats.
Every label is escaped; each bar and point carries a ``<title>`` with its exact
value (the browser shows it on hover).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

from markupsafe import Markup, escape

Formatter = Callable[[int], str]


def nice_step(span: int, target_steps: int = 4) -> int:
    """The smallest 1/2/5 × 10^k integer step that covers ``span`` in at most
    ``target_steps`` steps (span ≥ 1)."""
    span = max(1, int(span))
    raw = -(-span // target_steps)  # ceil
    magnitude = 1
    while magnitude * 10 <= raw:
        magnitude *= 10
    for mult in (1, 2, 5, 10):
        if mult * magnitude >= raw:
            return mult * magnitude
    return 10 * magnitude  # pragma: no cover - the loop always returns


def axis(lo: int, hi: int, *, empty_hi: int, target_steps: int = 4) -> list[int]:
    """Tick values from ≤ min(lo, 0) to ≥ max(hi, 0) on a nice step. All-zero data
    gets the axis 0…``empty_hi`` so the chart still has a readable scale."""
    lo, hi = min(int(lo), 0), max(int(hi), 0)
    if lo == hi == 0:
        hi = empty_hi
    step = nice_step(hi - lo, target_steps)
    start = -(-lo // step) * step if lo >= 0 else (lo // step) * step
    end = -(-hi // step) * step
    return list(range(start, end + step, step))


def _f(x: float) -> str:
    return f"{x:.1f}"


def _empty(width: int, height: int, title: str, message: str) -> Markup:
    return Markup(
        f'<svg class="chart chart-empty" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>"
        f'<text class="chart-note" x="{width // 2}" y="{height // 2}" '
        f'text-anchor="middle">{escape(message)}</text></svg>'
    )


def bar_chart(items: Sequence[tuple[str, int]], *, title: str, fmt: Formatter = str,
              width: int = 640, row_height: int = 26, label_width: int = 170,
              value_width: int = 130, css_class: str = "series-cost",
              empty_message: str = "No spend in this range") -> Markup:
    """Horizontal bars, one per (label, value), in the order given.

    The bar area spans min(0, values)…max(0, values), so negative values (a
    negative margin) grow left of the zero line in the ``negative`` class."""
    if not items:
        return _empty(width, 60, title, empty_message)
    values = [int(v) for _, v in items]
    lo, hi = min(0, *values), max(0, *values)
    span = (hi - lo) or 1
    area = width - label_width - value_width - 10
    zero_x = label_width + area * (-lo) / span
    height = row_height * len(items) + 8
    out = [
        f'<svg class="chart bar-chart" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for i, ((label, _), value) in enumerate(zip(items, values)):
        y = 4 + i * row_height
        w = area * abs(value) / span
        x = zero_x - w if value < 0 else zero_x
        cls = "bar negative" if value < 0 else f"bar {css_class}"
        text = escape(fmt(value))
        shown = str(label) if label != "" else "(none)"
        if len(shown) > 24:
            shown = shown[:23] + "…"
        out.append(
            f'<g class="bar-row"><title>{escape(label or "(none)")}: {text}</title>'
            f'<text class="bar-label" x="{label_width - 8}" y="{y + row_height * 0.65:.1f}" '
            f'text-anchor="end">{escape(shown)}</text>'
            f'<rect class="{cls}" x="{_f(x)}" y="{y + 3}" width="{_f(max(w, 1.0 if value else 0.0))}" '
            f'height="{row_height - 8}" rx="2" data-value="{value}"/>'
            f'<text class="bar-value" x="{width - 4}" y="{y + row_height * 0.65:.1f}" '
            f'text-anchor="end">{text}</text></g>'
        )
    if lo < 0:
        out.append(f'<line class="zero-line" x1="{_f(zero_x)}" y1="2" x2="{_f(zero_x)}" '
                   f'y2="{height - 2}"/>')
    out.append("</svg>")
    return Markup("".join(out))


def time_series(buckets: Sequence[tuple[str, dict[str, int]]],
                series: Sequence[tuple[str, str, str]], *, title: str,
                fmt: Formatter = str, empty_hi: int = 10_000_000, width: int = 1100,
                height: int = 280, empty_message: str = "No spend in this range",
                uid: str = "ts") -> Markup:
    """Lines over evenly spaced time buckets, drawn wide (the page scales the SVG to
    its card's width).

    ``buckets``: (label, {series_key: value}) in time order (missing buckets filled
    by the caller, so gaps read as zero, not as a straight line over them);
    ``series``: (key, legend label, css class). ``empty_hi`` is the axis top when
    every value is 0 (default 1 cent in nano-USD). A series' part below zero (a
    negative margin) is drawn in the ``below-zero`` class (red), clipped at the
    zero line; ``uid`` keeps the clip paths' ids unique on a page."""
    if not buckets:
        return _empty(width, 80, title, empty_message)
    label_px = 7 * max(len(b[0]) for b in buckets) + 12
    # Room on the right for half of the last x label (centred on its bucket).
    left, right, top, bottom = 104, max(16, label_px // 2), 28, 36
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [int(b[1].get(k, 0)) for b in buckets for k, _, _ in series]
    ticks = axis(min(values), max(values), empty_hi=empty_hi)
    y_lo, y_hi = ticks[0], ticks[-1]

    def y_of(v: int) -> float:
        return top + plot_h * (y_hi - v) / (y_hi - y_lo)

    n = len(buckets)

    def x_of(i: int) -> float:
        return left + (plot_w * (i + 0.5) / n)

    out = [
        f'<svg class="chart time-series" role="img" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(title)}</title>",
    ]
    for t in ticks:
        y = y_of(t)
        cls = "grid zero-line" if t == 0 else "grid"
        out.append(f'<line class="{cls}" x1="{left}" y1="{_f(y)}" x2="{width - right}" '
                   f'y2="{_f(y)}"/><text class="tick" x="{left - 6}" y="{_f(y + 4)}" '
                   f'text-anchor="end">{escape(fmt(t))}</text>')
    # Labels never overlap: one every `every` buckets, counted back from the last
    # (the most recent bucket is the one a reader looks for).
    every = max(1, -(-label_px * n // plot_w))
    for i, (label, _) in enumerate(buckets):
        if (n - 1 - i) % every == 0:
            out.append(f'<text class="tick x-tick" x="{_f(x_of(i))}" y="{height - 12}" '
                       f'text-anchor="middle">{escape(label)}</text>')
    zero_y = y_of(0)
    negative = [key for key, _, _ in series
                if any(int(b[1].get(key, 0)) < 0 for b in buckets)]
    if negative:
        out.append(f'<defs><clipPath id="{uid}-above"><rect x="0" y="0" width="{width}" '
                   f'height="{_f(zero_y)}"/></clipPath><clipPath id="{uid}-below">'
                   f'<rect x="0" y="{_f(zero_y)}" width="{width}" '
                   f'height="{_f(height - zero_y)}"/></clipPath></defs>')
    for key, name, cls in series:
        pts = [(x_of(i), y_of(int(b[1].get(key, 0)))) for i, b in enumerate(buckets)]
        if n > 1:
            line = " ".join(f"{_f(x)},{_f(y)}" for x, y in pts)
            if key in negative:
                out.append(f'<polyline class="line {cls}" fill="none" '
                           f'clip-path="url(#{uid}-above)" points="{line}"/>'
                           f'<polyline class="line {cls} below-zero" fill="none" '
                           f'clip-path="url(#{uid}-below)" points="{line}"/>')
            else:
                out.append(f'<polyline class="line {cls}" fill="none" points="{line}"/>')
        for (x, y), (label, vals) in zip(pts, buckets):
            v = int(vals.get(key, 0))
            below = " below-zero" if v < 0 else ""
            out.append(f'<circle class="point {cls}{below}" cx="{_f(x)}" cy="{_f(y)}" '
                       f'r="3" data-value="{v}"><title>{escape(label)} · {escape(name)}: '
                       f'{escape(fmt(v))}</title></circle>')
    # Legend, top right (a series that goes below zero also shows its red part).
    legend = [(key, name, cls) for key, name, cls in series]
    legend += [(key, f"{name} < 0", f"{cls} below-zero") for key, name, cls in series
               if key in negative]
    lx = width - right
    for key, name, cls in reversed(legend):
        text_w = 8 * len(name) + 22
        lx -= text_w
        out.append(f'<rect class="legend {cls}" x="{lx}" y="8" width="12" height="12" rx="2"/>'
                   f'<text class="legend-label" x="{lx + 16}" y="18">{escape(name)}</text>')
    out.append("</svg>")
    return Markup("".join(out))


def usage_bar(committed: int, held: int, limit: int, soft_limit: int = 0, *,
              width: int = 220, height: int = 14) -> Markup:
    """A budget's use: committed (solid) then held (hatched) on a track of `limit`,
    with a tick at the soft limit. Over the limit the bar is full and marked."""
    committed, held, limit = max(0, int(committed)), max(0, int(held)), int(limit)
    if limit <= 0:
        frac_c = 1.0 if committed else 0.0
        frac_h = 0.0
    else:
        frac_c = min(committed, limit) / limit
        frac_h = min(held, max(0, limit - committed)) / limit
    over = limit > 0 and committed + held > limit
    wc, wh = width * frac_c, width * frac_h
    parts = [
        f'<svg class="usage-bar{" over" if over else ""}" role="img" '
        f'viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f'<rect class="track" x="0" y="0" width="{width}" height="{height}" rx="3"/>',
        f'<rect class="used" x="0" y="0" width="{_f(wc)}" height="{height}" rx="3" '
        f'data-value="{committed}"/>',
        f'<rect class="held" x="{_f(wc)}" y="0" width="{_f(wh)}" height="{height}" '
        f'data-value="{held}"/>',
    ]
    if 0 < soft_limit < limit:
        x = width * soft_limit / limit
        parts.append(f'<line class="soft" x1="{_f(x)}" y1="0" x2="{_f(x)}" y2="{height}"/>')
    parts.append("</svg>")
    return Markup("".join(parts))


__all__ = ["bar_chart", "time_series", "usage_bar", "nice_step", "axis"]
