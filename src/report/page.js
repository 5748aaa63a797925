// Hover tooltips for token scores (and generated tokens' log p), next to the pointer; a click
// on a generated token shows the panel of its top proponents (the first token's at load).
(function () {
  var tip = document.getElementById("tip");
  if (!tip) return;
  document.addEventListener("mousemove", function (e) {
    var t = e.target;
    var cls = t && t.classList;
    if (!cls || !(cls.contains("t") || cls.contains("g"))) { tip.style.display = "none"; return; }
    tip.textContent = JSON.stringify(t.textContent) + "  " +
      (cls.contains("g") ? t.getAttribute("data-lp") : "score " + t.getAttribute("data-s"));
    tip.style.display = "block";
    tip.style.left = Math.min(e.clientX + 12, window.innerWidth - tip.offsetWidth - 8) + "px";
    tip.style.top = (e.clientY + 16) + "px";
  });
  function show(g) {
    var box = g.closest(".gen");
    var i = g.getAttribute("data-gi");
    box.querySelectorAll(".g").forEach(function (x) { x.classList.toggle("on", x === g); });
    box.querySelectorAll(".genpanel").forEach(function (p) {
      p.hidden = p.getAttribute("data-gi") !== i;
    });
  }
  document.addEventListener("click", function (e) {
    var t = e.target;
    if (t && t.classList && t.classList.contains("g")) show(t);
  });
  var gens = document.querySelectorAll(".gen");
  gens.forEach(function (box) {
    var first = box.querySelector(".g");
    if (first) show(first);
  });
  document.body.setAttribute("data-gen", String(gens.length));
  document.body.setAttribute("data-ready", "1");
})();
