// The run page: polls /api/state each second, follows each stage's
// metrics from the byte it has read, and draws the DAG and the curves as
// plain SVG. Every text from the run (answers, errors, names) goes in with
// textContent, never as HTML; the report is HTML the server rendered with
// any HTML inside it escaped.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2f6fb8", "#d9622b", "#2a9d55", "#8e44ad", "#c0392b", "#16a2b8", "#b8860b", "#e0609e", "#5d6d7e", "#7cb342"];
const POLL_MS = 1000;
// Keys that are the x axis or say which step a line is, not a curve.
const NOT_CURVES = new Set(["step", "iteration", "epoch", "round"]);

const page = {
  stages: [],
  metrics: {},     // label -> {offset, rows}
  picked: {},      // label -> shown on the charts
  zoom: {},        // metric -> [x0, x1]
  dragging: false, // a zoom being drawn: no redraw under the mouse
  rolloutsOf: "",  // the stage whose rollouts show
  rolloutsFile: "",
  reportShown: false,
};

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

async function getJson(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(url + ": " + response.status);
  return response.json();
}

function colorOf(label) {
  const i = page.stages.findIndex((s) => s.label === label);
  return COLORS[(i < 0 ? 0 : i) % COLORS.length];
}

function duration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  const s = Math.round(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + String(s % 60).padStart(2, "0") + " s";
  return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
}

function stateText(s) {
  if (s.state === "queued") return "queued (Slurm job " + s.slurm_job + ")";
  if (s.slurm_job && s.state === "running") return "running (Slurm job " + s.slurm_job + ")";
  return s.state;
}

function progressText(s) {
  if (s.step === null || s.step === undefined) return "";
  if (!s.total) return "step " + s.step;
  return s.step + " / " + s.total + " (" + Math.floor((100 * s.step) / s.total) + "%)";
}

// ---- the DAG ----

function depths(stages) {
  const byLabel = new Map(stages.map((s) => [s.label, s]));
  const depth = new Map();
  const visit = (s, seen) => {
    if (depth.has(s.label)) return depth.get(s.label);
    if (seen.has(s.label)) return 0;
    seen.add(s.label);
    let d = 0;
    for (const u of s.upstream) if (byLabel.has(u)) d = Math.max(d, visit(byLabel.get(u), seen) + 1);
    depth.set(s.label, d);
    return d;
  };
  stages.forEach((s) => visit(s, new Set()));
  return depth;
}

function drawDag(stages) {
  const svg = document.getElementById("dag");
  svg.replaceChildren();
  const depth = depths(stages);
  const W = 150, H = 44, GX = 26, GY = 12;
  const rows = new Map();
  const at = new Map();
  for (const s of stages) {
    const d = depth.get(s.label);
    const r = rows.get(d) || 0;
    rows.set(d, r + 1);
    at.set(s.label, { x: 8 + d * (W + GX), y: 8 + r * (H + GY) });
  }
  const width = 16 + (Math.max(0, ...depth.values()) + 1) * (W + GX);
  const height = 16 + Math.max(1, ...rows.values()) * (H + GY);
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  for (const s of stages) {
    for (const u of s.upstream) {
      const a = at.get(u), b = at.get(s.label);
      if (!a) continue;
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
      svg.append(el("svg:path", { class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}` }));
    }
  }
  for (const s of stages) {
    const p = at.get(s.label);
    const g = el("svg:g", { class: "node n-" + s.state.replace(" ", "-"), "data-stage": s.label, transform: `translate(${p.x},${p.y})` });
    g.append(el("svg:rect", { width: W, height: H, rx: 6 }));
    g.append(el("svg:text", { x: 8, y: 16, "font-weight": "600" }, s.label.length > 22 ? s.label.slice(0, 21) + "…" : s.label));
    const eta = s.eta_seconds ? " · " + duration(s.eta_seconds) : "";
    const line = s.state === "running" && s.total ? progressText(s) + eta : stateText(s);
    g.append(el("svg:text", { x: 8, y: 33 }, line.length > 24 ? line.slice(0, 23) + "…" : line));
    g.append(el("svg:title", {}, s.label + ": " + stateText(s) + (s.detail ? "\n" + s.detail : "")));
    svg.append(g);
  }
}

function drawStageTable(stages) {
  const body = document.querySelector("#stages tbody");
  body.replaceChildren();
  for (const s of stages) {
    const tr = el("tr", { "data-stage": s.label, "data-state": s.state });
    tr.append(el("td", {}, s.label), el("td", {}, s.kind));
    const state = el("td");
    state.append(el("span", { class: "state s-" + s.state.replace(" ", "-") }, stateText(s)));
    tr.append(state, el("td", {}, progressText(s)));
    tr.append(el("td", {}, s.state === "running" ? duration(s.eta_seconds) : s.seconds ? "took " + duration(s.seconds) : ""));
    tr.append(el("td", { class: "text" }, s.detail || ""));
    body.append(tr);
  }
}

// ---- metrics ----

async function followMetrics(stage) {
  const m = page.metrics[stage.label] || (page.metrics[stage.label] = { offset: 0, rows: [] });
  let grew = false;
  for (let i = 0; i < 16; i++) {
    const chunk = await getJson("api/metrics?stage=" + encodeURIComponent(stage.label) + "&from=" + m.offset);
    if (chunk.reset) m.rows = [];
    m.rows.push(...chunk.rows);
    grew = grew || chunk.reset || chunk.rows.length > 0;
    m.offset = chunk.offset;
    if (!chunk.more) break;
  }
  return grew;
}

// A metrics line's numbers, one level of nesting flattened (`a/b`).
function numbers(row) {
  const out = {};
  for (const [k, v] of Object.entries(row)) {
    if (typeof v === "number" && isFinite(v)) out[k] = v;
    else if (v && typeof v === "object" && !Array.isArray(v)) {
      for (const [k2, v2] of Object.entries(v)) if (typeof v2 === "number" && isFinite(v2)) out[k + "/" + k2] = v2;
    }
  }
  return out;
}

function series() {
  const byMetric = new Map();
  for (const s of page.stages) {
    const m = page.metrics[s.label];
    if (!m || !page.picked[s.label]) continue;
    m.rows.forEach((row, i) => {
      const x = typeof row.step === "number" ? row.step : typeof row.iteration === "number" ? row.iteration : i;
      for (const [k, v] of Object.entries(numbers(row))) {
        if (NOT_CURVES.has(k)) continue;
        if (!byMetric.has(k)) byMetric.set(k, new Map());
        const lines = byMetric.get(k);
        if (!lines.has(s.label)) lines.set(s.label, []);
        lines.get(s.label).push([x, v]);
      }
    });
  }
  return byMetric;
}

// About n round values (1, 2 or 5 times a power of ten apart) in [lo, hi].
function ticks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n;
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  return out;
}

// The curves people look at first, then the rest by name.
const FIRST = ["loss", "eval_loss", "score", "reward", "kl", "accuracy", "eval_accuracy", "entropy", "clip_fraction", "lr"];
function chartOrder(a, b) {
  const ia = FIRST.indexOf(a), ib = FIRST.indexOf(b);
  if (ia >= 0 || ib >= 0) return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib);
  return a < b ? -1 : a > b ? 1 : 0;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return String(Number(v.toPrecision(3)));
}

function drawChart(metric, lines) {
  const W = 440, H = 210, L = 52, R = 10, T = 22, B = 26;
  const svg = el("svg:svg", { class: "chart", width: W, height: H, "data-metric": metric });
  const zoom = page.zoom[metric];
  const inView = (p) => !zoom || (p[0] >= zoom[0] && p[0] <= zoom[1]);
  const shown = [...lines.entries()].map(([label, pts]) => [label, pts.filter(inView)]);
  const all = shown.flatMap(([, pts]) => pts);
  svg.setAttribute("data-points", String(all.length));
  svg.append(el("svg:text", { x: L, y: 14, "font-weight": "600" }, metric));
  if (all.length === 0) return svg;
  let [x0, x1] = zoom || [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  for (const t of ticks(y0, y1, 4)) {
    svg.append(el("svg:line", { class: "grid", x1: L, x2: W - R, y1: sy(t), y2: sy(t) }));
    svg.append(el("svg:text", { x: L - 4, y: sy(t) + 4, "text-anchor": "end" }, fmt(t)));
  }
  for (const t of ticks(x0, x1, 4)) {
    const anchor = sx(t) > W - R - 12 ? "end" : "middle";
    svg.append(el("svg:text", { x: sx(t), y: H - 8, "text-anchor": anchor }, fmt(t)));
  }
  svg.append(el("svg:line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  svg.append(el("svg:line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  for (const [label, pts] of shown) {
    if (pts.length === 0) continue;
    const color = colorOf(label);
    if (pts.length === 1) {
      svg.append(el("svg:circle", { cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 2.5, fill: color }));
    } else {
      const d = pts.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
      svg.append(el("svg:polyline", { class: "line", points: d, stroke: color }));
    }
  }
  zoomable(svg, metric, (px) => x0 + ((px - L) / (W - L - R)) * (x1 - x0));
  return svg;
}

// Drag across a chart to zoom on steps; double-click to zoom out.
function zoomable(svg, metric, toX) {
  let start = null, box = null;
  const px = (e) => e.clientX - svg.getBoundingClientRect().left;
  svg.addEventListener("mousedown", (e) => {
    start = px(e);
    page.dragging = true;
    box = el("svg:rect", { class: "sel", x: start, y: 0, width: 0, height: svg.getAttribute("height") });
    svg.append(box);
  });
  svg.addEventListener("mousemove", (e) => {
    if (start === null) return;
    const now = px(e);
    box.setAttribute("x", Math.min(start, now));
    box.setAttribute("width", Math.abs(now - start));
  });
  svg.addEventListener("mouseup", (e) => {
    if (start === null) return;
    const end = px(e);
    if (Math.abs(end - start) > 4) page.zoom[metric] = [toX(Math.min(start, end)), toX(Math.max(start, end))];
    start = null;
    page.dragging = false;
    drawCharts();
  });
  svg.addEventListener("mouseleave", () => {
    if (start === null) return;
    start = null;
    page.dragging = false;
    box.remove();
  });
  svg.addEventListener("dblclick", () => {
    delete page.zoom[metric];
    drawCharts();
  });
}

function drawPicks() {
  const picks = document.getElementById("picks");
  const withMetrics = page.stages.filter((s) => page.metrics[s.label] && page.metrics[s.label].rows.length);
  const have = [...picks.querySelectorAll("input")].map((i) => i.value).join("\n");
  if (have === withMetrics.map((s) => s.label).join("\n")) return;
  picks.replaceChildren();
  for (const s of withMetrics) {
    if (!(s.label in page.picked)) page.picked[s.label] = true;
    const box = el("input", { type: "checkbox", value: s.label });
    box.checked = page.picked[s.label];
    box.addEventListener("change", () => {
      page.picked[s.label] = box.checked;
      drawCharts();
    });
    const label = el("label");
    label.append(box, el("span", { class: "swatch" }), document.createTextNode(s.label));
    label.querySelector(".swatch").style.background = colorOf(s.label);
    picks.append(label);
  }
}

function drawCharts() {
  drawPicks();
  const charts = document.getElementById("charts");
  const byMetric = series();
  charts.replaceChildren(...[...byMetric.keys()].sort(chartOrder).map((k) => drawChart(k, byMetric.get(k))));
}

// ---- rollouts, labelling, report ----

async function showRollouts() {
  const select = document.getElementById("rollout-stage");
  const rl = page.stages.filter((s) => s.rollouts);
  const names = rl.map((s) => s.label);
  if ([...select.options].map((o) => o.value).join("\n") !== names.join("\n")) {
    select.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    const running = rl.filter((s) => s.state === "running").pop();
    if (!names.includes(page.rolloutsOf)) page.rolloutsOf = (running || rl[rl.length - 1] || {}).label || "";
    select.value = page.rolloutsOf;
    select.onchange = () => { page.rolloutsOf = select.value; page.rolloutsFile = ""; showRollouts(); };
  }
  const stage = rl.find((s) => s.label === page.rolloutsOf);
  if (!stage || stage.rollouts === page.rolloutsFile) return;
  const got = await getJson("api/rollouts?stage=" + encodeURIComponent(stage.label));
  page.rolloutsFile = got.file;
  document.getElementById("rollout-file").textContent = got.file ? stage.label + "/rollouts/" + got.file : "";
  const body = document.querySelector("#rollouts tbody");
  body.replaceChildren(...got.rows.map((r) => {
    const tr = el("tr");
    tr.append(el("td", { class: "text" }, r.prompt), el("td", { class: "text answer" }, r.answer), el("td", {}, r.score === null ? "" : fmt(r.score)));
    return tr;
  }));
}

function showLabelling(queues) {
  document.getElementById("labelling-section").hidden = queues.length === 0;
  const body = document.querySelector("#labelling tbody");
  body.replaceChildren(...queues.map((q) => {
    const s = q.summary;
    const tr = el("tr", { "data-queue": q.queue });
    const labels = s.ranked + " ranked, " + s.skipped + " skipped, " + s.not_rankable + " not rankable";
    const pct = (v) => (v === null || v === undefined ? "" : (100 * v).toFixed(1) + "%");
    tr.append(el("td", {}, q.queue), el("td", {}, q.done + " / " + s.groups + " (" + s.labels_per_group + " labels each)"),
      el("td", {}, labels), el("td", {}, s.labellers), el("td", {}, pct(s.agreement)),
      el("td", {}, s.kendall_tau === null || s.kendall_tau === undefined ? "" : s.kendall_tau.toFixed(2)));
    return tr;
  }));
}

async function showReport(exists) {
  document.getElementById("report-section").hidden = !exists;
  if (!exists || page.reportShown) return;
  const got = await getJson("api/report");
  if (got.html) {
    // Rendered by the server from report.md, any HTML in it escaped.
    document.getElementById("report").innerHTML = got.html;
    page.reportShown = true;
  }
}

// ---- the loop ----

async function poll() {
  try {
    const run = await getJson("api/state");
    page.stages = run.stages;
    document.getElementById("title").textContent = run.name + (run.experiment ? " (" + run.experiment + ")" : "");
    document.title = "rlhf watch: " + run.name;
    const live = document.getElementById("live");
    live.textContent = run.live ? "running (pid " + run.holder_pid + ")" : "not running";
    live.className = "badge" + (run.live ? " live" : "");
    drawDag(run.stages);
    drawStageTable(run.stages);
    let grew = false;
    for (const s of run.stages) {
      if (s.state === "waiting" || s.state === "not started") continue;
      grew = (await followMetrics(s)) || grew;
    }
    if ((grew || !document.querySelector("#charts svg")) && !page.dragging) drawCharts();
    await showRollouts();
    showLabelling(run.labelling);
    await showReport(run.report);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("updated").textContent = "cannot reach rlhf watch: " + e.message;
  }
  setTimeout(poll, POLL_MS);
}

poll();
