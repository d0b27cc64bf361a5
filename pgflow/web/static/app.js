// pgflow dashboard: the only script. Served as a file (the Content-Security-Policy forbids
// inline script). Two jobs:
// 1. Forms marked data-confirm ask with confirm() and then send confirmed=yes; without this
//    script the server asks on a confirmation page instead.
// 2. A page whose body has data-poll (an unfinished run) asks that JSON address every
//    data-poll-ms and reloads when the run's version changes; while a form field is being
//    edited it shows a notice instead, so nothing typed is lost.
"use strict";

document.addEventListener("submit", function (event) {
  var form = event.target;
  if (!(form instanceof HTMLFormElement) || !form.dataset.confirm) return;
  var field = form.querySelector("input[name=confirmed]");
  if (field && field.value === "yes") return;
  event.preventDefault();
  if (window.confirm(form.dataset.confirm)) {
    if (field) field.value = "yes";
    form.submit();
  }
});

(function poll() {
  var body = document.body;
  var url = body.dataset.poll;
  if (!url) return;
  var version = body.dataset.version;
  var every = parseInt(body.dataset.pollMs || "1500", 10);

  function editing() {
    var active = document.activeElement;
    if (active && (active.tagName === "INPUT" || active.tagName === "TEXTAREA") && active.form &&
        active.form.method === "post") return true;
    var fields = document.querySelectorAll("form[method=post] textarea, form[method=post] input[name=name]");
    for (var i = 0; i < fields.length; i++) if (fields[i].value) return true;
    return false;
  }

  function tick() {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (data) {
        if (data && data.version !== version) {
          if (editing()) {
            document.getElementById("changed").hidden = false;
          } else {
            window.location.reload();
            return;
          }
        }
        if (!data || !data.finished) window.setTimeout(tick, every);
      })
      .catch(function () { window.setTimeout(tick, every * 2); });
  }
  window.setTimeout(tick, every);
})();
