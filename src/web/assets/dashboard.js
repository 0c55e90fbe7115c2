// The ckpool-rs dashboard: refreshes from /api every 10 s; the chart starts from /api/history
// and adds a point per refresh (kept for 24 h in the page).
"use strict";
(function () {
  var REFRESH_MS = 10000, KEEP_S = 24 * 3600;
  var xs = [], ys = [], plot = null;

  function si(h) {
    var u = ["", "K", "M", "G", "T", "P", "E", "Z"], i = 0;
    while (h >= 1000 && i < u.length - 1) { h /= 1000; i++; }
    return h.toFixed(h < 10 ? 2 : 1) + " " + u[i] + "H/s";
  }
  function ago(t) {
    if (!t) return "never";
    var s = Math.max(0, Math.round(Date.now() / 1000 - t));
    return s < 120 ? s + " s ago" : s < 7200 ? Math.round(s / 60) + " min ago" : Math.round(s / 3600) + " h ago";
  }
  function cell(tr, text) { var td = document.createElement("td"); td.textContent = text; tr.appendChild(td); }
  function fill(id, rows) {
    var body = document.querySelector("#" + id + " tbody");
    body.textContent = "";
    rows.forEach(function (r) {
      var tr = document.createElement("tr");
      r.forEach(function (c) { cell(tr, c); });
      body.appendChild(tr);
    });
  }
  function get(path) {
    return fetch(path, { cache: "no-store" }).then(function (r) {
      if (!r.ok) throw new Error(path + ": " + r.status);
      return r.json();
    });
  }
  function chart() {
    var el = document.getElementById("chart");
    var opts = {
      width: Math.min(1000, window.innerWidth - 60), height: 260,
      series: [{}, { label: "hashrate", stroke: "#2a6", width: 2, value: function (u, v) { return v == null ? "-" : si(v); } }],
      axes: [{}, { values: function (u, vals) { return vals.map(si); }, size: 90 }]
    };
    plot = new uPlot(opts, [xs, ys], el);
  }
  function addPoint(t, h) {
    if (xs.length && t <= xs[xs.length - 1]) return;
    xs.push(t); ys.push(h);
    while (xs.length && xs[0] < t - KEEP_S) { xs.shift(); ys.shift(); }
  }
  function refresh() {
    Promise.all([get("/api/pool"), get("/api/users"), get("/api/workers"), get("/api/blocks"),
                 get("/api/upstreams"), get("/api/clients")]).then(function (a) {
      var pool = a[0], users = a[1], workers = a[2], blocks = a[3], ups = a[4], cl = a[5];
      document.getElementById("err").textContent = "";
      var cards = document.getElementById("cards");
      cards.textContent = "";
      [["Hashrate 5m", si(pool.hashrate5m)], ["Hashrate 1h", si(pool.hashrate1hr)],
       ["Clients", pool.clients], ["Users", pool.users], ["Workers", pool.workers],
       ["Accepted", pool.accepted], ["Rejected", pool.rejected], ["Blocks", blocks.count],
       ["Height", blocks.height == null ? "-" : blocks.height]].forEach(function (c) {
        var s = document.createElement("span"), b = document.createElement("b");
        s.textContent = c[0] + ": "; b.textContent = String(c[1]); s.appendChild(b); cards.appendChild(s);
      });
      fill("users", Object.keys(users).map(function (n) {
        var u = users[n];
        return [n, si(u.hashrate5m), si(u.hashrate1hr), u.accepted, u.rejected, u.workers, ago(u.lastshare)];
      }));
      fill("workers", Object.keys(workers).map(function (n) {
        var w = workers[n];
        return [n, si(w.hashrate5m), si(w.hashrate1hr), w.accepted, w.rejected, Number(w.bestshare).toPrecision(4), ago(w.lastshare)];
      }));
      fill("blocks", blocks.blocks.slice().reverse().map(function (h) { return [h]; }));
      fill("upstreams", ups.servers.map(function (s) { return [s.url, s.state || (s.active ? "active" : "standby")]; }));
      fill("threads", cl.threads.map(function (t) { return [t.thread, t.open, t.accepted, t.refused, t.closed]; }));
      addPoint(Math.floor(Date.now() / 1000), pool.hashrate5m);
      if (plot) plot.setData([xs, ys]);
      document.getElementById("chart").setAttribute("data-points", String(xs.length));
    }).catch(function (e) { document.getElementById("err").textContent = "refresh failed: " + e.message; });
  }
  get("/api/history").then(function (h) {
    h.points.forEach(function (p) { addPoint(p[0], p[1]); });
  }).catch(function () {}).then(function () { chart(); refresh(); setInterval(refresh, REFRESH_MS); });
})();
