// Passkeys on /account (add) and /signin (sign in with a discoverable credential).
// The server's WebAuthn options arrive as JSON (the webauthn library's options_to_json) and the
// credential goes back as JSON (PublicKeyCredential.toJSON), both with base64url binary fields.
"use strict";
(function () {
  function post(url, fields) {
    return fetch(url, {method: "POST", credentials: "same-origin", headers: {"Accept": "application/json"},
                       body: new URLSearchParams(fields)})
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (body) {
          if (!r.ok) { throw new Error(body.error || "That did not work. Reload the page and try again."); }
          return body;
        });
      });
  }
  function show(el, message) { el.textContent = message; el.hidden = false; }
  function supported(errorEl) {
    if (window.PublicKeyCredential && PublicKeyCredential.parseCreationOptionsFromJSON) { return true; }
    show(errorEl, "This browser does not support passkeys.");
    return false;
  }
  function browserError(err) {
    if (err && err.name === "NotAllowedError") { return "The passkey request was cancelled or timed out."; }
    return (err && err.message) || "The passkey did not work.";
  }

  var add = document.getElementById("passkey-add");
  if (add) {
    add.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var errorEl = document.getElementById("passkey-add-error");
      errorEl.hidden = true;
      if (!supported(errorEl)) { return; }
      var csrf = add.dataset.csrf;
      var name = document.getElementById("passkey-name").value;
      post("/account/passkeys/options", {csrf_token: csrf})
        .then(function (options) {
          return navigator.credentials.create({publicKey: PublicKeyCredential.parseCreationOptionsFromJSON(options)});
        })
        .then(function (credential) {
          return post("/account/passkeys", {csrf_token: csrf, name: name,
                                            credential: JSON.stringify(credential.toJSON())});
        })
        .then(function () { window.location.assign("/account#passkeys"); window.location.reload(); })
        .catch(function (err) { show(errorEl, browserError(err)); });
    });
  }

  var signin = document.getElementById("passkey-signin");
  if (signin) {
    signin.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var errorEl = document.getElementById("passkey-signin-error");
      errorEl.hidden = true;
      if (!supported(errorEl)) { return; }
      var csrf = signin.dataset.csrf;
      post("/signin/passkey/options", {csrf_token: csrf})
        .then(function (options) {
          return navigator.credentials.get({publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(options)});
        })
        .then(function (credential) {
          return post("/signin/passkey", {csrf_token: csrf, next: signin.dataset.next || "/account",
                                          credential: JSON.stringify(credential.toJSON())});
        })
        .then(function (body) { window.location.assign(body.redirect || "/account"); })
        .catch(function (err) { show(errorEl, browserError(err)); });
    });
  }
})();
