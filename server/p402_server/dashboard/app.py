"""The dashboard's aiohttp application: routes, sign-in, pages, JSON and exports.

Owns `Dashboard` (its `app()` is an `aiohttp.web.Application`) and
`DashboardConfig`. It runs in the gRPC server's event loop and reads the same store
through the store API only (get_event, query_events, query_spend, iter_events,
list_budgets/list_keys, get_tenant) plus the tenant runtime for the live budget
state (committed, held, left). It never writes to the ledger.

Security model
- Sign-in: a P402 API key of scope read or admin, POSTed once, checked through the
  server's `KeyCache` (the same cache and rules as gRPC). A meter-only key is
  refused with a message saying why. The key is not kept: the session knows the key
  id, and every request re-reads that key's record (at most every
  `key_recheck_seconds`), so a revoked key's sessions end at the next request.
- The tenant is always the session key's tenant: no handler takes a tenant from the
  request. An event id of another tenant is simply not found (404).
- Cookie: random id only, HttpOnly, SameSite=Strict, Path=/dashboard, Secure when
  the request came over https or `secure_cookies` is set.
- CSRF: every state-changing form (sign-in, sign-out) is a POST carrying a token
  (sign-in: double-submit with a short-lived cookie; afterwards: the session's
  token), compared in constant time; POSTs with a foreign Origin are refused. The
  read-only filter forms use GET and carry no token (a token in a URL leaks into
  history and logs, and a GET changes nothing).
- Every response carries a strict Content-Security-Policy (scripts, styles and
  images from P402 itself only), nosniff, no framing and no-store for pages.
- Content (prompts, responses) is shown only when the event's privacy mode kept it
  AND the viewer's key is admin, and always escaped.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from p402_server.api.auth import READ
from p402_server.dashboard import exports
from p402_server.dashboard import filters as F
from p402_server.dashboard import fmt, svg
from p402_server.dashboard.sessions import Session, SessionStore, new_token, tokens_equal
from p402_server.ledger.queries import encode_token
from p402_server.wire.errors import ServiceError
from p402core._enums import OWNER_KEYS, Enforcement, InvalidArgument, Period, PrivacyMode

log = logging.getLogger("p402.dashboard")

HERE = Path(__file__).parent
PREFIX = "/dashboard"
SESSION_COOKIE = "p402_session"
SIGNIN_COOKIE = "p402_signin"
EVENTS_PAGE_SIZE = 50
POLL_MAX = 200
SPEND_DIMENSIONS = ("customer", "feature", "department", "employee", "workflow", "model",
                    "provider", "outcome", "evidence")
CONTENT_MODES = (int(PrivacyMode.REDACTED_TRACE), int(PrivacyMode.FULL_TRACE))
RETRY_CHAIN_MAX = 20

# The files served under /dashboard/static/, by name (the directory is never listed
# nor walked for a requested path).
STATIC_FILES = {p.name: p for p in (HERE / "static").iterdir() if p.is_file()}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

# A typed request key where aiohttp has them (3.13+), else a plain string.
SESSION_KEY = (web.RequestKey("p402_session", object) if hasattr(web, "RequestKey")
               else "p402_session")


@dataclass(frozen=True)
class DashboardConfig:
    # None: Secure cookies exactly when the request came over https (as aiohttp sees
    # it); True: always (behind a TLS-terminating proxy); False: never.
    secure_cookies: bool | None = None
    idle_seconds: float = 30 * 60
    max_seconds: float = 12 * 3600
    # How often a session's key is re-read from the store (0: on every request).
    key_recheck_seconds: float = 0.0
    poll_ms: int = 2000
    # /metrics names every tenant and budget: it answers a scrape that sends
    # "Authorization: Bearer <metrics_token>"; without a token, this machine only.
    metrics_token: str = ""


class _KeyContext:
    """The little of a gRPC context that `KeyCache.authenticate` reads."""

    def __init__(self, api_key: str):
        self._md = (("authorization", f"Bearer {api_key}"),)

    def invocation_metadata(self):
        return self._md


def _loopback(remote: str | None) -> bool:
    try:
        return ipaddress.ip_address((remote or "").split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _static_version() -> str:
    h = hashlib.sha256()
    for p in sorted((HERE / "static").iterdir()):
        h.update(p.read_bytes())
    return h.hexdigest()[:10]


class Dashboard:
    """One dashboard over one server's store, runtime and key cache."""

    def __init__(self, *, store, runtime, auth, config: DashboardConfig | None = None,
                 metrics=None):
        self.store = store
        self.metrics = metrics  # metrics.Metrics: served at /metrics (None: not served)
        self.runtime = runtime
        self.auth = auth
        self.config = config or DashboardConfig()
        self.sessions = SessionStore(idle_seconds=self.config.idle_seconds,
                                     max_seconds=self.config.max_seconds)
        self._tenant_names: dict[str, str] = {}
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(HERE / "templates")),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters.update(
            usd=fmt.usd, tokens=fmt.tokens, utc=fmt.ms_to_utc, pct=fmt.pct,
            date=fmt.ms_to_date, utc_bare=lambda ms: fmt.ms_to_utc(ms, zone=False),
            decision=fmt.decision_name, outcome=fmt.outcome_name,
            evidence=fmt.evidence_name, privacy=fmt.privacy_name,
            urlq=lambda s: quote(str(s), safe=""),
        )
        self.env.globals.update(
            static_version=_static_version(), prefix=PREFIX, owner_keys=OWNER_KEYS,
            choices=F.CHOICES, range_labels=F.RANGE_LABELS,
        )

    # --- app ---------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._headers_mw], client_max_size=64 * 1024)
        r = app.router
        r.add_get("/", self._root)
        r.add_get(PREFIX, self._root)
        r.add_get(PREFIX + "/", self._root)
        r.add_get(PREFIX + "/signin", self.signin_form)
        r.add_post(PREFIX + "/signin", self.signin)
        r.add_post(PREFIX + "/signout", self.signout)
        r.add_get(PREFIX + "/meter/events", self._page(self.events_page))
        r.add_get(PREFIX + "/meter/events/{event_id}", self._page(self.event_page))
        r.add_get(PREFIX + "/api/events", self._api(self.api_events))
        r.add_get(PREFIX + "/spend", self._page(self.spend_page))
        r.add_get(PREFIX + "/export", self._page(self.export))
        r.add_get(PREFIX + "/statements", self._page(self.statements_page))
        r.add_get(PREFIX + "/statements/{period}", self._page(self.statement_page))
        r.add_get(PREFIX + "/static/{name}", self._static)
        r.add_get("/favicon.ico", self._favicon)
        r.add_get("/.well-known/p402-keys.json", self.evidence_keys)
        if self.metrics is not None:
            r.add_get("/metrics", self.prometheus)
        return app

    async def prometheus(self, request: web.Request) -> web.Response:
        """Prometheus text exposition of the server's metrics (metrics.py), to a
        scrape with the metrics token, or from this machine when none is set: they
        name every tenant's id and budgets, which no tenant may read of another."""
        token = self.config.metrics_token
        if token:
            if not tokens_equal(request.headers.get("Authorization"), "Bearer " + token):
                return web.Response(status=401, text="/metrics: send Authorization: "
                                    "Bearer <P402_METRICS_TOKEN>\n",
                                    headers={"WWW-Authenticate": "Bearer"})
        elif not _loopback(request.remote):
            return web.Response(status=403, text="/metrics answers this machine only; "
                                "set P402_METRICS_TOKEN to scrape it from elsewhere\n")
        return web.Response(body=self.metrics.exposition(),
                            headers={"Content-Type": "text/plain; version=0.0.4; "
                                                     "charset=utf-8"})

    async def statements_page(self, request: web.Request, s: Session) -> web.Response:
        """The tenant's closed statements, in the order they were closed."""
        rows = await self.store.list_statements(s.tenant_id)
        items = [{"period": p, "customer": c, "closed_ms": ms, "through_index": t}
                 for p, c, ms, t in rows]
        return self._html(request, "statements.html", nav="statements", title="Statements",
                          statements=items)

    async def statement_page(self, request: web.Request, s: Session) -> web.Response:
        """One statement: a printable page, or its JSON or CSV (?format=)."""
        from p402_server.ledger import statements as st

        period = request.match_info["period"]
        customer = request.query.get("customer", "")
        try:
            st.period_bounds(period)
        except Exception:  # noqa: BLE001 - a bad month is just not a page
            raise web.HTTPNotFound() from None
        text = await self.store.get_statement(s.tenant_id, period, customer)
        if text is None:
            raise web.HTTPNotFound()
        doc = json.loads(text)
        name = f"statement-{period}-{customer or 'none'}"
        fmt_ = request.query.get("format", "")
        if fmt_ == "json":
            return web.Response(text=text, content_type="application/json", headers={
                "Content-Disposition": f'attachment; filename="{name}.json"'})
        if fmt_ == "csv":
            return web.Response(text=st.to_csv(doc), content_type="text/csv", headers={
                "Content-Disposition": f'attachment; filename="{name}.csv"'})
        return self._html(request, "statement.html", nav="statements",
                          title=f"Statement {period}", st=doc)

    async def evidence_keys(self, request: web.Request) -> web.Response:
        """A tenant's public evidence keys (receipts.key_set), with no sign-in: anyone
        may verify receipts and export digests. `?tenant=<tenant id>` is required."""
        tenant_id = request.query.get("tenant", "")
        if not tenant_id:
            return web.json_response({"error": "tenant is required: "
                                      "/.well-known/p402-keys.json?tenant=<tenant id>"},
                                     status=400)
        if len(tenant_id) > 256 or await self.store.get_tenant(tenant_id) is None:
            return web.json_response({"error": "no such tenant"}, status=404)
        rt = await self.runtime.get(tenant_id)
        return web.json_response(rt.evidence_keys(),
                                 headers={"Cache-Control": "public, max-age=300"})

    @web.middleware
    async def _headers_mw(self, request: web.Request, handler):
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            resp = exc
            if exc.status == 404 and not (exc.text or "").startswith("<"):
                resp = self._html(request, "error.html", status=404, title="Not found",
                                  message="There is no such page.")
            elif (exc.status in (400, 403) and not (exc.text or "").startswith("<")
                  and not request.path.startswith(PREFIX + "/api/")):
                # A page's refusal is a page too, its text naming the parameter.
                resp = self._html(request, "error.html", status=exc.status,
                                  title="Bad request" if exc.status == 400 else "Forbidden",
                                  message=exc.text or "")
        h = resp.headers
        h.setdefault("Content-Security-Policy", CSP)
        h.setdefault("X-Content-Type-Options", "nosniff")
        h.setdefault("X-Frame-Options", "DENY")
        h.setdefault("Referrer-Policy", "same-origin")
        if not request.path.startswith(PREFIX + "/static/"):
            h.setdefault("Cache-Control", "no-store")
        if isinstance(resp, web.HTTPException):
            raise resp
        return resp

    # --- sessions ----------------------------------------------------------------

    def _secure(self, request: web.Request) -> bool:
        if self.config.secure_cookies is None:
            return request.secure
        return self.config.secure_cookies

    def _set_cookie(self, request, resp, name: str, value: str, max_age: int | None):
        resp.set_cookie(name, value, path=PREFIX, httponly=True, samesite="Strict",
                        secure=self._secure(request), max_age=max_age)

    def _clear_cookie(self, request, resp, name: str):
        resp.del_cookie(name, path=PREFIX, secure=self._secure(request), httponly=True,
                        samesite="Strict")

    async def _session(self, request: web.Request) -> Session | None:
        """The request's live session, after re-checking its key (module docstring)."""
        s = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if s is None:
            return None
        now = self.sessions.now()
        if now - s.key_checked >= self.config.key_recheck_seconds:
            keys = await self.store.list_keys(s.tenant_id)
            key = next((k for k in keys if k.key_id == s.key_id), None)
            if key is None or key.revoked:
                ended = self.sessions.end_key(s.key_id)
                log.info("dashboard: key %s revoked; %d session(s) ended", s.key_prefix, ended)
                return None
            s.key_checked = now
        return s

    def _page(self, handler: Callable[[web.Request, Session], Awaitable[web.StreamResponse]]):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            s = await self._session(request)
            if s is None:
                nxt = request.path_qs
                resp = web.HTTPSeeOther(f"{PREFIX}/signin?{urlencode({'next': nxt})}")
                if request.cookies.get(SESSION_COOKIE):
                    self._clear_cookie(request, resp, SESSION_COOKIE)
                raise resp
            request[SESSION_KEY] = s
            return await handler(request, s)
        return wrapped

    def _api(self, handler):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            s = await self._session(request)
            if s is None:
                return web.json_response(
                    {"error": "signed out", "signin": f"{PREFIX}/signin"}, status=401)
            return await handler(request, s)
        return wrapped

    def _origin_ok(self, request: web.Request) -> bool:
        # Browsers send Origin on every POST; a foreign (or "null") one is a
        # cross-site form. Host only: a TLS proxy in front changes the scheme.
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        try:
            netloc = urlsplit(origin).netloc
        except ValueError:  # not a URL at all ("http://[::1"): not this site either
            return False
        return netloc == request.host

    async def _static(self, request: web.Request) -> web.StreamResponse:
        """One of the files shipped in static/, by its exact name (anything else, a
        name too long for the file system included, is not found)."""
        path = STATIC_FILES.get(request.match_info["name"])
        if path is None:
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def _favicon(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPMovedPermanently(PREFIX + "/static/favicon.svg")

    async def _root(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPSeeOther(PREFIX + "/meter/events")

    # --- rendering ---------------------------------------------------------------

    def _html(self, request: web.Request, template: str, *, status: int = 200,
              **ctx: Any) -> web.Response:
        s = request.get(SESSION_KEY)
        ctx.setdefault("session", s)
        ctx.setdefault("tenant_name", self._tenant_names.get(s.tenant_id, "") if s else "")
        ctx.setdefault("nav", "")
        html = self.env.get_template(template).render(**ctx)
        return web.Response(text=html, status=status, content_type="text/html",
                            charset="utf-8")

    # --- sign-in / sign-out ------------------------------------------------------

    async def signin_form(self, request: web.Request, *, error: str = "",
                          status: int = 200, notice: str = "") -> web.Response:
        token = new_token()
        nxt = _safe_next(request.query.get("next", ""))
        if not notice and request.query.get("signed_out"):
            notice = "You are signed out."
        resp = self._html(request, "signin.html", status=status, csrf=token, next=nxt,
                          error=error, notice=notice, session=None, title="Sign in")
        # Double-submit token for the sign-in form (there is no session yet).
        self._set_cookie(request, resp, SIGNIN_COOKIE, token, max_age=3600)
        return resp

    async def _form(self, request: web.Request) -> dict[str, str]:
        """The POSTed form's text fields. A body that is no form (bytes that are not
        text in its charset, an unknown charset, broken multipart) is a 400 naming
        the form; a file where text is expected counts as no value."""
        try:
            form = await request.post()
        except (ValueError, LookupError, HttpProcessingError) as exc:
            log.info("dashboard: unreadable form on %s (%s)", request.path, type(exc).__name__)
            raise web.HTTPBadRequest(text="form: the body is not a form of text fields "
                                          "(application/x-www-form-urlencoded, UTF-8)"
                                     ) from None
        out: dict[str, str] = {}
        for name in ("csrf", "api_key", "next"):
            value = form.get(name)
            out[name] = value if isinstance(value, str) else ""
        return out

    async def signin(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        if not self._origin_ok(request) or not tokens_equal(
                form.get("csrf"), request.cookies.get(SIGNIN_COOKIE)):
            return await self.signin_form(
                request, status=403,
                error="The sign-in form expired or came from another site. Please try again.")
        api_key = str(form.get("api_key", "")).strip()
        if not api_key:
            return await self.signin_form(request, status=400,
                                          error="Enter a P402 API key (it starts with p402_).")
        try:
            info = await self.auth.authenticate(_KeyContext(api_key), READ,
                                                "Dashboard sign-in", required="read")
        except ServiceError as exc:
            if exc.reason == "SCOPE_MISSING":
                msg = ("This key has scope meter only: it can record usage but cannot "
                       "read the ledger. Sign in with a key of scope read or admin.")
                return await self.signin_form(request, status=403, error=msg)
            return await self.signin_form(request, status=401,
                                          error="Unknown or revoked API key.")
        tenant = await self.store.get_tenant(info.tenant_id)
        self._tenant_names[info.tenant_id] = tenant.name if tenant else info.tenant_id
        s = self.sessions.create(tenant_id=info.tenant_id, key_id=info.key_id,
                                 key_prefix=info.prefix, key_name=info.name,
                                 scopes=info.scopes)
        log.info("dashboard: sign-in tenant %s key %s", info.tenant_id, info.prefix)
        resp = web.HTTPSeeOther(_safe_next(str(form.get("next", ""))) or
                                PREFIX + "/meter/events")
        self._set_cookie(request, resp, SESSION_COOKIE, s.session_id,
                         max_age=int(self.config.max_seconds))
        self._clear_cookie(request, resp, SIGNIN_COOKIE)
        return resp

    async def signout(self, request: web.Request) -> web.StreamResponse:
        form = await self._form(request)
        s = self.sessions.get(request.cookies.get(SESSION_COOKIE))
        if s is not None:
            if not self._origin_ok(request) or not tokens_equal(form.get("csrf"),
                                                                s.csrf_token):
                raise web.HTTPForbidden(text="CSRF token missing or wrong")
            self.sessions.delete(s.session_id)
        resp = web.HTTPSeeOther(PREFIX + "/signin?signed_out=1")
        self._clear_cookie(request, resp, SESSION_COOKIE)
        return resp

    # --- the ledger --------------------------------------------------------------

    async def _suggestions(self, tenant_id: str) -> dict[str, list[str]]:
        """Known values of each text filter (for the inputs' datalists), from rollups."""
        out: dict[str, list[str]] = {}
        for dim in F.TEXT_FIELDS:
            rows, _ = await self.store.query_spend(tenant_id, None, [dim], page_size=200)
            out[dim] = sorted(r.group[dim] for r in rows if r.group[dim])
        return out

    async def events_page(self, request: web.Request, s: Session) -> web.Response:
        try:
            f = F.parse(request.query)
        except F.FilterError as exc:
            return await self._filter_error(request, "events.html", exc, nav="events")
        token = request.query.get("page_token", "")
        try:
            events, next_token = await self.store.query_events(
                s.tenant_id, f.flt, page_size=EVENTS_PAGE_SIZE, page_token=token)
        except InvalidArgument as exc:
            raise web.HTTPBadRequest(text=f"{exc.field}: {exc.message}") from None
        # The poll asks for matching events after the newest one shown, with the
        # decimals of the page's cost column so new rows line up with it.
        top_seq = events[0].seq if events and not token else 0
        places = fmt.column_places(e.cost_nanos for e in events)
        poll_url = ""
        if not token:
            poll_url = f"{PREFIX}/api/events?{f.query(places=str(places))}"
        return self._html(
            request, "events.html", nav="events", title="Ledger", f=f, events=events,
            cost_places=places,
            next_url=(f"{PREFIX}/meter/events?{f.query(page_token=next_token)}"
                      if next_token else ""),
            first_url=(f"{PREFIX}/meter/events?{f.query()}" if token else ""),
            poll_url=poll_url, after_seq=top_seq, poll_ms=self.config.poll_ms,
            suggestions=await self._suggestions(s.tenant_id), filter_error="",
            export_links=self._export_links(f))

    async def _filter_error(self, request, template, exc: F.FilterError, **ctx):
        ctx.setdefault("title", "Ledger")
        f = F.Filters(values={k: str(request.query.get(k, "")) for k in F.FIELDS})
        s = request[SESSION_KEY]
        if template == "events.html":
            ctx.update(events=[], cost_places=2, next_url="", first_url="", poll_url="", after_seq=0,
                       poll_ms=self.config.poll_ms,
                       suggestions=await self._suggestions(s.tenant_id),
                       export_links=self._export_links(f))
        return self._html(request, template, status=400, f=f,
                          filter_error=f"{exc.field}: {exc.message}", **ctx)

    async def api_events(self, request: web.Request, s: Session) -> web.Response:
        """Events after `after_seq` matching the filters, oldest first (for the poll)."""
        raw = request.query.get("after_seq", "0")
        if not _seq_text(raw):
            return web.json_response({"error": "after_seq: must be an int >= 0 "
                                      "(ASCII digits, below 2^63)",
                                      "field": "after_seq"}, status=400)
        try:
            f = F.parse(request.query)
        except F.FilterError as exc:
            return web.json_response({"error": str(exc), "field": exc.field}, status=400)
        after = int(raw)
        # The store's own ascending page token: "everything after this seq".
        events, _ = await self.store.query_events(
            s.tenant_id, f.flt, page_size=POLL_MAX, order="asc",
            page_token=encode_token("ea", after) if after else "")
        last = events[-1].seq if events else after
        newest_first = list(reversed(events))
        asked = request.query.get("places", "")
        places = max(int(asked) if _seq_text(asked) and 2 <= int(asked) <= 9 else 2,
                     fmt.column_places(e.cost_nanos for e in events))
        html = self.env.get_template("_event_rows.html").render(
            events=newest_first, prefix=PREFIX, cost_places=places)
        return web.json_response({
            "last_seq": last,
            "count": len(events),
            "events": [_event_json(e) for e in newest_first],
            "rows_html": html,
        })

    async def event_page(self, request: web.Request, s: Session) -> web.Response:
        event_id = request.match_info["event_id"]
        ev = await self.store.get_event(s.tenant_id, event_id)
        if ev is None:
            return self._html(request, "error.html", status=404, title="Event not found",
                              message=f"No event {event_id!r} in this tenant's ledger.",
                              nav="events")
        rt = await self.runtime.get(s.tenant_id)
        statuses = {st.budget_id: st for st in rt.engine.budget_status()}
        charged = dict(ev.budget_charges)
        budgets = []
        for bid in ev.budget_ids:
            b = rt.budgets.get(bid)
            budgets.append({"budget_id": bid, "budget": b, "status": statuses.get(bid),
                            "period_start_ms": charged.get(bid),
                            "scope": _scope_text(b.scope) if b is not None else ""})
        rules = [{"rule_id": rid, "exists": rid in rt.rules} for rid in ev.rule_ids]
        # Retry chain: walk retry_of back to the first attempt (bounded).
        chain = []
        seen = {ev.event_id}
        prev_id = ev.retry_of
        while prev_id and len(chain) < RETRY_CHAIN_MAX and prev_id not in seen:
            seen.add(prev_id)
            prev = await self.store.get_event(s.tenant_id, prev_id)
            chain.append({"event_id": prev_id, "event": prev})
            prev_id = prev.retry_of if prev is not None else ""
        chain.reverse()
        content, content_note = await self._content(s, ev)
        return self._html(
            request, "event.html", nav="events", title=f"Event {ev.event_id}", ev=ev,
            budgets=budgets, rules=rules, chain=chain, content=content,
            content_note=content_note, labels=sorted(ev.labels.items()),
            owners=[(k, getattr(ev, k)) for k in OWNER_KEYS])

    async def _content(self, s: Session, ev) -> tuple[Any, str]:
        """(content or None, why it is not shown) — see the module docstring."""
        if int(ev.privacy_mode) not in CONTENT_MODES:
            return None, (f"Not kept: this event was recorded under privacy mode "
                          f"{fmt.privacy_name(ev.privacy_mode)}, which stores no content.")
        if not s.is_admin:
            return None, "Hidden: content is shown only to keys of scope admin."
        get_contents = getattr(self.store, "get_contents", None)
        if get_contents is None:
            return None, "This server's store does not keep content."
        content = await get_contents(s.tenant_id, ev.event_id)
        if not content:
            return None, "No content was stored for this event."
        return _content_items(content), ""

    # --- spend -------------------------------------------------------------------

    async def spend_page(self, request: web.Request, s: Session) -> web.Response:
        try:
            f = F.parse(request.query, align_hours=True)
        except F.FilterError as exc:
            f = F.Filters(values={k: str(request.query.get(k, "")) for k in F.FIELDS})
            return self._html(request, "spend.html", status=400, nav="spend",
                              title="Spend", f=f, filter_error=f"{exc.field}: {exc.message}",
                              totals=None, series_svg="", dims=[], budgets=[],
                              unused_dims=[], budget_places={},
                              export_links=self._export_links(f), bucket="day",
                              suggestions=await self._suggestions(s.tenant_id))
        t, st = s.tenant_id, self.store
        total_rows, _ = await st.query_spend(t, f.flt, [])
        totals = total_rows[0] if total_rows else None
        # Time series: hours for ranges of two days or less, else days.
        now = F.now_ms()
        since = f.flt.since_ms
        until = f.flt.until_ms or now
        bucket = "hour" if since and until - since <= 48 * F.HOUR_MS else "day"
        rows, _ = await st.query_spend(t, f.flt, [bucket], page_size=1000)
        # Drawn twice, wide and narrow; the stylesheet shows the one that fits the
        # screen (scaled to its card), so its text stays readable at either width.
        buckets = _fill_buckets(rows, bucket, since, until)
        lines = [("cost", "Cost", "series-cost"), ("margin", "Margin", "series-margin")]
        title = f"Cost and margin per {bucket} (UTC)"
        series_svg = svg.time_series(buckets, lines, title=title, fmt=fmt.usd, uid="tsw")
        series_svg_narrow = svg.time_series(buckets, lines, title=title, fmt=fmt.usd,
                                            width=720, height=260, uid="tsn")
        dims, unused = [], []
        for dim in SPEND_DIMENSIONS:
            rows, more = await st.query_spend(t, f.flt, [dim], page_size=10)
            if all(not r.group[dim] for r in rows):
                unused.append(dim)  # nothing in this range names one: no panel
                continue
            named = [(_group_text(dim, r.group[dim]), r) for r in rows]
            places = _places(rows, ("cost_nanos", "revenue_nanos", "margin_nanos"))
            dims.append({
                "dim": dim, "rows": named, "more": bool(more), "places": places,
                "svg": svg.bar_chart([(n, r.cost_nanos) for n, r in named],
                                     title=f"Cost by {dim}",
                                     fmt=partial(fmt.usd, places=places["cost_nanos"])),
            })
        budgets = await self._budgets(t)
        return self._html(
            request, "spend.html", nav="spend", title="Spend", f=f, totals=totals,
            series_svg=series_svg, series_svg_narrow=series_svg_narrow, dims=dims,
            unused_dims=unused, budgets=budgets,
            budget_places=_places([b["budget"] for b in budgets], ("limit_nanos",))
            | _places([_Obj(b) for b in budgets], ("committed", "held", "left")),
            export_links=self._export_links(f), bucket=bucket, filter_error="",
            suggestions=await self._suggestions(t))

    async def _budgets(self, tenant_id: str) -> list[dict]:
        rt = await self.runtime.get(tenant_id)
        statuses = {st.budget_id: st for st in rt.engine.budget_status()}
        out = []
        for bid in sorted(rt.budgets):
            b = rt.budgets[bid]
            st = statuses.get(bid)
            committed = st.committed_nanos if st else 0
            held = st.held_nanos if st else 0
            left = st.remaining_nanos if st else b.limit_nanos
            out.append({
                "budget_id": bid, "budget": b, "scope": _scope_text(b.scope),
                "period": Period(int(b.period)).name.lower(),
                "enforcement": Enforcement(int(b.enforcement)).name.lower(),
                "committed": committed, "held": held, "left": left,
                "used_pct": fmt.pct(committed + held, b.limit_nanos),
                "svg": svg.usage_bar(committed, held, b.limit_nanos, b.soft_limit_nanos),
                "period_start_ms": st.period_start_ms if st else 0,
            })
        return out

    # --- export ------------------------------------------------------------------

    def _export_links(self, f: F.Filters) -> list[dict]:
        return [{"label": label, "format": fm,
                 "url": f"{PREFIX}/export?{f.query(format=fm)}"}
                for label, fm in (("CSV", "csv"), ("JSONL", "jsonl"), ("FOCUS", "focus"))]

    async def export(self, request: web.Request, s: Session) -> web.StreamResponse:
        fm = request.query.get("format", "csv")
        if fm not in exports.FORMATS:
            raise web.HTTPBadRequest(text="format: must be csv, jsonl or focus")
        try:
            f = F.parse(request.query)
        except F.FilterError as exc:
            raise web.HTTPBadRequest(text=f"{exc.field}: {exc.message}") from None
        rt = await self.runtime.get(s.tenant_id)
        chunks = exports.stream(self.store, s.tenant_id, f.flt, fm, rt.settings)
        ctype, ext = {"csv": ("text/csv", "csv"), "jsonl": ("application/x-ndjson", "jsonl"),
                      "focus": ("text/csv", "focus.csv")}[fm]
        stamp = fmt.ms_to_iso(F.now_ms())[:10].replace("-", "")
        resp = web.StreamResponse(headers={
            "Content-Type": f"{ctype}; charset=utf-8",
            "Content-Disposition": f'attachment; filename="p402-events-{stamp}.{ext}"',
        })
        await resp.prepare(request)
        async for chunk in chunks:
            await resp.write(chunk.encode("utf-8"))
        await resp.write_eof()
        return resp


# --- helpers -----------------------------------------------------------------------


class _Obj:
    """Attribute access to a dict (for `_places` over the budget rows)."""

    def __init__(self, d: dict):
        self.__dict__.update(d)


def _places(rows, fields: tuple[str, ...]) -> dict[str, int]:
    """{field: decimals of that column} for a table's money columns."""
    return {name: fmt.column_places(getattr(r, name) for r in rows) for name in fields}


def _seq_text(text: str) -> bool:
    """Whether `text` is a sequence number as the store keeps one: ASCII digits (not
    '²' nor '٣', which str.isdigit accepts and int() refuses), below 2^63."""
    return text.isascii() and text.isdigit() and len(text) <= 19 and int(text) < 2**63


def _safe_next(nxt: str) -> str:
    """Only same-site dashboard paths may be redirected to after sign-in."""
    if (nxt.startswith(PREFIX + "/") and not nxt.startswith("//")
            and "\\" not in nxt and not nxt.startswith(PREFIX + "/signin")):
        return nxt
    return ""


def _scope_text(scope) -> str:
    if not scope:
        return "whole tenant"
    return ", ".join(f"{k}={v}" for k, v in sorted(dict(scope).items()))


def _group_text(dim: str, value) -> str:
    if dim == "outcome":
        return fmt.outcome_name(value)  # the store may give the int or the NAME
    if dim == "evidence":
        return fmt.evidence_name(value)
    if dim == "decision":
        return fmt.decision_name(value)
    return value if value else "(none)"


def _fill_buckets(rows, bucket: str, since: int, until: int) -> list[tuple[str, dict]]:
    """(label, {"cost", "margin"}) for every bucket from since to until, zeros where
    nothing was spent (a gap is a zero, not a line across it)."""
    size = F.HOUR_MS if bucket == "hour" else 24 * F.HOUR_MS
    by = {int(r.group[bucket]): r for r in rows}
    if not by and not since:
        return []
    start = since - since % size if since else min(by)
    end = max([until - 1, *by]) if by else until - 1
    if not since:
        end = max(by)
    out = []
    b = start
    # Bounded: a "since" years back with hourly buckets is never asked for (hours
    # only for ≤ 48 h), days over years stay in the thousands.
    while b <= end and len(out) < 5000:
        r = by.get(b)
        out.append((fmt.bucket_label(b, bucket),
                    {"cost": r.cost_nanos if r else 0, "margin": r.margin_nanos if r else 0}))
        b += size
    return out


def _content_items(content) -> list[tuple[str, str]]:
    """Whatever `store.get_contents` returns, as (field, text) pairs for display."""
    if isinstance(content, dict):
        return [(str(k), v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))
                for k, v in content.items()]
    if isinstance(content, (list, tuple)):
        out = []
        for item in content:
            if hasattr(item, "kind") and hasattr(item, "text"):  # store.Content rows
                out.append((str(item.kind), str(item.text)))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                out.append((str(item[0]), str(item[1])))
            else:
                out.append(("content", str(item)))
        return out
    return [("content", str(content))]


def _event_json(ev) -> dict:
    d = ev.to_dict()
    d.pop("tenant_id", None)
    d["cost_usd"] = fmt.usd_plain(ev.cost_nanos)
    return d


__all__ = ["Dashboard", "DashboardConfig", "PREFIX"]
