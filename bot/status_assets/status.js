// Draws the status page from a snapshot (embedded, then polled from api/status) with inline SVG.
// Every value is inserted as text (textContent / setAttribute), never as markup.
(function () {
  "use strict";
  var T = JSON.parse(document.getElementById("texts").textContent);
  var query = new URLSearchParams(location.search);
  var token = query.get("token");
  var every = Math.max(1, Number(query.get("refresh")) || 5) * 1000;
  var SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, text) {
    var node = tag.indexOf("svg:") === 0 ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
    for (var key in attrs || {}) node.setAttribute(key, attrs[key]);
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function clock(ts) { var d = new Date(ts * 1000); return pad(d.getHours()) + ":" + pad(d.getMinutes()); }
  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function bytes(n) {
    if (n === null || n === undefined) return "—";
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }
  function duration(s) {
    var h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
    return h ? h + " " + T.hours + " " + m + " " + T.minutes : m + " " + T.minutes + " " + Math.floor(s % 60) + " " + T.seconds;
  }
  function stateText(state) { return T["state_" + state] || state; }
  function pill(state) { return el("span", {"class": "pill state-" + state.replace(" ", "-")}, stateText(state)); }

  function table(id, columns, rows, empty) {
    var node = document.getElementById(id);
    node.textContent = "";
    var head = el("tr");
    columns.forEach(function (c) { head.appendChild(el("th", c.num ? {"class": "num"} : {}, T[c.key] || c.key)); });
    node.appendChild(head);
    rows.forEach(function (row) {
      var tr = el("tr");
      columns.forEach(function (c) {
        var value = c.get(row), td = el("td", c.num ? {"class": "num"} : {});
        if (value instanceof Node) td.appendChild(value); else td.textContent = value === null || value === undefined ? "—" : String(value);
        tr.appendChild(td);
      });
      node.appendChild(tr);
    });
    if (!rows.length && empty) { var tr = el("tr"); tr.appendChild(el("td", {"colspan": columns.length, "class": "muted"}, empty)); node.appendChild(tr); }
  }

  // One chart: lines over the last hour's minutes; a dot (with its value as data) per non-zero point.
  function chart(id, title, minutes, lines, unit) {
    var W = 440, H = 170, L = 40, R = 12, TOP = 10, B = 22;
    var figure = el("figure", {"class": "chart", "id": "chart-" + id});
    figure.appendChild(el("figcaption", {}, title));
    var svg = el("svg:svg", {"viewBox": "0 0 " + W + " " + H, "role": "img", "aria-label": title});
    var max = 0, any = false;
    lines.forEach(function (line) { line.values.forEach(function (v) { if (v !== null) { any = any || v > 0; if (v > max) max = v; } }); });
    max = max > 0 ? niceCeil(max) : 1;
    var n = minutes.length, x = function (i) { return L + (W - L - R) * (n > 1 ? i / (n - 1) : 0); };
    var y = function (v) { return TOP + (H - TOP - B) * (1 - v / max); };
    [0, 0.5, 1].forEach(function (f) {
      svg.appendChild(el("svg:line", {"class": "axis", "x1": L, "x2": W - R, "y1": y(max * f), "y2": y(max * f)}));
      svg.appendChild(el("svg:text", {"class": "tick", "x": L - 4, "y": y(max * f) + 3, "text-anchor": "end"}, fmt(max * f)));
    });
    for (var i = 0; i < n; i += 15) svg.appendChild(el("svg:text", {"class": "tick", "x": x(i), "y": H - 6, "text-anchor": "middle"}, clock(minutes[i])));
    svg.appendChild(el("svg:text", {"class": "tick", "x": x(n - 1), "y": H - 6, "text-anchor": "end"}, clock(minutes[n - 1])));
    lines.forEach(function (line, k) {
      var points = [];
      line.values.forEach(function (v, i) { if (v !== null) points.push(x(i).toFixed(1) + "," + y(v).toFixed(1)); });
      if (points.length) svg.appendChild(el("svg:polyline", {"class": "line c" + (k % 5), "points": points.join(" "), "data-series": line.name}));
      line.values.forEach(function (v, i) {
        if (v !== null && v > 0) {
          var dot = el("svg:circle", {"class": "c" + (k % 5), "cx": x(i).toFixed(1), "cy": y(v).toFixed(1), "r": 2.6,
                                      "data-series": line.name, "data-minute": minutes[i], "data-value": v});
          dot.appendChild(el("svg:title", {}, line.name + " " + clock(minutes[i]) + ": " + fmt(v)));
          svg.appendChild(dot);
        }
      });
    });
    if (!any) svg.appendChild(el("svg:text", {"class": "empty", "x": W / 2, "y": H / 2, "text-anchor": "middle"}, T.no_data));
    figure.appendChild(svg);
    var legend = el("div", {"class": "legend"});
    lines.forEach(function (line, k) { var s = el("span"); s.appendChild(el("i", {"class": "c" + (k % 5)})); s.appendChild(document.createTextNode(line.label || line.name)); legend.appendChild(s); });
    figure.appendChild(legend);
    return figure;
  }
  function niceCeil(v) { var p = Math.pow(10, Math.floor(Math.log10(v))); var m = v / p; return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p; }
  function fmt(v) { return Math.abs(v) >= 100 || v === Math.round(v) ? String(Math.round(v)) : v.toFixed(v < 1 ? 2 : 1); }
  function short(model) { var parts = model.split("/"); return parts.slice(-2).join("/"); }
  function perModel(map) { return Object.keys(map).map(function (m) { return {name: m, label: short(m), values: map[m]}; }); }

  function render(s) {
    var badge = document.getElementById("readiness");
    badge.className = "badge " + (s.ready ? "ok" : "bad");
    badge.textContent = s.ready ? T.ready : T.not_ready;
    document.getElementById("clock").textContent = T.uptime + " " + duration(s.uptime_seconds) + " · " + T.updated + " " + new Date(s.now * 1000).toLocaleTimeString();
    table("adapters", [
      {key: "col_name", get: function (a) { return a.name; }},
      {key: "col_state", get: function (a) { return pill(a.state); }},
      {key: "col_since", get: function (a) { return new Date(a.since * 1000).toLocaleString(); }},
      {key: "col_detail", get: function (a) { return a.detail; }}
    ], s.adapters);
    table("models", [
      {key: "col_model", get: function (m) { var d = el("div", {}, m.model); if (m.error) d.appendChild(el("div", {"class": "error"}, m.error)); return d; }},
      {key: "col_roles", get: function (m) { return m.roles.join(", "); }},
      {key: "col_backend", get: function (m) { return m.backend; }},
      {key: "col_state", get: function (m) { return pill(m.state); }},
      {key: "col_device", get: function (m) { return m.device; }},
      {key: "col_memory", num: true, get: function (m) { return bytes(m.memory_bytes); }},
      {key: "col_load", num: true, get: function (m) { return m.load_seconds === null ? null : m.load_seconds + " s"; }},
      {key: "col_queue", num: true, get: function (m) { return m.queue; }},
      {key: "col_in_flight", num: true, get: function (m) { return m.in_flight; }},
      {key: "col_tokens", num: true, get: function (m) { return m.tokens; }}
    ], s.models);
    var series = s.series, charts = document.getElementById("charts");
    charts.textContent = "";
    charts.appendChild(chart("answers", T.chart_answers, series.minutes, [{name: "answers", values: series.answers}]));
    charts.appendChild(chart("tokens", T.chart_tokens, series.minutes, perModel(series.tokens_per_second), "tok/s"));
    charts.appendChild(chart("queue", T.chart_queue, series.minutes, perModel(series.queue)));
    charts.appendChild(chart("first-text", T.chart_first_text, series.minutes,
      [{name: "p50", values: series.first_text_p50}, {name: "p95", values: series.first_text_p95}], "s"));
    charts.appendChild(chart("429", T.chart_429, series.minutes, [{name: "429", values: series.rate_limited}]));
    table("usage", [
      {key: "col_user", get: function (u) { return u.user; }},
      {key: "col_messages", num: true, get: function (u) { return u.messages; }},
      {key: "col_tokens", num: true, get: function (u) { return u.tokens; }},
      {key: "col_agent_runs", num: true, get: function (u) { return u.agent_runs; }}
    ], s.usage, T.no_users);
    table("config", [{key: "col_setting", get: function (r) { return r[0]; }}, {key: "col_value", get: function (r) { return r[1]; }}], s.config);
    document.body.setAttribute("data-rendered", String(s.now));
  }

  var language = document.getElementById("language");
  var target = new URLSearchParams(location.search);
  target.set("lang", language.getAttribute("data-lang"));
  language.setAttribute("href", "?" + target.toString());

  render(JSON.parse(document.getElementById("initial").textContent));
  function poll() {
    fetch("api/status" + (token ? "?token=" + encodeURIComponent(token) : ""), {cache: "no-store"})
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(render)
      .catch(function (e) { document.getElementById("clock").textContent = String(e); })
      .then(function () { setTimeout(poll, every); });
  }
  setTimeout(poll, every);
})();
