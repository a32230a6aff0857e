// Security events: poll with the page's filters every 2 s and prepend what is new.
"use strict";
(function () {
  var table = document.getElementById("events");
  if (!table) return;
  var tbody = table.querySelector("tbody");
  var params = new URLSearchParams();
  ["reason", "device", "since"].forEach(function (k) {
    var v = table.getAttribute("data-" + k);
    if (v) params.set(k, v);
  });
  params.set("limit", "200");
  var seen = {};
  tbody.querySelectorAll("tr").forEach(function (tr) { seen[tr.getAttribute("data-key")] = true; });

  function key(e) { return e.at_ms + "|" + e.reason + "|" + (e.device || "None") + "|" + e.detail; }

  function render(data) {
    var fresh = data.events.filter(function (e) { return !seen[key(e)]; }).reverse();
    fresh.forEach(function (e) {
      seen[key(e)] = true;
      var tr = document.createElement("tr");
      tr.className = "fresh";
      tr.setAttribute("data-key", key(e));
      window.ss.cell(tr, window.ss.when(e.at_ms));
      window.ss.cell(tr, e.reason, "reason");
      var td = window.ss.cell(tr, "");
      if (e.device) {
        var a = document.createElement("a");
        a.href = "/console/devices/" + encodeURIComponent(e.device);
        a.className = "id"; a.textContent = e.device; td.appendChild(a);
      } else td.textContent = "—";
      window.ss.cell(tr, e.transport);
      window.ss.cell(tr, e.source);
      window.ss.cell(tr, e.detail);
      tbody.insertBefore(tr, tbody.firstChild);
    });
    if (fresh.length) { var none = document.getElementById("no-events"); if (none) none.hidden = true; }
  }

  function poll() {
    window.ss.getJSON("/console/api/events?" + params.toString())
      .then(render).catch(function () {}).then(function () { setTimeout(poll, 2000); });
  }
  setTimeout(poll, 2000);
})();
