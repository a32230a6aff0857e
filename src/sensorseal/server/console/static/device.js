// Device page: poll the device's telemetry every 2 s, draw its numeric fields with uPlot.
"use strict";
(function () {
  var box = document.getElementById("chart");
  if (!box) return;
  var id = box.getAttribute("data-device");
  var plot = null, keys = [];
  var palette = ["#1f6feb", "#cf222e", "#1a7f37", "#9a6700", "#8250df", "#0a7ea4"];
  var tbody = document.querySelector("#readings tbody");

  function build(rows) {
    var found = {};
    rows.forEach(function (r) { Object.keys(r.values).forEach(function (k) { found[k] = true; }); });
    keys = Object.keys(found).sort().slice(0, 6);
    var series = [{}].concat(keys.map(function (k, i) {
      return { label: k, stroke: palette[i % palette.length], width: 2 };
    }));
    var width = Math.max(280, box.clientWidth);
    if (plot) plot.destroy();
    plot = new uPlot({ width: width, height: 260, series: series, axes: [{}, {}],
                       scales: { x: { time: true } } }, [[]].concat(keys.map(function () { return []; })), box);
  }

  function render(data) {
    var rows = data.telemetry.slice().reverse(); // oldest first
    var status = document.getElementById("status");
    if (status && data.status !== status.textContent) {
      status.textContent = data.status; status.className = "chip " + data.status;
    }
    var seen = document.getElementById("last-seen");
    if (seen && data.last_seen_ms) seen.textContent = window.ss.when(data.last_seen_ms);
    if (!rows.length) return;
    document.getElementById("chart-empty").hidden = true;
    var needed = {};
    rows.forEach(function (r) { Object.keys(r.values).forEach(function (k) { needed[k] = true; }); });
    var same = Object.keys(needed).sort().slice(0, 6).join() === keys.join();
    if (!plot || !same) build(rows);
    var cols = [rows.map(function (r) { return r.received_ms / 1000; })];
    keys.forEach(function (k) { cols.push(rows.map(function (r) { return k in r.values ? r.values[k] : null; })); });
    plot.setData(cols);
    tbody.textContent = "";
    data.telemetry.slice(0, 10).forEach(function (r) {
      var tr = document.createElement("tr");
      window.ss.cell(tr, String(r.seq));
      window.ss.cell(tr, window.ss.when(r.received_ms));
      window.ss.cell(tr, r.level);
      window.ss.cell(tr, r.payload, "reason");
      tbody.appendChild(tr);
    });
  }

  function poll() {
    window.ss.getJSON("/console/api/devices/" + encodeURIComponent(id) + "/telemetry?limit=200")
      .then(render).catch(function () {}).then(function () { setTimeout(poll, 2000); });
  }
  window.addEventListener("resize", function () { if (plot) plot.setSize({ width: Math.max(280, box.clientWidth), height: 260 }); });
  poll();
})();
