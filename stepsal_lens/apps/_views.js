// stepsal_lens explorer views (anywidget ESM, no dependencies, no network).
// The kernel sends ready-made data: cell colours, tick labels, boxes, texts, curve points.
// This file only draws SVG from the model's state, so a saved view re-renders exactly
// from that state, and the saved state carries data, not a plotting library.
// The state is untrusted (a results folder, an edited notebook): every string from it is
// drawn as text (textContent, setAttribute of fixed attribute names), never as markup;
// markup is only ever cleared (set to ""); ids and CSS class names made from it go through safeKey.
const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.appendChild(e);
  return e;
}

function text(parent, x, y, str, attrs) {
  const t = svg("text", { x, y, "font-size": 11, "font-family": "sans-serif", ...attrs }, parent);
  t.textContent = str;
  return t;
}

// The one sanitiser: a key from the state, reduced to [A-Za-z0-9_-] before it becomes part
// of an id, a CSS selector or a url(#...) reference.
function safeKey(key) {
  return String(key ?? "").replace(/[^A-Za-z0-9_-]/g, "");
}

// Hide the static PNG twin of this view (shown where widgets cannot run).
function hideStatic(key) {
  key = safeKey(key);
  if (!key || document.getElementById("stepsal-hide-" + key)) return;
  const style = document.createElement("style");
  style.id = "stepsal-hide-" + key;
  style.textContent = `.stepsal-static-${key}{display:none !important}`;
  document.head.appendChild(style);
}

function drawHeatmap(model, el) {
  const colors = model.get("colors"), values = model.get("z"), ticks = model.get("ticks");
  const texts = model.get("texts"), n = colors.length, cb = model.get("colorbar");
  const cell = Math.max(8, Math.min(36, Math.floor(380 / Math.max(n, 1))));
  const left = 58, top = 30, side = cell * n, width = left + side + 110;
  const height = top + side + 96;
  const root = svg("svg", { width, height, class: "stepsal-heatmap",
                            "data-title": model.get("title") }, null);
  text(root, left + side / 2, 16, model.get("title"),
       { "text-anchor": "middle", "font-size": 13, class: "stepsal-title" });
  const tip = document.createElement("div");
  tip.className = "stepsal-tooltip";
  tip.style.cssText = "position:absolute;display:none;pointer-events:none;max-width:420px;" +
    "background:#fff;border:1px solid #999;padding:4px 6px;font:12px sans-serif;z-index:10;" +
    "box-shadow:0 1px 4px rgba(0,0,0,.3)";
  const sel = model.get("selected");
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < n; j++) {
      const v = values[i][j];
      const r = svg("rect", { x: left + j * cell, y: top + i * cell, width: cell, height: cell,
                              fill: colors[i][j] || "#dddddd", class: "stepsal-cell",
                              "data-i": i, "data-j": j, "data-v": v === null ? "" : v }, root);
      if (sel && sel.length === 2 && sel[0] === i && sel[1] === j) {
        r.setAttribute("stroke", "#00e5ff");
        r.setAttribute("stroke-width", 2);
      }
      r.addEventListener("mousemove", (ev) => {
        tip.innerHTML = "";
        const lines = [`query step ${ticks[i]}: ${texts[i]}`, `key step ${ticks[j]}: ${texts[j]}`,
                       `${model.get("value_label")}: ${v === null ? "no step" : Number(v).toPrecision(4)}`];
        for (const line of lines) {
          const d = document.createElement("div");
          d.textContent = line;
          tip.appendChild(d);
        }
        const box = el.getBoundingClientRect();
        tip.style.left = (ev.clientX - box.left + 14) + "px";
        tip.style.top = (ev.clientY - box.top + 10) + "px";
        tip.style.display = "block";
      });
      r.addEventListener("mouseleave", () => { tip.style.display = "none"; });
      r.addEventListener("click", () => {
        model.set("selected", [i, j]);
        model.save_changes();
      });
    }
  }
  for (const b of model.get("boxes")) {
    svg("rect", { x: left + b.a * cell, y: top + b.a * cell, width: (b.b - b.a) * cell,
                  height: (b.b - b.a) * cell, fill: "none", stroke: b.color,
                  "stroke-width": 2, "pointer-events": "none" }, root);
  }
  const every = Math.max(1, Math.ceil(n / 16));
  for (let k = 0; k < n; k += every) {
    text(root, left - 4, top + k * cell + cell / 2 + 4, ticks[k], { "text-anchor": "end", "font-size": 9 });
    const t = text(root, 0, 0, ticks[k], { "text-anchor": "end", "font-size": 9 });
    t.setAttribute("transform", `translate(${left + k * cell + cell / 2 + 3},${top + side + 4}) rotate(-90)`);
  }
  text(root, left + side / 2, top + side + 40, "key step (source)", { "text-anchor": "middle" });
  const yl = text(root, 0, 0, "query step (reader)", { "text-anchor": "middle" });
  yl.setAttribute("transform", `translate(14,${top + side / 2}) rotate(-90)`);
  // legend for the segment boxes
  let lx = left;
  for (const [name, color] of Object.entries(model.get("legend"))) {
    svg("rect", { x: lx, y: top + side + 56, width: 12, height: 12, fill: "none", stroke: color,
                  "stroke-width": 2 }, root);
    text(root, lx + 16, top + side + 66, name);
    lx += 24 + 7 * name.length;
  }
  // colour bar
  const cx = left + side + 16, stops = cb.stops;
  const gid = "g" + safeKey(model.get("key"));
  const grad = svg("linearGradient", { id: gid, x1: 0, y1: 1, x2: 0, y2: 0 },
                   svg("defs", {}, root));
  stops.forEach((c, k) => svg("stop", { offset: k / (stops.length - 1), "stop-color": c }, grad));
  svg("rect", { x: cx, y: top, width: 12, height: side, fill: `url(#${gid})` }, root);
  text(root, cx + 16, top + side, cb.min, { "font-size": 9 });
  text(root, cx + 16, top + 8, cb.max, { "font-size": 9 });
  const cl = text(root, 0, 0, cb.label, { "text-anchor": "middle", "font-size": 10,
                                          class: "stepsal-colorbar-label" });
  cl.setAttribute("transform", `translate(${cx + 44},${top + side / 2}) rotate(90)`);
  return [root, tip];
}

function drawCurves(model) {
  const c = model.get("curves"), W = 400, H = 300, L = 52, R = 12, T = 28, B = 70;
  const root = svg("svg", { width: W, height: H, class: "stepsal-curves" }, null);
  text(root, W / 2, 16, c.title, { "text-anchor": "middle", "font-size": 13 });
  const xs = c.x, ys = c.series.flatMap((s) => s.y.filter((v) => v !== null));
  if (!xs.length || !ys.length) {
    text(root, W / 2, H / 2, "no metric to show", { "text-anchor": "middle" });
    return root;
  }
  let lo = Math.min(0, ...ys), hi = Math.max(...ys);
  if (hi <= lo) hi = lo + 1;
  const x0 = Math.min(...xs), x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
  const px = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const py = (y) => T + (1 - (y - lo) / (hi - lo)) * (H - T - B);
  svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#444" }, root);
  svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#444" }, root);
  for (const x of xs) text(root, px(x), H - B + 14, String(x), { "text-anchor": "middle", "font-size": 9 });
  for (let k = 0; k <= 4; k++) {
    const y = lo + (hi - lo) * k / 4;
    text(root, L - 4, py(y) + 3, y.toFixed(2), { "text-anchor": "end", "font-size": 9 });
  }
  text(root, L + (W - L - R) / 2, H - B + 30, c.x_title, { "text-anchor": "middle" });
  const yl = text(root, 0, 0, c.y_title, { "text-anchor": "middle" });
  yl.setAttribute("transform", `translate(12,${T + (H - T - B) / 2}) rotate(-90)`);
  svg("line", { x1: px(c.marker), x2: px(c.marker), y1: T, y2: H - B, stroke: "#888",
                "stroke-dasharray": "3,3", class: "stepsal-marker", "data-x": c.marker }, root);
  let lx = L;
  for (const s of c.series) {
    const pts = xs.map((x, k) => [x, s.y[k]]).filter((p) => p[1] !== null);
    svg("polyline", { points: pts.map((p) => `${px(p[0])},${py(p[1])}`).join(" "), fill: "none",
                      stroke: s.color, "stroke-width": 2 }, root);
    for (const p of pts) svg("circle", { cx: px(p[0]), cy: py(p[1]), r: 3, fill: s.color }, root);
    svg("line", { x1: lx, x2: lx + 14, y1: H - 14, y2: H - 14, stroke: s.color, "stroke-width": 2 }, root);
    text(root, lx + 18, H - 10, s.name);
    lx += 30 + 7 * s.name.length;
  }
  return root;
}

function render({ model, el }) {
  el.style.position = "relative";
  hideStatic(model.get("static_key"));
  if (model.get("kind") === "hide") return () => {};
  const draw = () => {
    el.innerHTML = "";
    if (model.get("kind") === "curves") {
      el.appendChild(drawCurves(model));
    } else {
      const [root, tip] = drawHeatmap(model, el);
      el.appendChild(root);
      el.appendChild(tip);
    }
  };
  draw();
  const names = ["z", "colors", "title", "ticks", "texts", "boxes", "legend", "colorbar",
                 "value_label", "selected", "curves"];
  for (const name of names) model.on("change:" + name, draw);
  return () => { for (const name of names) model.off("change:" + name, draw); };
}

export default { render };
