// sensorseal console: small helpers shared by every page. No inline script anywhere (CSP).
"use strict";
(function () {
  // Copy buttons: <button data-copy="element-id">
  document.querySelectorAll("[data-copy]").forEach(function (btn) {
    btn.addEventListener("click", function () {
      var el = document.getElementById(btn.getAttribute("data-copy"));
      if (!el) return;
      el.select();
      var done = function () {
        var note = btn.parentElement.querySelector("[data-copied]");
        if (note) note.hidden = false;
      };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(el.value).then(done, function () { document.execCommand("copy"); done(); });
      } else { document.execCommand("copy"); done(); }
    });
  });
  // Confirmation for destructive forms: <form data-confirm="...">
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      if (!window.confirm(form.getAttribute("data-confirm"))) ev.preventDefault();
    });
  });
})();

// Shared by device.js and events.js: build DOM from data without ever parsing it as HTML.
window.ss = {
  cell: function (tr, text, cls) {
    var td = document.createElement("td");
    if (cls) { var span = document.createElement("span"); span.className = cls; span.textContent = text; td.appendChild(span); }
    else td.textContent = text;
    tr.appendChild(td);
    return td;
  },
  when: function (ms) {
    return new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  },
  getJSON: function (url) {
    return fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); });
  }
};
