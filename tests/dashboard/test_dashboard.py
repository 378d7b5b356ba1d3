"""The dashboard over HTTP (aiohttp client on 127.0.0.1 against a real server):
sign-in, CSRF, cookie flags, tenant isolation, scopes, revocation, the live JSON
endpoint, exports and the content rule."""
from __future__ import annotations

import asyncio
import csv
import io
import json
import re

import aiohttp
import pytest
from p402.v1 import admin_pb2

from p402_server.ledger import evidence
from p402_server.dashboard.fmt import usd
from p402_server.ledger import EventFilter, LedgerEvent

from dash_harness import _start, close, csrf_of, md, seed, sign_in

def _set_cookie(resp: aiohttp.ClientResponse, name: str) -> str:
    for value in resp.headers.getall("Set-Cookie", []):
        if value.startswith(name + "="):
            return value
    raise AssertionError(f"no Set-Cookie for {name}: {resp.headers.getall('Set-Cookie', [])}")


async def _key_id(store, tenant_id: str, key: str) -> str:
    (k,) = [k for k in await store.list_keys(tenant_id) if key.startswith(k.prefix)
            and not k.revoked]
    return k.key_id


# --- sign-in -----------------------------------------------------------------------


async def test_pages_redirect_to_sign_in_when_signed_out(dash, http):
    async with http.get(dash.base + "/dashboard/meter/events?customer=acme",
                        allow_redirects=False) as r:
        assert r.status == 303
        assert r.headers["Location"].startswith("/dashboard/signin?next=")
    async with http.get(dash.base + "/dashboard/api/events?after_seq=0") as r:
        assert r.status == 401 and (await r.json())["error"] == "signed out"


async def test_sign_in_sets_a_session_cookie_with_safe_flags(dash, http):
    async with http.get(dash.base + "/dashboard/signin") as r:
        token = csrf_of(await r.text())
        signin_cookie = _set_cookie(r, "p402_signin")
    assert "HttpOnly" in signin_cookie and "SameSite=Strict" in signin_cookie
    resp = await http.post(dash.base + "/dashboard/signin", allow_redirects=False,
                           data={"csrf": token, "api_key": dash.a.read_key,
                                 "next": "/dashboard/spend"})
    assert resp.status == 303 and resp.headers["Location"] == "/dashboard/spend"
    cookie = _set_cookie(resp, "p402_session")
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain http, secure_cookies auto
    # The cookie is a random id: neither the key nor the tenant is in it.
    value = cookie.split(";", 1)[0].split("=", 1)[1]
    assert len(value) >= 40 and dash.a.read_key not in cookie and dash.a.tenant_id not in cookie
    async with http.get(dash.base + "/dashboard/meter/events") as r:
        assert r.status == 200 and "Acme Corp" in await r.text()


async def test_secure_cookies_when_configured(tmp_path):
    d = await _start(tmp_path, secure_cookies=True)
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            async with http.get(d.base + "/dashboard/signin") as r:
                assert "Secure" in _set_cookie(r, "p402_signin")
                token = csrf_of(await r.text())
            # A client does not send a Secure cookie back over http: as a browser
            # behind a TLS proxy would, send it by hand.
            resp = await http.post(d.base + "/dashboard/signin", allow_redirects=False,
                                   headers={"Cookie": f"p402_signin={token}"},
                                   data={"csrf": token, "api_key": d.a.read_key})
            assert resp.status == 303
            assert "Secure" in _set_cookie(resp, "p402_session")
    finally:
        await close(d)


async def test_sign_in_without_or_with_a_wrong_csrf_token_is_refused(dash, http):
    async with http.get(dash.base + "/dashboard/signin") as r:
        token = csrf_of(await r.text())
    for data in ({"api_key": dash.a.read_key},
                 {"api_key": dash.a.read_key, "csrf": token[:-2] + "xx"}):
        async with http.post(dash.base + "/dashboard/signin", data=data,
                             allow_redirects=False) as r:
            assert r.status == 403
            assert "expired or came from another site" in await r.text()
            assert not any(v.startswith("p402_session=") and "p402_session=;" not in v
                           for v in r.headers.getall("Set-Cookie", []))


async def test_sign_in_from_a_foreign_origin_is_refused(dash, http):
    async with http.get(dash.base + "/dashboard/signin") as r:
        token = csrf_of(await r.text())
    async with http.post(dash.base + "/dashboard/signin", allow_redirects=False,
                         headers={"Origin": "http://evil.example"},
                         data={"csrf": token, "api_key": dash.a.read_key}) as r:
        assert r.status == 403


async def test_meter_only_key_cannot_sign_in(dash, http):
    resp = await sign_in(http, dash.base, dash.a.meter_key, expect=403)
    text = await resp.text()
    assert "scope meter only" in text and "read or admin" in text
    async with http.get(dash.base + "/dashboard/meter/events", allow_redirects=False) as r:
        assert r.status == 303  # still signed out


async def test_unknown_key_cannot_sign_in(dash, http):
    resp = await sign_in(http, dash.base, "p402_" + "x" * 40, expect=401)
    assert "Unknown or revoked API key" in await resp.text()


async def test_next_is_only_followed_within_the_dashboard(dash, http):
    for nxt in ("https://evil.example/", "//evil.example/x", "/elsewhere"):
        async with http.get(dash.base + "/dashboard/signin") as r:
            token = csrf_of(await r.text())
        resp = await http.post(dash.base + "/dashboard/signin", allow_redirects=False,
                               data={"csrf": token, "api_key": dash.a.read_key, "next": nxt})
        assert resp.headers["Location"] == "/dashboard/meter/events", nxt


async def test_sign_out_needs_the_session_csrf_token_and_ends_the_session(dash, http):
    await sign_in(http, dash.base, dash.a.read_key)
    async with http.get(dash.base + "/dashboard/meter/events") as r:
        token = csrf_of(await r.text())
    async with http.post(dash.base + "/dashboard/signout", data={"csrf": "wrong"},
                         allow_redirects=False) as r:
        assert r.status == 403
    async with http.get(dash.base + "/dashboard/meter/events", allow_redirects=False) as r:
        assert r.status == 200  # a forged sign-out changed nothing
    async with http.post(dash.base + "/dashboard/signout", data={"csrf": token},
                         allow_redirects=False) as r:
        assert r.status == 303 and "signed_out=1" in r.headers["Location"]
    async with http.get(dash.base + "/dashboard/meter/events", allow_redirects=False) as r:
        assert r.status == 303
    assert len(dash.server.dashboard.dashboard.sessions) == 0


async def test_revoked_key_is_signed_out_at_the_next_request(dash, http):
    await sign_in(http, dash.base, dash.a.read_key)
    async with http.get(dash.base + "/dashboard/meter/events", allow_redirects=False) as r:
        assert r.status == 200
    key_id = await _key_id(dash.store, dash.a.tenant_id, dash.a.read_key)
    await dash.admin.RevokeKey(admin_pb2.RevokeKeyRequest(key_id=key_id),
                               metadata=md(dash.a.admin_key))
    async with http.get(dash.base + "/dashboard/meter/events", allow_redirects=False) as r:
        assert r.status == 303 and "/dashboard/signin" in r.headers["Location"]
    async with http.get(dash.base + "/dashboard/api/events?after_seq=0") as r:
        assert r.status == 401
    # And it cannot sign in again.
    await sign_in(http, dash.base, dash.a.read_key, expect=401)


async def test_key_revoked_in_the_store_by_another_process_ends_the_session(dash, http):
    await sign_in(http, dash.base, dash.a.admin_key)
    key_id = await _key_id(dash.store, dash.a.tenant_id, dash.a.admin_key)
    assert await dash.store.revoke_key(dash.a.tenant_id, key_id)  # not through this server
    async with http.get(dash.base + "/dashboard/spend", allow_redirects=False) as r:
        assert r.status == 303


# --- isolation ---------------------------------------------------------------------


async def test_a_tenant_sees_none_of_another_tenants_events(dash, http):
    await sign_in(http, dash.base, dash.b.read_key)
    async with http.get(dash.base + "/dashboard/meter/events") as r:
        page = await r.text()
    assert "beta-secret-customer" in page and "Beta LLC" in page
    for ev_id in dash.a.event_ids:
        assert ev_id not in page
    assert "acme" not in page and "globex" not in page
    async with http.get(dash.base + "/dashboard/api/events?after_seq=0") as r:
        data = await r.json()
    assert [e["event_id"] for e in data["events"]] == ["ev-beta-only"]
    async with http.get(dash.base + "/dashboard/export?format=jsonl") as r:
        lines = [json.loads(x) for x in (await r.text()).splitlines()]
    assert [x["event_id"] for x in lines[:-1]] == ["ev-beta-only"]
    assert lines[-1]["digest"]["tenant_id"] == dash.b.tenant_id
    async with http.get(dash.base + "/dashboard/spend") as r:
        spend = await r.text()
    assert "globex" not in spend and "acme-month" not in spend


async def test_another_tenants_event_id_is_not_found(dash, http):
    await sign_in(http, dash.base, dash.b.admin_key)
    for ev_id in ("ev-first", "ev-retry", dash.a.event_ids[-1]):
        async with http.get(dash.base + f"/dashboard/meter/events/{ev_id}") as r:
            assert r.status == 404
            assert "acme" not in await r.text()
    async with http.get(dash.base + "/dashboard/meter/events/ev-beta-only") as r:
        assert r.status == 200


# --- pages -------------------------------------------------------------------------


async def test_events_page_lists_the_ledger_newest_first_and_paginates(dash, http):
    for i in range(55):  # with the 4 seeded: two pages of 50
        await dash.record(dash.a, customer=f"bulk-{i:02d}", event_id=f"bulk-{i:02d}")
    await sign_in(http, dash.base, dash.a.read_key)
    async with http.get(dash.base + "/dashboard/meter/events") as r:
        page1 = await r.text()
    ids1 = re.findall(r'data-event-id="([^"]+)"', page1)
    stored, token = await dash.store.query_events(dash.a.tenant_id, None, page_size=50)
    assert ids1 == [e.event_id for e in stored] and ids1[0] == "bulk-54"
    nxt = re.search(r'href="([^"]+)" rel="next"', page1).group(1).replace("&amp;", "&")
    assert "page_token=" in nxt
    async with http.get(dash.base + nxt) as r:
        page2 = await r.text()
    ids2 = re.findall(r'data-event-id="([^"]+)"', page2)
    assert len(ids1) + len(ids2) == 59 and not set(ids1) & set(ids2)
    assert ids2[-1] == "ev-first"  # the oldest, last
    assert 'rel="next"' not in page2 and "data-poll-url" not in page2  # no live on page 2


async def test_filters_become_store_filters(dash, http):
    await sign_in(http, dash.base, dash.a.read_key)
    cases = {
        "customer=acme": EventFilter(owners={"customer": "acme"}),
        "feature=search": EventFilter(owners={"feature": "search"}),
        "outcome=timeout": EventFilter(outcomes=(3,)),
        "evidence=reported&workflow=reports": EventFilter(owners={"workflow": "reports"},
                                                          evidences=(2,)),
        "decision=deny": EventFilter(decisions=(3,)),
        "model=gpt-4o-mini&provider=nope": EventFilter(models=("gpt-4o-mini",),
                                                       providers=("nope",)),
    }
    for q, flt in cases.items():
        async with http.get(dash.base + f"/dashboard/meter/events?{q}") as r:
            ids = re.findall(r'data-event-id="([^"]+)"', await r.text())
        stored, _ = await dash.store.query_events(dash.a.tenant_id, flt)
        assert ids == [e.event_id for e in stored], q
    assert ids == []  # the last case matches nothing, and says so


async def test_bad_filters_are_a_400_naming_the_field(dash, http):
    await sign_in(http, dash.base, dash.a.read_key)
    for q, field in (("outcome=exploded", "outcome"), ("from=yesterday", "from"),
                     ("range=1y", "range"),
                     ("from=2026-01-02T00:00&until=2026-01-01T00:00", "until")):
        async with http.get(dash.base + f"/dashboard/meter/events?{q}") as r:
            assert r.status == 400, q
            assert f"{field}:" in await r.text()
        async with http.get(dash.base + f"/dashboard/spend?{q}") as r:
            assert r.status == 400, q
    async with http.get(dash.base + "/dashboard/api/events?after_seq=-1") as r:
        assert r.status == 400 and (await r.json())["field"] == "after_seq"


async def test_live_endpoint_returns_only_newer_matching_events(dash, http):
    await sign_in(http, dash.base, dash.a.read_key)
    async with http.get(dash.base + "/dashboard/meter/events?customer=acme") as r:
        page = await r.text()
    poll = re.search(r'data-poll-url="([^"]+)"', page).group(1).replace("&amp;", "&")
    after = int(re.search(r'data-after-seq="(\d+)"', page).group(1))
    async with http.get(dash.base + poll + f"&after_seq={after}") as r:
        assert (await r.json())["count"] == 0
    await dash.record(dash.a, customer="globex", event_id="not-acme")
    new_id = await dash.record(dash.a, customer="acme", event_id="acme-new")
    await dash.record(dash.b, customer="acme", event_id="b-acme")  # same owner, other tenant
    async with http.get(dash.base + poll + f"&after_seq={after}") as r:
        data = await r.json()
    assert [e["event_id"] for e in data["events"]] == [new_id]
    ev = await dash.store.get_event(dash.a.tenant_id, new_id)
    assert data["last_seq"] == ev.seq
    assert data["events"][0]["cost_nanos"] == ev.cost_nanos
    assert f'data-event-id="{new_id}"' in data["rows_html"]
    assert usd(ev.cost_nanos) in data["rows_html"]
    async with http.get(dash.base + poll + f"&after_seq={data['last_seq']}") as r:
        assert (await r.json())["count"] == 0


async def test_event_detail_shows_the_stored_fields(dash, http):
    await sign_in(http, dash.base, dash.a.read_key)
    ev = await dash.store.get_event(dash.a.tenant_id, "ev-retry")
    async with http.get(dash.base + "/dashboard/meter/events/ev-retry") as r:
        page = await r.text()

    def field(name: str) -> str:
        m = re.search(rf'data-field="{name}"[^>]*>(.*?)</dd>', page, re.S)
        assert m, name
        return re.sub(r"<[^>]+>", "", m.group(1)).strip()

    assert field("cost_nanos") == usd(ev.cost_nanos)
    assert field("estimated_cost_nanos") == usd(ev.estimated_cost_nanos)
    assert field("revenue_nanos") == usd(ev.revenue_nanos) == "$0.005"
    assert field("margin_nanos") == usd(ev.revenue_nanos - ev.cost_nanos)
    assert field("catalog_version") == ev.catalog_version
    assert field("retry_of") == "ev-first" and field("attempt") == "2"
    assert field("seq") == str(ev.seq)
    assert 'data-budget-id="acme-month"' in page
    rt = await dash.server.runtime.get(dash.a.tenant_id)
    (st,) = [s for s in rt.engine.budget_status() if s.budget_id == "acme-month"]
    assert usd(st.remaining_nanos) in page and usd(st.committed_nanos) in page
    assert "privacy mode metadata only" in page  # no content, and why


async def test_content_only_for_admin_keys_when_the_privacy_mode_kept_it(dash, http):
    try:
        from p402_server.ledger.model import Content
    except ImportError:
        pytest.skip("the store has no content table in this build")
    from p402core._enums import PrivacyMode

    secret = '<script>alert("x")</script> card 4111'
    await dash.server.writer.write(LedgerEvent(
        tenant_id=dash.a.tenant_id, event_id="ev-content", customer="acme", model="m",
        privacy_mode=int(PrivacyMode.FULL_TRACE),
        contents=(Content(kind="prompt", text=secret, mode=int(PrivacyMode.FULL_TRACE)),)))
    await sign_in(http, dash.base, dash.a.read_key)
    async with http.get(dash.base + "/dashboard/meter/events/ev-content") as r:
        page = await r.text()
    assert "alert" not in page and "shown only to keys of scope admin" in page
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as admin:
        await sign_in(admin, dash.base, dash.a.admin_key)
        async with admin.get(dash.base + "/dashboard/meter/events/ev-content") as r:
            page = await r.text()
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; card 4111" in page
    assert "<script>alert" not in page  # escaped, never markup
    # An event recorded under metadata_only never shows content, even to admin.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as admin:
        await sign_in(admin, dash.base, dash.a.admin_key)
        async with admin.get(dash.base + "/dashboard/meter/events/ev-retry") as r:
            assert "Not kept" in await r.text()


async def test_spend_page_totals_and_groups_equal_the_store(dash, http):
    await sign_in(http, dash.base, dash.a.read_key)
    async with http.get(dash.base + "/dashboard/spend?range=") as r:
        page = await r.text()
    (total,), _ = await dash.store.query_spend(dash.a.tenant_id, None, [])
    assert f'data-nanos="{total.cost_nanos}">{usd(total.cost_nanos)}' in page
    assert f'data-nanos="{total.margin_nanos}"' in page
    rows, _ = await dash.store.query_spend(dash.a.tenant_id, None, ["customer"])
    section = page.split('id="by-customer"', 1)[1].split("</section>", 1)[0]
    assert section.count('class="bar series-cost"') == len(rows) == 3
    for row in rows:
        assert f'data-value="{row.cost_nanos}"' in section
    assert 'data-budget-id="acme-month"' in page


async def test_security_headers(dash, http):
    await sign_in(http, dash.base, dash.a.read_key)
    async with http.get(dash.base + "/dashboard/meter/events") as r:
        h = r.headers
    assert "script-src 'self'" in h["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in h["Content-Security-Policy"]
    assert h["X-Content-Type-Options"] == "nosniff" and h["Cache-Control"] == "no-store"
    async with http.get(dash.base + "/dashboard/static/dashboard.js") as r:
        assert r.status == 200 and "after_seq" in await r.text()


# --- exports -----------------------------------------------------------------------


def _download(text: str, fmt_name: str, tmp_path) -> tuple[list[dict], dict | None]:
    """A download read back as `p402 verify --file` reads it: (rows, digest)."""
    path = tmp_path / f"download.{fmt_name}"
    path.write_text(text, encoding="utf-8", newline="")
    _fmt, rows, digest = evidence.read_export(str(path))
    return rows, digest


async def test_csv_and_jsonl_exports_equal_the_ledger(dash, http, tmp_path):
    await sign_in(http, dash.base, dash.a.read_key)
    stored = [e async for e in dash.store.iter_events(dash.a.tenant_id)]
    async with http.get(dash.base + "/dashboard/export?format=csv&customer=acme") as r:
        assert r.headers["Content-Type"].startswith("text/csv")
        assert "attachment" in r.headers["Content-Disposition"]
        rows, digest = _download(await r.text(), "csv", tmp_path)
    acme = [e for e in stored if e.customer == "acme"]
    assert [x["event_id"] for x in rows] == [e.event_id for e in acme]
    assert digest["count"] == len(acme)
    for x, e in zip(rows, acme):
        assert int(x["cost_nanos"]) == e.cost_nanos
        assert x["cost_usd"] == f"{e.cost_nanos // 10**9}.{e.cost_nanos % 10**9:09d}"
        assert x["outcome"] in ("SUCCESS", "TIMEOUT")
    async with http.get(dash.base + "/dashboard/export?format=jsonl") as r:
        lines, digest = _download(await r.text(), "jsonl", tmp_path)
    assert [x["event_id"] for x in lines] == [e.event_id for e in stored]
    assert [x["revenue_nanos"] for x in lines] == [e.revenue_nanos for e in stored]
    async with http.get(dash.base + "/dashboard/export?format=xml") as r:
        assert r.status == 400


@pytest.mark.parametrize("fmt_name", ["csv", "jsonl", "focus"])
@pytest.mark.parametrize("query", ["", "&customer=globex"])
async def test_downloads_are_the_cli_export_and_verify(dash, http, tmp_path, capsys,
                                                       fmt_name, query):
    """A download has the CLI's columns, the hash chain (prev_chain_hash filled, also
    when filtered) and a signed digest: `p402 verify --file` says OK, as it is."""
    from p402_server.cli import main

    await sign_in(http, dash.base, dash.a.read_key)
    async with http.get(f"{dash.base}/dashboard/export?format={fmt_name}{query}") as r:
        assert r.status == 200
        text = await r.text()
    path = tmp_path / f"download.{fmt_name}"
    path.write_text(text, encoding="utf-8", newline="")
    if fmt_name == "csv":
        header = next(csv.reader(io.StringIO(text)))
        assert tuple(header) == tuple(evidence.CSV_COLUMNS)
    _fmt, rows, digest = evidence.read_export(str(path))
    assert rows and digest is not None
    assert all(x["prev_chain_hash"] for x in rows)
    stored = [e async for e in dash.store.iter_events(dash.a.tenant_id)]
    assert {x["chain_hash"] for x in rows} <= {e.chain_hash for e in stored}
    assert main(["verify", "--file", str(path)]) == 0, capsys.readouterr()
    assert capsys.readouterr().out.startswith("OK: ")
    # A changed amount is caught.
    path.write_text(text.replace(rows[0]["event_id"], rows[0]["event_id"] + "x", 1),
                    encoding="utf-8", newline="")
    assert main(["verify", "--file", str(path)]) == 1


async def test_export_refuses_when_signed_out(dash, http):
    async with http.get(dash.base + "/dashboard/export?format=csv",
                        allow_redirects=False) as r:
        assert r.status == 303


async def test_signin_page_and_static_work_without_a_session(tmp_path):
    d = await _start(tmp_path)
    try:
        await seed(d)
        async with aiohttp.ClientSession() as http:
            async with http.get(d.base + "/dashboard/static/dashboard.css") as r:
                assert r.status == 200
            async with http.get(d.base + "/dashboard/nope") as r:
                assert r.status in (303, 404)
    finally:
        await close(d)


# --- the server and the CLI ----------------------------------------------------------


async def test_the_dashboard_stops_with_the_server(tmp_path):
    d = await _start(tmp_path)
    port = d.server.http_port
    assert port > 0
    await close(d)
    with pytest.raises(OSError):
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()


def test_serve_http_flag_is_checked_before_anything_starts(capsys):
    from p402_server import cli

    assert cli.main(["serve", "--db", "sqlite://", "--http", "no-port"]) == 2
    assert "--http" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["serve", "--http", "127.0.0.1:4021",
                                          "--http-secure-cookies"])
    assert args.http == "127.0.0.1:4021" and args.http_secure_cookies
    assert cli.build_parser().parse_args(["serve"]).http is None


async def test_spend_page_hides_unused_dimensions_and_marks_missing_revenue(dash, http):
    await sign_in(http, dash.base, dash.a.read_key)
    async with http.get(dash.base + "/dashboard/spend") as r:
        page = await r.text()
    # The seed names no department, employee or task: no "(none)"-only panels.
    for dim in ("department", "employee"):
        assert f'id="by-{dim}"' not in page
    assert 'id="unused-dims"' in page and "department" in page.split('id="unused-dims"')[1]
    assert 'id="by-customer"' in page
    # globex reported no revenue: its revenue is marked, its margin is −cost.
    globex = page.split('id="by-customer"')[1].split("</section>")[0]
    row = [r for r in globex.split("<tr>") if "<td>globex</td>" in r][0]
    assert 'title="no revenue reported: counted as $0"' in row
    assert 'class="num money negative"' in row


async def test_every_page_opens_on_the_same_range(dash, http):
    await sign_in(http, dash.base, dash.a.read_key)
    for path in ("/dashboard/meter/events", "/dashboard/spend"):
        async with http.get(dash.base + path) as r:
            page = await r.text()
        assert '<option value="30d" selected>' in page, path
        assert 'id="filter-summary">Last 30 days<' in page
        assert "export?range=30d&amp;format=csv" in page


async def test_event_detail_shows_usage_units_and_the_service_tier(dash, http):
    from p402.v1 import common_pb2, meter_pb2

    r = await dash.meter.Record(meter_pb2.RecordRequest(
        event_id="ev-audio", model="gpt-audio", owners=common_pb2.Owners(customer="acme"),
        usage=common_pb2.Usage(input_tokens=1500, output_tokens=400, audio_input_tokens=1200,
                               audio_output_tokens=350, service_tier="priority")),
        metadata=md(dash.a.admin_key))
    await sign_in(http, dash.base, dash.a.read_key)
    async with http.get(dash.base + "/dashboard/meter/events/" + r.event_id) as resp:
        page = await resp.text()
    assert re.search(r'data-field="audio_input_tokens"[^>]*>1,200</dd>', page)
    assert re.search(r'data-field="audio_output_tokens"[^>]*>350</dd>', page)
    assert re.search(r'data-field="service_tier"[^>]*>priority</dd>', page)
    assert 'data-field="images"' not in page  # units the call did not use are not shown


async def test_well_known_key_set_is_public_per_tenant(dash, http):
    """Anyone (no sign-in) fetches a tenant's public evidence keys; they verify its
    receipts; the query names the tenant; an unknown tenant is a 404."""
    from p402.v1 import common_pb2, meter_pb2

    from p402_server.ledger import receipts

    r = await dash.meter.Record(meter_pb2.RecordRequest(
        model="gpt-4o-mini", owners=common_pb2.Owners(customer="acme"),
        usage=common_pb2.Usage(input_tokens=10), want_receipt=True),
        metadata=md(dash.a.admin_key))
    url = dash.base + "/.well-known/p402-keys.json"
    async with http.get(url, params={"tenant": dash.a.tenant_id}) as resp:
        assert resp.status == 200 and "max-age" in resp.headers["Cache-Control"]
        data = await resp.json()
    assert data["tenant_id"] == dash.a.tenant_id and data["keys"][0]["crv"] == "Ed25519"
    assert receipts.verify(r.receipt, receipts.keys_from_set(data))[0]
    async with http.get(url, params={"tenant": dash.b.tenant_id}) as resp:
        other = await resp.json()
    assert not receipts.verify(r.receipt, receipts.keys_from_set(other))[0]
    async with http.get(url) as resp:
        assert resp.status == 400
    async with http.get(url, params={"tenant": "t_nobody"}) as resp:
        assert resp.status == 404


async def test_statements_pages_list_show_and_download(dash, http):
    """Close a month over the admin API; the dashboard lists it, shows its lines and
    totals (the stored document's), and serves its JSON (byte for byte) and CSV."""
    import datetime as dt

    from p402.v1 import admin_pb2, common_pb2, meter_pb2

    when = int(dt.datetime(2026, 9, 9, tzinfo=dt.timezone.utc).timestamp() * 1000)
    for feature in ("chat", "search"):
        await dash.meter.Record(meter_pb2.RecordRequest(
            model="gpt-4o-mini", owners=common_pb2.Owners(customer="acme", feature=feature),
            usage=common_pb2.Usage(input_tokens=5000, output_tokens=400), event_time_ms=when),
            metadata=md(dash.a.admin_key))
    closed = await dash.admin.CloseStatements(admin_pb2.CloseStatementsRequest(
        period="2026-09", customer="acme"), metadata=md(dash.a.admin_key))
    doc = json.loads(closed.statements[0].document_json)
    await sign_in(http, dash.base, dash.a.read_key)
    async with http.get(dash.base + "/dashboard/statements") as r:
        page = await r.text()
    assert "2026-09" in page and "acme" in page
    url = dash.base + "/dashboard/statements/2026-09"
    async with http.get(url, params={"customer": "acme"}) as r:
        page = await r.text()
    assert r.status == 200 and page.count("<tr>") >= 3  # header + two lines
    assert re.search(r'data-field="cost_nanos"[^>]*>' + re.escape(usd(doc["totals"]["cost_nanos"])),
                     page)
    async with http.get(url, params={"customer": "acme", "format": "json"}) as r:
        assert await r.text() == closed.statements[0].document_json
    async with http.get(url, params={"customer": "acme", "format": "csv"}) as r:
        assert (await r.text()) == closed.statements[0].csv
    async with http.get(url, params={"customer": "nobody"}) as r:
        assert r.status == 404
    # another tenant does not see it
    await sign_in(http, dash.base, dash.b.read_key)
    async with http.get(url, params={"customer": "acme"}) as r:
        assert r.status == 404


async def test_metrics_are_scraped_and_parse_after_traffic(dash, http):
    """/metrics after traffic: Prometheus text that prometheus_client's own parser
    reads, with the decisions, latencies, records, writer and holds the calls made."""
    from p402.v1 import common_pb2, meter_pb2
    from prometheus_client.parser import text_string_to_metric_families

    m = dash.meter
    for _ in range(3):
        a = await m.Authorize(meter_pb2.AuthorizeRequest(
            model="gpt-4o-mini", owners=common_pb2.Owners(customer="acme"), input_bytes=40),
            metadata=md(dash.a.admin_key))
    await m.Record(meter_pb2.RecordRequest(reservation_id=a.reservation_id,
                                           usage=common_pb2.Usage(input_tokens=10)),
                   metadata=md(dash.a.admin_key))
    denied = await m.Authorize(meter_pb2.AuthorizeRequest(
        model="no-such-model-xyz", owners=common_pb2.Owners(customer="acme"), input_bytes=4),
        metadata=md(dash.a.admin_key))
    assert denied.decision == common_pb2.DECISION_DENY
    await dash.server.writer.flush()
    async with http.get(dash.base + "/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    dec = {(s.labels["decision"], s.labels["reason"]): s.value
           for s in fams["p402_decisions"].samples if s.name == "p402_decisions_total"}
    assert dec[("ALLOW", "none")] >= 3 and dec[("DENY", "price.unknown_model")] >= 1
    count = {s.labels["method"]: s.value for s in fams["p402_rpc_duration_seconds"].samples
             if s.name == "p402_rpc_duration_seconds_count"}
    assert count["Authorize"] >= 4 and count["Record"] >= 1
    rec = {s.labels["outcome"]: s.value for s in fams["p402_records"].samples
           if s.name == "p402_records_total"}
    assert rec["SUCCESS"] >= 1
    assert [s.value for s in fams["p402_writer_events"].samples][0] >= 1
    assert any(s.value >= 1 for s in fams["p402_writer_batch_events"].samples
               if s.name.endswith("_count"))
    holds = {s.labels["tenant"]: s.value for s in fams["p402_open_holds"].samples}
    assert holds[dash.a.tenant_id] == 2  # three authorized, one recorded
    assert "p402_writer_queue_depth" in fams


def test_lease_metrics_when_leases_are_on():
    from types import SimpleNamespace as NS

    from prometheus_client.parser import text_string_to_metric_families

    from p402_server.observe.metrics import Metrics

    m = Metrics(runtime=NS(tenants={}, leases=NS(round_trips=5, exact_takes=2)))
    fams = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    assert fams["p402_lease_store_round_trips"].samples[0].value == 5
    assert fams["p402_lease_exact_takes"].samples[0].value == 2
    assert "p402_lease_store_round_trips" not in {
        f.name for f in text_string_to_metric_families(
            Metrics(runtime=NS(tenants={}, leases=None)).exposition().decode())}


def test_records_are_counted_by_outcome_a_batch_at_a_time():
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from p402_server.observe.metrics import Metrics

    m = Metrics()
    m.recorded([1, 0, 2, 1, 3, 2, 1], time.perf_counter(), batch=True)
    m.recorded((2,), time.perf_counter())
    m.recorded([], time.perf_counter(), batch=True)
    fams = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    rec = {s.labels["outcome"]: s.value for s in fams["p402_records"].samples
           if s.name == "p402_records_total"}
    assert rec == {"SUCCESS": 4, "PROVIDER_ERROR": 3, "TIMEOUT": 1}
    count = {s.labels["method"]: s.value for s in fams["p402_rpc_duration_seconds"].samples
             if s.name == "p402_rpc_duration_seconds_count"}
    assert count["RecordBatch"] == 2 and count["Record"] == 1


async def test_metrics_answer_this_machine_or_the_metrics_token_only(dash, tmp_path):
    """/metrics names every tenant and budget: without a token only a loopback peer
    reads it; with one, only a scrape that sends it (loopback too)."""
    from aiohttp.test_utils import make_mocked_request

    from p402_server.dashboard.app import DashboardConfig

    class Peer:
        def __init__(self, ip):
            self.ip = ip

        def get_extra_info(self, name, default=None):
            return (self.ip, 40000) if name == "peername" else default

    def scrape(ip, **headers):
        return make_mocked_request("GET", "/metrics", headers=headers, transport=Peer(ip))

    d = dash.server.dashboard.dashboard
    assert (await d.prometheus(scrape("127.0.0.1"))).status == 200
    assert (await d.prometheus(scrape("::1"))).status == 200
    remote = await d.prometheus(scrape("10.1.2.3"))
    assert remote.status == 403 and "P402_METRICS_TOKEN" in remote.text
    assert dash.a.tenant_id not in remote.text
    d.config = DashboardConfig(metrics_token="s3cret-scrape")
    for ip in ("10.1.2.3", "127.0.0.1"):
        assert (await d.prometheus(scrape(ip))).status == 401
        assert (await d.prometheus(scrape(ip, Authorization="Bearer wrong"))).status == 401
        ok = await d.prometheus(scrape(ip, Authorization="Bearer s3cret-scrape"))
        assert ok.status == 200 and b"p402_open_holds" in ok.body
