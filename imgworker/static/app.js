// imgworker web page: upload, follow each file, download; when the server is
// unavailable, resize and encode in the browser and say so.
// Plain JS, no build step; runs under the API's strict CSP (no inline code).
"use strict";

const DEFAULT_LIMITS = { maxWidth: 1024, maxHeight: 1024, quality: 0.8, maxFileSizeMb: 50, batchMaxFiles: 20,
                         formats: ["jpeg", "png", "webp", "gif"] };
const POLL_MS = 500;
const $ = (sel) => document.querySelector(sel);

let limits = loadLimits();
let serverUp = false;
let picked = [];

function loadLimits() {
  try { return { ...DEFAULT_LIMITS, ...JSON.parse(localStorage.getItem("imgworker.limits") || "{}") }; }
  catch (e) { return { ...DEFAULT_LIMITS }; }
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(2)} MB`;
}

async function checkServer() {
  const status = $("#server-status");
  try {
    const r = await fetch("/api/health", { cache: "no-store" });
    const body = await r.json();
    if (body.limits) {
      limits = { ...DEFAULT_LIMITS, ...body.limits };
      localStorage.setItem("imgworker.limits", JSON.stringify(limits));
    }
    serverUp = r.ok;
    status.textContent = r.ok ? "Server-side image processing available"
      : `Server not processing (${body.reason || body.status}): images will be processed in your browser`;
  } catch (e) {
    serverUp = false;
    status.textContent = "Server unavailable: images will be processed in your browser";
  }
  status.className = serverUp ? "ok" : "down";
  showFormats();
  $("#limits").textContent = `${limits.formats.map((f) => f.toUpperCase()).join(", ")}; up to ` +
    `${limits.maxFileSizeMb} MB each, ${limits.batchMaxFiles} at a time; resized to fit ` +
    `${limits.maxWidth}×${limits.maxHeight}.`;
  return serverUp;
}

// The output choices and the file picker follow what this server writes and
// accepts (/api/health: limits.outputFormats, limits.formats).
const FORMAT_LABELS = { webp: "WebP", jpeg: "JPEG (progressive)", png: "PNG", avif: "AVIF (smaller, slower)",
                        original: "Same as the original", auto: "Best for this browser (AVIF, WebP or JPEG)" };
const INPUT_TYPES = { jpeg: "image/jpeg", png: "image/png", webp: "image/webp", gif: "image/gif",
                      avif: "image/avif,.avif", heic: "image/heic,image/heif,.heic,.heif" };
function showFormats() {
  const select = $("#format");
  if (limits.outputFormats) {
    const chosen = select.value;
    select.replaceChildren(...limits.outputFormats.filter((f) => FORMAT_LABELS[f]).map((f) => {
      const option = document.createElement("option");
      option.value = f;
      option.textContent = FORMAT_LABELS[f];
      return option;
    }));
    select.value = limits.outputFormats.includes(chosen) ? chosen : (limits.outputFormat || "webp");
  }
  $("#file-input").accept = limits.formats.map((f) => INPUT_TYPES[f] || `image/${f}`).join(",");
}

// ---- one row per file -------------------------------------------------------
function addRow(file) {
  const li = $("#file-row").content.firstElementChild.cloneNode(true);
  li.querySelector(".name").textContent = `${file.name} (${formatBytes(file.size)})`;
  $("#files").appendChild(li);
  return {
    file, li,
    stage(text, percent) {
      li.querySelector(".stage").textContent = text;
      const bar = li.querySelector("progress");
      if (percent === null) bar.removeAttribute("value"); else bar.value = percent;
    },
    detail(text) { li.querySelector(".detail").textContent = text; },
    fail(message, code) {
      li.classList.add("failed");
      this.stage("failed", 100);
      this.detail(code ? `${message} (${code})` : message);
    },
    done(url, before, after, where, filename) {
      li.classList.add("done");
      this.stage(where === "browser" ? "done (processed in the browser)" : "done", 100);
      const img = document.createElement("img");
      img.src = url;
      img.alt = `Processed ${this.file.name}`;
      li.querySelector(".thumb").replaceChildren(img);
      const saved = before - after;
      this.detail(`${formatBytes(before)} → ${formatBytes(after)} ` +
        (saved >= 0 ? `(saved ${formatBytes(saved)}, ${(100 * saved / before).toFixed(1)}%)` : "(larger)"));
      if (where === "browser") {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = "Processed in the browser";
        li.querySelector(".name").appendChild(badge);
      }
      const a = document.createElement("a");
      a.href = url;
      a.download = filename;
      a.textContent = `Download ${filename}`;
      li.querySelector(".links").replaceChildren(a);
    },
  };
}

// ---- server path: one batch request, per-file upload progress, then polling ----
function uploadBatch(rows, fields) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    rows.forEach((r) => form.append("images", r.file, r.file.name));
    Object.entries(fields).forEach(([k, v]) => form.append(k, v));
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/process/batch");
    xhr.responseType = "json";
    const total = rows.reduce((n, r) => n + r.file.size, 0) || 1;
    xhr.upload.onprogress = (ev) => {
      // map the bytes sent so far onto each file's slice of the body
      let offset = 0;
      const sent = ev.loaded * total / (ev.total || total);
      rows.forEach((r) => {
        const pct = Math.max(0, Math.min(100, 100 * (sent - offset) / (r.file.size || 1)));
        r.stage(`uploading ${Math.round(pct)}%`, pct);
        offset += r.file.size;
      });
    };
    xhr.onload = () => resolve({ status: xhr.status, body: xhr.response || {} });
    xhr.onerror = () => reject(new Error("network error"));
    xhr.send(form);
  });
}

async function followBatch(batchId, byJob) {
  const finished = new Set();
  while (finished.size < byJob.size) {
    await new Promise((r) => setTimeout(r, POLL_MS));
    const r = await fetch(`/api/batch/${batchId}`, { cache: "no-store" });
    if (!r.ok) throw new Error(`batch status ${r.status}`);
    const batch = await r.json();
    for (const job of batch.jobs) {
      const row = byJob.get(job.jobId);
      if (!row || finished.has(job.jobId)) continue;
      if (job.status === "queued") row.stage(`queued (position ${job.queuePosition})`, 0);
      else if (job.status === "retrying") row.stage(`retrying (${job.errorCode || "error"})`, 0);
      else if (job.status === "processing") row.stage("processing", null);
      else if (job.status === "completed") {
        const res = job.result;
        const ext = res.processedFile.filename.split(".").pop();
        const name = row.file.name.replace(/\.[^.]*$/, "") + "." + ext;
        row.done(res.processedFile.url, res.originalFile.size, res.processedFile.size, "server", name);
        finished.add(job.jobId);
      } else {
        row.fail(job.error || `job ${job.status}`, job.errorCode);
        finished.add(job.jobId);
      }
    }
  }
}

async function processOnServer(rows, fields) {
  rows.forEach((r) => r.stage("uploading 0%", 0));
  const { status, body } = await uploadBatch(rows, fields);
  if (status >= 500 || status === 429) throw new Error(`server answered ${status}`);
  (body.rejected || []).forEach((x) => rows[x.index].fail(x.error, x.code));
  if (status !== 202) {
    if (!body.rejected) rows.forEach((r) => r.fail(body.error || `HTTP ${status}`, body.code));
    return;
  }
  const byJob = new Map();
  body.jobs.forEach((j) => { byJob.set(j.jobId, rows[j.index]); rows[j.index].stage(`queued (position ${j.queuePosition})`, 0); });
  await followBatch(body.batchId, byJob);
}

// ---- browser fallback: canvas resize + encode within the same limits ---------
async function processInBrowser(row, format) {
  row.stage("processing in the browser", null);
  const type = format === "jpeg" ? "image/jpeg" : format === "png" ? "image/png" : "image/webp";
  try {
    if (row.file.size > limits.maxFileSizeMb * 1024 * 1024) throw new Error(`larger than ${limits.maxFileSizeMb} MB`);
    const bitmap = await createImageBitmap(row.file, { imageOrientation: "from-image" });
    const scale = Math.min(1, limits.maxWidth / bitmap.width, limits.maxHeight / bitmap.height);
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    const ctx = canvas.getContext("2d");
    if (type === "image/jpeg") { ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height); }
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    const blob = await new Promise((res) => canvas.toBlob(res, type, limits.quality));
    if (!blob) throw new Error("the browser could not encode the image");
    const ext = blob.type === "image/jpeg" ? "jpg" : blob.type.split("/")[1];
    const name = row.file.name.replace(/\.[^.]*$/, "") + "." + ext;
    row.done(URL.createObjectURL(blob), row.file.size, blob.size, "browser", name);
  } catch (e) {
    row.fail(`Could not process in the browser: ${e.message || e}`, "INVALID_IMAGE");
  }
}

// "original" in the browser: keep PNG and JPEG as they are; canvas cannot
// write GIF, and animated WebP would lose its frames, so those become WebP.
function browserFormatOf(file) {
  if (file.type === "image/png") return "png";
  if (file.type === "image/jpeg") return "jpeg";
  return "webp";
}

// ---- wiring --------------------------------------------------------------------
async function run(files) {
  const format = $("#format").value;
  const fields = { format, priority: $("#priority").value };
  const rows = files.map(addRow);
  const up = await checkServer();
  const chunks = [];
  for (let i = 0; i < rows.length; i += limits.batchMaxFiles) chunks.push(rows.slice(i, i + limits.batchMaxFiles));
  for (const chunk of chunks) {
    if (up) {
      try { await processOnServer(chunk, fields); continue; }
      catch (e) { serverUp = false; $("#server-status").textContent = `Server unavailable (${e.message}): processing in your browser`; $("#server-status").className = "down"; }
    }
    for (const row of chunk) if (!row.li.classList.contains("done") && !row.li.classList.contains("failed")) {
      await processInBrowser(row, format === "original" ? browserFormatOf(row.file) : format);
    }
  }
}

function pick(files) {
  picked = Array.from(files);
  $("#submit").disabled = picked.length === 0;
  $("#submit").textContent = picked.length ? `Process ${picked.length} image${picked.length > 1 ? "s" : ""}` : "Process images";
}

document.addEventListener("DOMContentLoaded", () => {
  const zone = $("#drop-zone");
  const input = $("#file-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("dragging"); pick(e.dataTransfer.files); });
  input.addEventListener("change", () => pick(input.files));
  $("#upload-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const files = picked;
    pick([]);
    input.value = "";
    run(files);
  });
  checkServer();
});
