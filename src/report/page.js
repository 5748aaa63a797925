// Hover tooltips for token scores: the token and its score, next to the pointer.
(function () {
  var tip = document.getElementById("tip");
  if (!tip) return;
  document.addEventListener("mousemove", function (e) {
    var t = e.target;
    if (!t || !t.classList || !t.classList.contains("t")) { tip.style.display = "none"; return; }
    tip.textContent = JSON.stringify(t.textContent) + "  score " + t.getAttribute("data-s");
    tip.style.display = "block";
    tip.style.left = Math.min(e.clientX + 12, window.innerWidth - tip.offsetWidth - 8) + "px";
    tip.style.top = (e.clientY + 16) + "px";
  });
  document.body.setAttribute("data-ready", "1");
})();
