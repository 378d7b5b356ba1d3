"""The dashboard in a real browser: headless Chromium (Debian's `chromium`) driven by
Playwright. Sign in, filter, open an event, compare what is shown with the store's
rows, watch a new event appear without a reload, and save a screenshot of every page
under tests/dashboard/artifacts/.

Skipped (with the reason) when Playwright or /usr/bin/chromium is missing, unless
CI=true: then missing tools fail the run. Never `playwright install`: the browser is
the system's.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest

from p402_server.dashboard.fmt import column_places, tokens, usd

from dash_harness import close, seed, _start

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = os.environ.get("P402_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]


def _missing() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install '.[browser]')"
    if not (os.path.exists(CHROMIUM) or shutil.which(CHROMIUM)):
        return f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    return None


@pytest.fixture
async def browser():
    reason = _missing()
    if reason:
        if IN_CI:
            pytest.fail(f"CI=true requires the browser tests: {reason}")
        pytest.skip(reason)
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def page(browser, tmp_path):
    d = await _start(tmp_path, poll_ms=300)
    await seed(d)
    ctx = await browser.new_context(viewport={"width": 1440, "height": 1000})
    pg = await ctx.new_page()
    pg.set_default_timeout(10_000)
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.p402 = d
    pg.js_errors = errors
    try:
        yield pg
    finally:
        await ctx.close()
        await close(d)


async def shot(pg, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def open_filters(pg) -> None:
    """The filter panel is folded into a summary line; open it."""
    if await pg.get_attribute("details.filters", "open") is None:
        await pg.click("details.filters summary")


async def sign_in(pg, key: str) -> None:
    d = pg.p402
    await pg.goto(d.base + "/dashboard/")
    assert "/dashboard/signin" in pg.url
    await pg.fill("#api_key", key)
    await pg.click("button[type=submit]")
    await pg.wait_for_url(re.compile(r".*/dashboard/meter/events.*"))


async def test_sign_in_filter_open_event_and_check_against_the_ledger(page):
    pg, d = page, page.p402
    await pg.goto(d.base + "/dashboard/signin")
    await shot(pg, "01-signin")
    await sign_in(pg, d.a.read_key)
    await pg.wait_for_selector("#ledger-rows tr")
    await shot(pg, "02-events")

    # Every row of the page is an event of the ledger, newest first; the shown cost
    # is the stored cost, exactly.
    rows = await pg.query_selector_all("#ledger-rows tr")
    stored, _ = await d.store.query_events(d.a.tenant_id, None, page_size=100)
    assert [await r.get_attribute("data-event-id") for r in rows] == \
        [e.event_id for e in stored]
    places = column_places(e.cost_nanos for e in stored)
    for r, ev in zip(rows, stored):
        cost = await r.query_selector("td.money")
        assert await cost.inner_text() == usd(ev.cost_nanos, places)
        assert int(await cost.get_attribute("data-nanos")) == ev.cost_nanos
    # Tenant B's event is nowhere on A's page.
    assert "beta-secret-customer" not in await pg.content()

    # Filter by customer: only globex remains.
    await open_filters(pg)
    await pg.fill("input[name=customer]", "globex")
    await pg.click(".filters button[type=submit]")
    await pg.wait_for_url(re.compile(r".*customer=globex.*"))
    rows = await pg.query_selector_all("#ledger-rows tr")
    (globex,) = [e for e in stored if e.customer == "globex"]
    assert [await r.get_attribute("data-event-id") for r in rows] == [globex.event_id]
    await shot(pg, "03-events-filtered")

    # Filter by outcome through the select: only the timed-out first attempt.
    await pg.goto(d.base + "/dashboard/meter/events")
    await open_filters(pg)
    await pg.select_option("select[name=outcome]", "timeout")
    await pg.click(".filters button[type=submit]")
    await pg.wait_for_url(re.compile(r".*outcome=timeout.*"))
    ids = [await r.get_attribute("data-event-id")
           for r in await pg.query_selector_all("#ledger-rows tr")]
    assert ids == ["ev-first"]

    # Open the retry: every economic field equals the store's row.
    await pg.goto(d.base + "/dashboard/meter/events")
    await pg.click('tr[data-event-id="ev-retry"] td.time a')
    await pg.wait_for_url(re.compile(r".*/meter/events/ev-retry$"))
    ev = await d.store.get_event(d.a.tenant_id, "ev-retry")
    for name in ("cost_nanos", "estimated_cost_nanos", "overrun_nanos", "revenue_nanos"):
        cell = await pg.query_selector(f'dd[data-field="{name}"]')
        assert await cell.inner_text() == usd(getattr(ev, name)), name
    for name in ("input_tokens", "output_tokens", "cached_input_tokens"):
        cell = await pg.query_selector(f'dd[data-field="{name}"]')
        assert await cell.inner_text() == tokens(getattr(ev, name)), name
    assert await pg.inner_text('dd[data-field="model"]') == ev.model
    assert await pg.inner_text('dd[data-field="catalog_version"]') == ev.catalog_version
    assert await pg.inner_text('dd[data-field="customer"]') == "acme"
    assert await pg.inner_text('dd[data-field="retry_of"]') == "ev-first"
    assert await pg.inner_text('dd[data-field="seq"]') == str(ev.seq)
    budget_row = await pg.query_selector('#event-budgets tr[data-budget-id="acme-month"]')
    assert budget_row is not None
    assert "ev-first" in await pg.inner_text("#retry-chain")
    await shot(pg, "04-event-detail")

    # The retry chain links back to the first attempt.
    await pg.click('dd[data-field="retry_of"] a')
    await pg.wait_for_url(re.compile(r".*/meter/events/ev-first$"))
    assert await pg.inner_text('dd[data-field="attempt"]') == "1"
    assert pg.js_errors == []


async def test_a_new_event_appears_without_a_reload(page):
    pg, d = page, page.p402
    await sign_in(pg, d.a.read_key)
    await pg.wait_for_selector("#ledger-rows tr")
    # A marker on the window survives only if the page is not reloaded.
    await pg.evaluate("window.__p402_marker = 42")
    before = len(await pg.query_selector_all("#ledger-rows tr"))
    new_id = await d.record(d.a, customer="newco", event_id="ev-live-1")
    await d.record(d.b, customer="beta-secret-customer", event_id="ev-live-b")
    row = await pg.wait_for_selector(f'#ledger-rows tr[data-event-id="{new_id}"]',
                                     timeout=10_000)
    assert await pg.evaluate("window.__p402_marker") == 42
    rows = await pg.query_selector_all("#ledger-rows tr")
    assert len(rows) == before + 1
    assert await rows[0].get_attribute("data-event-id") == new_id  # on top
    ev = await d.store.get_event(d.a.tenant_id, new_id)
    # Exact, in the decimals of the column already on the page (so it lines up).
    shown = await (await row.query_selector("td.money")).inner_text()
    before_text = await (await rows[1].query_selector("td.money")).inner_text()
    places = max(len(before_text.split(".")[1]), column_places([ev.cost_nanos]))
    assert shown == usd(ev.cost_nanos, places)
    # The other tenant's concurrent event never shows up.
    await asyncio.sleep(1.0)
    assert await pg.query_selector('tr[data-event-id="ev-live-b"]') is None
    await shot(pg, "05-events-live")
    assert pg.js_errors == []


async def test_spend_page_shows_the_ledger_totals_and_budgets(page):
    pg, d = page, page.p402
    await sign_in(pg, d.a.read_key)
    await pg.goto(d.base + "/dashboard/spend")
    (total,), _ = await d.store.query_spend(d.a.tenant_id, None, [])
    await pg.reload()
    cost = await pg.query_selector("#totals .money")
    assert int(await cost.get_attribute("data-nanos")) == total.cost_nanos
    assert await cost.inner_text() == usd(total.cost_nanos)
    assert await pg.query_selector("svg.time-series") is not None
    bars = await pg.query_selector_all("#by-customer svg .bar")
    assert len(bars) == 3  # acme, globex, initech
    # Budget: committed, held and left as the engine has them.
    rt = await d.server.runtime.get(d.a.tenant_id)
    (st,) = [s for s in rt.engine.budget_status() if s.budget_id == "acme-month"]
    row = '#budgets tr[data-budget-id="acme-month"]'
    for field, nanos in (("committed", st.committed_nanos), ("held", st.held_nanos),
                         ("left", st.remaining_nanos)):
        cell = f'{row} td[data-field="{field}"]'
        assert int(await pg.get_attribute(cell, "data-nanos")) == nanos
        assert await pg.inner_text(cell) == usd(nanos)  # one budget: its own decimals
    await shot(pg, "06-spend")
    assert pg.js_errors == []


async def test_meter_only_key_is_refused_in_the_browser(page):
    pg, d = page, page.p402
    await pg.goto(d.base + "/dashboard/signin")
    await pg.fill("#api_key", d.a.meter_key)
    await pg.click("button[type=submit]")
    alert = await pg.wait_for_selector(".alert.error")
    assert "scope meter only" in await alert.inner_text()
    await shot(pg, "07-signin-meter-key")


# ---------------------------------------------------------------- layout at two widths

NEG = "rgb(192, 57, 43)"  # --neg in dashboard.css


@pytest.fixture(params=[800, 1440], ids=lambda w: f"{w}px")
async def sized(browser, tmp_path, request):
    """A signed-in page at 800 or 1440 px wide (900 px high), over the seed plus a
    call with a large cost and no revenue (today's margin is negative)."""
    width = request.param
    d = await _start(tmp_path)
    await seed(d)
    await d.record(d.a, customer="bigspender", feature="batch", input_tokens=200_000,
                   output_tokens=0)
    ctx = await browser.new_context(viewport={"width": width, "height": 900})
    pg = await ctx.new_page()
    pg.set_default_timeout(10_000)
    pg.p402, pg.width = d, width
    try:
        await sign_in(pg, d.a.read_key)
        yield pg
    finally:
        await ctx.close()
        await close(d)


async def test_ledger_fits_the_width_with_aligned_costs_and_folded_filters(sized):
    pg, d, width = sized, sized.p402, sized.width
    await pg.wait_for_selector("#ledger-rows tr")
    await shot(pg, f"10-events-{width}px")
    # Nothing is cut off: the page and the table card need no horizontal scroll.
    assert await pg.evaluate("document.documentElement.scrollWidth") <= width
    card = await pg.query_selector(".table-card")
    assert await card.evaluate("c => c.scrollWidth <= c.clientWidth")
    costs = await pg.query_selector_all("#ledger-rows td.money")
    boxes = [await c.bounding_box() for c in costs]
    assert all(b["x"] + b["width"] <= width for b in boxes)
    # Aligned: the same decimals in every cost, and the same right edge.
    texts = [await c.inner_text() for c in costs]
    assert len({len(t.split(".")[1]) for t in texts}) == 1, texts
    assert max(b["x"] + b["width"] for b in boxes) - min(b["x"] + b["width"]
                                                         for b in boxes) < 1
    # The filter panel is folded to one line (≤ 10 % of the screen's height) …
    panel = await (await pg.query_selector("details.filters")).bounding_box()
    assert panel["height"] <= 90, panel
    assert "Last 30 days" in await pg.inner_text("#filter-summary")
    # … and opens on a click.
    await open_filters(pg)
    assert await pg.is_visible("input[name=customer]")
    await shot(pg, f"11-events-filters-open-{width}px")
    if width <= 1100:  # narrow: the optional columns are left to the event page
        assert not await pg.is_visible("th.opt")
    else:
        assert await pg.is_visible("th.opt")


async def test_spend_chart_fills_its_card_and_a_negative_margin_is_red(sized):
    pg, d, width = sized, sized.p402, sized.width
    await pg.goto(d.base + "/dashboard/spend")
    chart = await pg.query_selector(".chart-card svg.time-series >> visible=true")
    card = await pg.query_selector(".chart-card")
    chart_w = (await chart.bounding_box())["width"]
    inner_w = await card.evaluate(
        "c => c.clientWidth - parseFloat(getComputedStyle(c).paddingLeft)"
        " - parseFloat(getComputedStyle(c).paddingRight)")
    assert chart_w >= 0.95 * inner_w, (chart_w, inner_w)
    # Its text stays readable: tick labels at least 10 px on the screen.
    tick = await chart.query_selector("text.tick")
    assert (await tick.bounding_box())["height"] >= 10
    assert await pg.evaluate("document.documentElement.scrollWidth") <= width
    # Today's margin is negative: its point and its part of the line are red.
    (total,), _ = await d.store.query_spend(d.a.tenant_id, None, [])
    assert total.margin_nanos < 0
    point = await chart.query_selector("circle.point.series-margin.below-zero")
    assert await point.evaluate("p => getComputedStyle(p).fill") == NEG
    below = await chart.query_selector("polyline.series-margin.below-zero")
    assert await below.evaluate("p => getComputedStyle(p).stroke") == NEG
    above = await chart.query_selector("polyline.series-margin:not(.below-zero)")
    assert await above.evaluate("p => getComputedStyle(p).stroke") != NEG
    # No panel for a dimension nobody used; the others have no "(none)"-only table.
    assert await pg.query_selector("#by-department") is None
    assert "department" in await pg.inner_text("#unused-dims")
    await shot(pg, f"12-spend-{width}px")
