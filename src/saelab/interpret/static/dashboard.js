/* saelab dashboard: sortable tables, the index filter (state kept in the URL hash, e.g.
   index.html#sort=max_act&dir=desc&q=the&kind=prediction&dead=show&min_density=0.001
   &max_density=0.1&min_max_act=2; a row whose number is missing fails a numeric bound),
   "full contexts" toggle and
   arrow-key navigation. Plain JS, no dependencies. Data is only ever read via textContent and
   written via textContent / classes: never parsed as HTML. */
(function () {
  "use strict";

  function cellKey(row, col, numeric) {
    var text = row.cells[col] ? row.cells[col].textContent.trim() : "";
    if (!numeric) return text.toLowerCase();
    var v = parseFloat(text);
    return isNaN(v) ? null : v;
  }

  function sortTable(table, col, dir) {
    var th = table.tHead.rows[0].cells[col];
    if (!th) return;
    var numeric = th.getAttribute("data-type") === "num";
    var sign = dir === "desc" ? -1 : 1;
    var body = table.tBodies[0];
    var keyed = Array.prototype.map.call(body.rows, function (row, n) {
      return { k: cellKey(row, col, numeric), n: n, row: row };
    });
    keyed.sort(function (a, b) {
      if (a.k === null || b.k === null) return a.k === b.k ? a.n - b.n : (a.k === null ? 1 : -1);
      if (a.k < b.k) return -sign;
      if (a.k > b.k) return sign;
      return a.n - b.n;
    });
    var frag = document.createDocumentFragment();
    keyed.forEach(function (e) { frag.appendChild(e.row); });
    body.appendChild(frag);
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (c) { c.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === "desc" ? "descending" : "ascending");
    table.setAttribute("data-sorted", (th.getAttribute("data-key") || col) + ":" + dir);
  }

  function nextDir(th) {
    var current = th.getAttribute("aria-sort");
    if (current === "descending") return "asc";
    if (current === "ascending") return "desc";
    return th.getAttribute("data-default") || (th.getAttribute("data-type") === "num" ? "desc" : "asc");
  }

  function columnOf(table, key) {
    var cells = table.tHead.rows[0].cells;
    for (var c = 0; c < cells.length; c++) if (cells[c].getAttribute("data-key") === key) return c;
    return -1;
  }

  function bound(input) {
    var v = parseFloat(input.value);
    return isNaN(v) ? null : v;
  }

  /* a number input only takes an HTML floating-point number; anything else in a hash is dropped
     (assigning it would log a console warning and leave the input empty anyway) */
  var FLOAT = /^-?(\d+(\.\d+)?|\.\d+)([eE][-+]?\d+)?$/;
  function assign(input, v) {
    input.value = input.type === "number" && !FLOAT.test(v) ? "" : v;
  }

  function within(v, lo, hi) {  /* NaN (no number) fails any bound that is set */
    return (lo === null || v >= lo) && (hi === null || v <= hi);
  }

  /* ---- the index page: filter + hash state ---- */
  function indexPage(table) {
    var byId = document.getElementById.bind(document);
    var q = byId("q"), kind = byId("kind"), dead = byId("dead"), count = byId("count");
    var dmin = byId("dmin"), dmax = byId("dmax"), amin = byId("amin");
    var fields = [[q, "q"], [kind, "kind"], [dmin, "min_density"], [dmax, "max_density"], [amin, "min_max_act"]];
    var kindCol = columnOf(table, "kind");
    var rows = Array.prototype.map.call(table.tBodies[0].rows, function (row) {
      return { row: row, text: row.textContent.toLowerCase(), kind: row.cells[kindCol].textContent,
               dead: row.classList.contains("dead"), density: parseFloat(row.getAttribute("data-density")),
               maxAct: parseFloat(row.getAttribute("data-max-act")) };
    });
    var sort = { key: "index", dir: "asc" };

    function filter() {
      var needle = q.value.trim().toLowerCase(), k = kind.value, hideDead = dead.checked, shown = 0;
      var lo = bound(dmin), hi = bound(dmax), actLo = bound(amin);
      rows.forEach(function (r) {
        var ok = (!needle || r.text.indexOf(needle) >= 0) && (!k || r.kind === k) && !(hideDead && r.dead) &&
                 within(r.density, lo, hi) && within(r.maxAct, actLo, null);
        r.row.classList.toggle("hidden", !ok);
        if (ok) shown++;
      });
      count.textContent = shown + " of " + rows.length + " features";
    }
    function writeHash() {
      var p = new URLSearchParams();
      if (sort.key !== "index" || sort.dir !== "asc") { p.set("sort", sort.key); p.set("dir", sort.dir); }
      fields.forEach(function (f) { if (f[0].value) p.set(f[1], f[0].value); });
      if (!dead.checked) p.set("dead", "show");
      var h = p.toString();
      history.replaceState(null, "", h ? "#" + h : location.pathname + location.search);
    }
    function readHash() {
      var p = new URLSearchParams(location.hash.slice(1));
      fields.forEach(function (f) { assign(f[0], p.get(f[1]) || ""); });
      dead.checked = p.get("dead") !== "show";
      var col = columnOf(table, p.get("sort") || "index");
      if (col >= 0) {
        sort = { key: p.get("sort") || "index", dir: p.get("dir") === "desc" ? "desc" : "asc" };
        sortTable(table, col, sort.dir);
      }
      filter();
    }
    table.addEventListener("sorted", function (e) { sort = e.detail; writeHash(); });
    fields.map(function (f) { return f[0]; }).concat([dead]).forEach(function (el) {
      el.addEventListener("input", function () { filter(); writeHash(); });
    });
    window.addEventListener("hashchange", readHash);
    readHash();
  }

  /* ---- feature pages ---- */
  function featurePage() {
    var full = document.getElementById("full");
    if (full) full.addEventListener("click", function () {
      var on = document.body.classList.toggle("full");
      full.setAttribute("aria-pressed", on ? "true" : "false");
    });
    document.addEventListener("keydown", function (e) {
      if (e.target.tagName === "INPUT" || e.altKey || e.ctrlKey || e.metaKey) return;
      var link = document.getElementById(e.key === "ArrowLeft" ? "prev" : e.key === "ArrowRight" ? "next" : "");
      if (link) location.href = link.href;
    });
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      th.addEventListener("click", function () {
        var dir = nextDir(th);
        sortTable(table, col, dir);
        table.dispatchEvent(new CustomEvent("sorted", { detail: { key: th.getAttribute("data-key") || String(col), dir: dir } }));
      });
    });
  });
  var features = document.getElementById("features");
  if (features) indexPage(features);
  if (document.body.classList.contains("feature")) featurePage();
})();
