// The auth app's one job for JavaScript: the sign-in request arrives in the URL fragment
// (/auth#?..., /auth#!?..., /auth/#!?...), which the browser never sends to a server. Read it and
// load the same page with the values in the query string; everything after that is plain forms.
(function () {
  "use strict";
  function read() {
    var raw = window.location.hash.replace(/^#[!/]*\??/, "");
    var given = new URLSearchParams(raw);
    var kept = new URLSearchParams();
    given.forEach(function (value, key) {
      if (key === "clientID" || key === "code" || key === "forwardUrl" ||
          /^context\[device\]\[[A-Za-z]{1,40}\]$/.test(key)) {
        kept.append(key, value);
      }
    });
    var complete = Boolean(kept.get("clientID") && kept.get("code"));
    document.getElementById("auth-reading").hidden = complete ? false : true;
    document.getElementById("auth-incomplete").hidden = complete;
    if (complete) {
      window.location.replace(window.location.pathname.replace(/\/$/, "") + "?" + kept.toString());
    }
  }
  window.addEventListener("hashchange", read);  // a link opened again in the same window
  read();
})();
