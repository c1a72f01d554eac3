// imgworker operator dashboard: polls /api/dashboard (the figures behind
// /api/stats and /metrics, plus the last hour per minute) and draws them.
// Plain JS, SVG built through the DOM; runs under the strict CSP.
"use strict";

const REFRESH_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const $ = (sel) => document.querySelector(sel);
let lastOk = 0;

const num = (n) => (n == null ? "–" : Number(n).toLocaleString("en-US"));
const ms = (n) => (!n ? "–" : n < 1000 ? `${Math.round(n)} ms` : `${(n / 1000).toFixed(1)} s`);
const clock = (t) => new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });

function text(sel, value) { const el = $(sel); if (el.textContent !== String(value)) el.textContent = value; }

function el(tag, attrs = {}, children = []) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  children.forEach((c) => node.appendChild(c));
  return node;
}

function rows(tbody, list, make, emptyText, cols) {
  const body = $(tbody);
  body.replaceChildren(...(list.length ? list.map(make) : [el("tr", {}, [el("td", { colspan: cols, class: "empty", text: emptyText })])]));
}

// ---- charts --------------------------------------------------------------------------------
function minutes(now) {
  const end = Math.floor(now / 60000) * 60000;
  return Array.from({ length: 60 }, (_, i) => end - (59 - i) * 60000);
}

function frame(box, maxY, unit) {
  const W = box.clientWidth || 600, H = box.clientHeight || 140, left = 34, bottom = 16;
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none" });
  for (const f of [0, 0.5, 1]) {
    const y = (H - bottom) * (1 - f) + 0.5;
    svg.appendChild(el("svg:line", { x1: left, x2: W, y1: y, y2: y, class: "grid-line" }));
    svg.appendChild(el("svg:text", { x: left - 4, y: y + 3, "text-anchor": "end", class: "axis", text: unit(maxY * f) }));
  }
  svg.appendChild(el("svg:text", { x: left, y: H - 3, class: "axis", text: "−60 min" }));
  svg.appendChild(el("svg:text", { x: W, y: H - 3, "text-anchor": "end", class: "axis", text: "now" }));
  return { svg, W, H, left, bottom, plotW: W - left, plotH: H - bottom };
}

function drawThroughput(activity, now) {
  const box = $("#throughput-chart");
  const by = new Map(activity.map((a) => [a.minute, a]));
  const slots = minutes(now).map((m) => by.get(m) || { completed: 0, failed: 0 });
  const maxY = Math.max(4, ...slots.map((s) => s.completed + s.failed));
  const f = frame(box, maxY, (v) => Math.round(v));
  const w = f.plotW / slots.length;
  slots.forEach((s, i) => {
    const x = f.left + i * w + 1;
    const hOk = f.plotH * s.completed / maxY, hBad = f.plotH * s.failed / maxY;
    if (s.completed) f.svg.appendChild(el("svg:rect", { x, width: Math.max(1, w - 2), y: f.plotH - hOk, height: hOk, class: "bar-ok" }, [el("svg:title", { text: `${s.completed} completed` })]));
    if (s.failed) f.svg.appendChild(el("svg:rect", { x, width: Math.max(1, w - 2), y: f.plotH - hOk - hBad, height: hBad, class: "bar-bad" }, [el("svg:title", { text: `${s.failed} failed` })]));
  });
  box.replaceChildren(f.svg);
  box.dataset.bars = String(slots.filter((s) => s.completed + s.failed).length);
}

function drawTimes(activity, now) {
  const box = $("#time-chart");
  const start = minutes(now)[0];
  const points = activity.filter((a) => a.avgMs != null && a.minute >= start);
  const maxY = Math.max(100, ...points.map((p) => p.avgMs)) * 1.1;
  const f = frame(box, maxY, (v) => ms(v) === "–" ? "0" : ms(v));
  if (!points.length) {
    f.svg.appendChild(el("svg:text", { x: f.left + f.plotW / 2, y: f.plotH / 2, "text-anchor": "middle", class: "nodata", text: "no completed jobs in the last hour" }));
  } else {
    const xy = points.map((p) => [f.left + ((p.minute - start) / 60000 + 0.5) * f.plotW / 60, f.plotH * (1 - p.avgMs / maxY)]);
    f.svg.appendChild(el("svg:polyline", { points: xy.map((p) => p.join(",")).join(" "), class: "line" }));
    xy.forEach(([x, y], i) => f.svg.appendChild(el("svg:circle", { cx: x, cy: y, r: 2.5, class: "dot" }, [el("svg:title", { text: ms(points[i].avgMs) })])));
  }
  box.replaceChildren(f.svg);
}

// ---- panels -------------------------------------------------------------------------------
function drawQueue(d) {
  const st = d.stats.byStatus || {};
  const total = Math.max(1, ...Object.values(st));
  const order = ["queued", "retrying", "processing", "completed", "failed", "cancelled"];
  $("#status-bars").replaceChildren(...order.map((s) => {
    const fill = el("span");
    fill.style.setProperty("width", `${100 * (st[s] || 0) / total}%`);
    return el("div", { class: `status-bar ${s}` }, [el("span", { text: s }), el("div", { class: "track" }, [fill]),
      el("span", { class: "n", id: `status-${s}`, text: num(st[s] || 0) })]);
  }));
  rows("#priority-rows", d.byPriority, (p) => el("tr", {}, [el("td", { text: p.priority > 0 ? `+${p.priority}` : String(p.priority) }),
    el("td", { text: num(p.queued) }), el("td", { text: num(p.retrying) }), el("td", { text: num(p.processing) })]),
  "No waiting or running jobs", 4);
}

function drawMemory(d) {
  const mem = d.stats.memory || {};
  const pct = mem.percent;
  const fill = $("#memory-fill");
  fill.style.setProperty("width", `${Math.min(100, pct || 0)}%`);
  fill.classList.toggle("high", pct >= d.memoryMarks.resume && pct < d.memoryMarks.pause);
  fill.classList.toggle("over", pct >= d.memoryMarks.pause);
  $("#mark-pause").style.setProperty("left", `${d.memoryMarks.pause}%`);
  $("#mark-resume").style.setProperty("left", `${d.memoryMarks.resume}%`);
  const where = mem.source === "cgroup" ? `of the service's memory limit (${num(mem.cgroupLimitMb)} MB)` : "of the host's memory";
  text("#memory-text", pct == null ? "No supervisor reporting" :
    `${pct}% ${where} · claiming pauses at ${d.memoryMarks.pause}% and resumes below ${d.memoryMarks.resume}%` +
    (mem.hostAvailableMb != null ? ` · ${num(mem.hostAvailableMb)} MB available on the host` : ""));
}

function drawWorkers(d) {
  const pool = [];
  const totals = { timeouts: 0, crashes: 0, recycled: 0, spawned: 0, retried: 0 };
  let configured = 0;
  for (const s of d.supervisors) {
    const st = s.state || {};
    configured += (st.workers || {}).configured || 0;
    (st.pool || []).forEach((w) => pool.push({ ...w, host: s.host }));
    for (const k of Object.keys(totals)) totals[k] += (st.counters || {})[k] || 0;
  }
  const w = d.stats.workers || {};
  text("#workers-summary", `${w.alive || 0} alive of ${w.configured || 0}, ${w.busy || 0} busy`);
  rows("#worker-rows", pool, (p) => el("tr", {}, [el("td", { text: String(p.slot) }), el("td", { text: String(p.pid) }),
    el("td", { class: p.busy ? "state-busy" : "state-idle", text: p.busy ? "busy" : "idle" }),
    el("td", { text: p.jobId ? p.jobId.slice(0, 8) : "–", title: p.jobId || "" }),
    el("td", { text: p.rssMb != null ? `${p.rssMb} MB` : "–" }), el("td", { text: num(p.jobsDone) })]),
  "No supervisor reporting", 6);
  const restarts = Math.max(0, totals.spawned - configured);
  $("#worker-counters").replaceChildren(...[["restarts", restarts], ["killed on timeout", totals.timeouts],
    ["crashed", totals.crashes], ["recycled (RSS)", totals.recycled], ["retries scheduled", totals.retried]]
    .map(([label, n]) => el("span", {}, [el("b", { text: num(n), id: `counter-${label.split(" ")[0]}` }), document.createTextNode(` ${label}`)])));
}

function drawFailures(d) {
  rows("#failure-rows", d.recentFailures, (f) => {
    const button = el("button", { class: "button small retry", type: "button", text: "Retry", "aria-label": `Retry ${f.filename}` });
    button.addEventListener("click", async () => {
      button.disabled = true;
      const r = await fetch(`/api/job/${f.jobId}/retry`, { method: "POST" }).catch(() => null);
      const body = r ? await r.json().catch(() => ({})) : {};
      button.textContent = r && r.status === 202 ? "Queued" : "Refused";
      button.title = r && r.status !== 202 ? body.error || "" : "";
    });
    return el("tr", {}, [el("td", { text: clock(f.failedAt) }), el("td", { text: f.filename }),
      el("td", { class: "code", text: f.code || "", title: f.error || "" }), el("td", { class: "err", text: f.error || "" }), el("td", {}, [button])]);
  }, "No failures", 5);
}

function drawTiles(d) {
  const s = d.stats;
  text("#kpi-waiting", num(s.currentQueueSize));
  text("#kpi-waiting-sub", `of ${num(d.maxQueueSize)} max`);
  text("#kpi-processing", num(s.currentProcessingCount));
  text("#kpi-processing-sub", `${(s.workers || {}).busy || 0} of ${(s.workers || {}).alive || 0} workers busy`);
  text("#kpi-completed", num(s.completedInLast24h));
  text("#kpi-completed-sub", `${num(s.completedJobs)} in all`);
  text("#kpi-failed", num(s.failedInLast24h));
  text("#kpi-failed-sub", `${num(s.failedJobs)} in all`);
  text("#kpi-avg", ms(s.averageProcessingTime));
  const since = d.now - 5 * 60000;
  const recent = d.activity.filter((a) => a.minute >= since - 60000).reduce((n, a) => n + a.completed, 0);
  text("#kpi-rate", (recent / 5).toFixed(1));
}

function drawState(d) {
  const pill = $("#service-state");
  const s = d.stats;
  let kind = "ok", label = `Running · ${s.supervisors} supervisor${s.supervisors === 1 ? "" : "s"}`;
  if (!s.supervisors) { kind = "down"; label = "No supervisor reporting: jobs are accepted but not processed"; }
  else if (s.paused) { kind = "busy"; label = "Paused"; }
  pill.className = `pill ${kind}`;
  text("#service-state .text", label);
  const banner = $("#paused-banner");
  banner.hidden = !s.paused;
  if (s.paused) banner.textContent = `Claiming paused: ${s.pauseReason || "memory pressure"}. Waiting jobs stay queued.`;
}

async function refresh() {
  try {
    const r = await fetch("/api/dashboard", { cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const d = await r.json();
    lastOk = Date.now();
    drawState(d); drawTiles(d); drawQueue(d); drawMemory(d); drawWorkers(d); drawFailures(d);
    drawThroughput(d.activity, d.now); drawTimes(d.activity, d.now);
    text("#updated", `updated ${clock(d.now)}`);
  } catch (e) {
    const pill = $("#service-state");
    pill.className = "pill down";
    text("#service-state .text", `API unreachable (${e.message})`);
    if (lastOk) text("#updated", `last update ${clock(lastOk)}`);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  refresh();
  setInterval(refresh, REFRESH_MS);
});
