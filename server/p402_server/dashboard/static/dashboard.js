// P402 dashboard: live ledger updates. Polls /dashboard/api/events?after_seq=… every
// few seconds and puts new rows (rendered and escaped by the server) on top. No
// framework, no CDN; stops when signed out and backs off on errors.
(function () {
  "use strict";
  function start() {
    var table = document.getElementById("ledger");
    if (!table || !table.dataset.pollUrl) return;
    var body = document.getElementById("ledger-rows");
    var live = document.getElementById("live");
    var after = parseInt(table.dataset.afterSeq || "0", 10);
    var every = parseInt(table.dataset.pollMs || "2000", 10);
    var delay = every;
    var base = table.dataset.pollUrl;

    function schedule() { window.setTimeout(poll, delay); }

    function poll() {
      if (document.hidden) { schedule(); return; }
      var url = base + (base.indexOf("?") >= 0 ? "&" : "?") + "after_seq=" + after;
      fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (resp) {
          if (resp.status === 401) {
            if (live) { live.textContent = "Signed out"; live.classList.add("paused"); }
            window.location.reload();  // the page redirects to sign-in
            return null;
          }
          if (!resp.ok) throw new Error("HTTP " + resp.status);
          return resp.json();
        })
        .then(function (data) {
          if (data === null) return;
          delay = every;
          if (live) { live.textContent = "● Live"; live.classList.remove("paused"); }
          if (data.count > 0) {
            var tpl = document.createElement("template");
            tpl.innerHTML = data.rows_html;
            var rows = Array.prototype.slice.call(tpl.content.querySelectorAll("tr"));
            rows.forEach(function (r) { r.classList.add("fresh"); });
            var frag = document.createDocumentFragment();
            rows.forEach(function (r) { frag.appendChild(r); });
            body.insertBefore(frag, body.firstChild);
            var empty = document.getElementById("ledger-empty");
            if (empty) empty.remove();
            after = data.last_seq;
            table.dataset.afterSeq = String(after);
          }
          schedule();
        })
        .catch(function () {
          if (live) { live.textContent = "Reconnecting…"; live.classList.add("paused"); }
          delay = Math.min(delay * 2, 30000);
          schedule();
        });
    }
    schedule();
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
