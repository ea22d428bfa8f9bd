// Countdown and copy button of the claim page (the page works without them).
(function () {
  var el = document.getElementById("countdown");
  if (el) {
    var left = parseInt(el.dataset.seconds, 10);
    var tick = function () {
      if (left <= 0) { el.textContent = "expired: reload the page for a new token"; return; }
      el.textContent = Math.floor(left / 60) + ":" + String(left % 60).padStart(2, "0") + " left";
      left -= 1; setTimeout(tick, 1000);
    };
    tick();
  }
  document.querySelectorAll("button[data-copy]").forEach(function (b) {
    b.hidden = false;
    b.addEventListener("click", function () {
      var text = document.getElementById(b.dataset.copy).textContent.trim();
      navigator.clipboard.writeText(text).then(function () { b.textContent = "Copied"; });
    });
  });
})();
