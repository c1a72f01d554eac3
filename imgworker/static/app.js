// imgworker web page: pick images (previews, remove), upload them in batches,
// follow each file and the whole run, retry or cancel a file, compare before
// and after, download one or all. When the server is unavailable, images are
// resized and encoded in the browser and tagged so.
// Plain JS, no build step; runs under the API's strict CSP (no inline code or
// style attributes: styles change through CSSOM and classes only).
"use strict";

const DEFAULT_LIMITS = { maxWidth: 1024, maxHeight: 1024, quality: 0.8, maxFileSizeMb: 50, batchMaxFiles: 20,
                         formats: ["jpeg", "png", "webp", "gif"] };
const POLL_MS = 500;
const HEALTH_MS = 4000;
// How long a run waits for a server that went away before finishing the
// rest in the browser (its jobs are durable: when it comes back, they go on).
const RECONNECT_MS = Number(localStorage.getItem("imgworker.reconnectMs")) || 15000;
const OPEN = new Set(["queued", "retrying", "processing", "waiting"]);
const FINAL = new Set(["done", "failed", "cancelled"]);
const FILE_FAULTS = new Set(["UNSUPPORTED_FORMAT", "INVALID_IMAGE", "IMAGE_TOO_LARGE", "FILE_TOO_LARGE", "NO_FILE"]);
const $ = (sel, root = document) => root.querySelector(sel);

let limits = loadLimits();
const server = { up: false, waiting: false, text: "" };
const items = [];                 // one per card, in the order picked
const pendingCancels = new Set(); // jobs given up while the server was away
let nextId = 1;
let polling = false;

function loadLimits() {
  try { return { ...DEFAULT_LIMITS, ...JSON.parse(localStorage.getItem("imgworker.limits") || "{}") }; }
  catch (e) { return { ...DEFAULT_LIMITS }; }
}

function formatBytes(n) {
  const a = Math.abs(n);
  if (a < 1024) return `${n} B`;
  if (a < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const stem = (name) => name.replace(/\.[^.]*$/, "") || name;

// ---- server status (live) -----------------------------------------------------------
function setPill(kind, text) {
  const pill = $("#server-status");
  pill.className = `pill ${kind}`;
  $(".text", pill).textContent = text;
}

async function checkServer() {
  try {
    const r = await fetch("/api/health", { cache: "no-store" });
    const body = await r.json();
    if (body.limits) {
      limits = { ...DEFAULT_LIMITS, ...body.limits };
      localStorage.setItem("imgworker.limits", JSON.stringify(limits));
      showLimits();
    }
    server.up = r.ok;
    if (!r.ok) setPill("down", `Server not processing (${body.reason || body.status}): images will be processed in your browser`);
    else if (body.paused) setPill("busy", `Server paused (${body.pauseReason || "memory"}): jobs wait in its queue`);
    else {
      const w = body.workers || {};
      setPill("ok", `Server ready · ${w.busy || 0} of ${w.alive || 0} workers busy`);
    }
  } catch (e) {
    server.up = false;
    setPill("down", "Server unavailable: images will be processed in your browser");
  }
  if (server.up) flushCancels();
  return server.up;
}

function showLimits() {
  $("#limits").textContent = `${limits.formats.map((f) => f.toUpperCase()).join(", ")} · up to ` +
    `${limits.maxFileSizeMb} MB each · resized to fit ${limits.maxWidth}×${limits.maxHeight}`;
  showFormats();
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

async function watchServer() {
  for (;;) {
    if (!server.waiting) await checkServer();
    await sleep(HEALTH_MS);
  }
}

function flushCancels() {
  for (const jobId of pendingCancels) {
    pendingCancels.delete(jobId);
    fetch(`/api/job/${jobId}`, { method: "DELETE" }).catch(() => pendingCancels.add(jobId));
  }
}

// ---- cards ------------------------------------------------------------------------------
function addItem(file) {
  const el = $("#file-card").content.firstElementChild.cloneNode(true);
  const item = { id: nextId++, file, el, state: "picked", preview: URL.createObjectURL(file), pct: 0 };
  $(".name", el).textContent = file.name;
  $(".name", el).title = file.name;
  const img = $(".thumb img", el);
  img.src = item.preview;
  img.alt = `Preview of ${file.name}`;
  img.addEventListener("error", () => el.classList.add("no-preview"), { once: true });
  $(".remove", el).setAttribute("aria-label", `Remove ${file.name}`);
  $(".remove", el).addEventListener("click", () => removeItem(item));
  $(".retry", el).addEventListener("click", () => retry(item));
  $(".cancel", el).addEventListener("click", () => cancel(item));
  $(".compare", el).addEventListener("click", () => openCompare(item));
  items.push(item);
  $("#files").appendChild(el);
  render(item);
  return item;
}

function removeItem(item) {
  if (!FINAL.has(item.state) && item.state !== "picked") return;
  URL.revokeObjectURL(item.preview);
  if (item.result && item.result.url.startsWith("blob:")) URL.revokeObjectURL(item.result.url);
  items.splice(items.indexOf(item), 1);
  item.el.remove();
  refreshControls();
}

function set(item, state, extra = {}) {
  Object.assign(item, extra, { state });
  render(item);
}

const STAGE = {
  picked: () => "ready", uploading: (i) => `uploading ${Math.round(i.pct)}%`,
  queued: (i) => (i.position ? `queued · #${i.position}` : "queued"),
  retrying: (i) => `retrying (${i.code || "error"})`, processing: (i) => (i.source === "browser" ? "processing in the browser" : "processing"),
  waiting: () => "waiting for the server…", done: () => "done", failed: () => "failed", cancelled: () => "cancelled",
};
const PROGRESS = { picked: 0, queued: 55, retrying: 55, waiting: 55, processing: 80, done: 100, failed: 100, cancelled: 100 };

function progressOf(item) {
  return item.state === "uploading" ? item.pct / 2 : PROGRESS[item.state];
}

function render(item) {
  const el = item.el;
  el.dataset.state = item.state;
  $(".stage", el).textContent = STAGE[item.state](item);
  let detail = formatBytes(item.file.size);
  if (item.state === "done") {
    const { before, after } = item.result;
    const saved = before - after;
    detail = `${formatBytes(before)} → ${formatBytes(after)} · ` +
      (saved >= 0 ? `saved ${(100 * saved / before).toFixed(0)}%` : `${formatBytes(-saved)} larger`);
  } else if (item.state === "failed") {
    detail = item.code ? `${item.error} (${item.code})` : item.error;
  }
  $(".detail", el).textContent = detail;
  const bar = $(".bar", el);
  if (item.state === "processing") bar.removeAttribute("value"); else bar.value = progressOf(item);
  $(".tag.browser", el).hidden = item.source !== "browser";
  $(".remove", el).hidden = !(item.state === "picked" || FINAL.has(item.state));
  // a file the server (or the browser) judged broken or unsupported would fail again
  $(".retry", el).hidden = item.state !== "failed" || FILE_FAULTS.has(item.code);
  $(".cancel", el).hidden = !((item.state === "queued" || item.state === "retrying") && item.jobId);
  $(".download", el).hidden = $(".compare", el).hidden = item.state !== "done";
  if (item.state === "done") {
    const a = $(".download", el);
    a.href = item.result.url;
    a.download = item.result.name;
    a.setAttribute("aria-label", `Download ${item.result.name}`);
    const img = $(".thumb img", el);
    if (img.src !== new URL(item.result.url, location.href).href) {
      img.src = item.result.url;
      img.alt = `Processed ${item.file.name}`;
    }
  }
  refreshControls();
}

function refreshControls() {
  const picked = items.filter((i) => i.state === "picked").length;
  const submit = $("#submit");
  submit.disabled = picked === 0;
  submit.textContent = picked ? `Process ${picked} image${picked > 1 ? "s" : ""}` : "Process images";
  $("#clear").disabled = !items.some((i) => i.state === "picked" || FINAL.has(i.state));
  const run = items.filter((i) => i.state !== "picked");
  $("#overall").hidden = run.length === 0;
  if (!run.length) return;
  const count = (s) => run.filter((i) => i.state === s).length;
  const done = run.filter((i) => i.state === "done");
  const before = done.reduce((n, i) => n + i.result.before, 0);
  const after = done.reduce((n, i) => n + i.result.after, 0);
  const parts = [`${done.length} of ${run.length} done`];
  if (count("failed")) parts.push(`${count("failed")} failed`);
  if (count("cancelled")) parts.push(`${count("cancelled")} cancelled`);
  if (done.length) parts.push(`saved ${formatBytes(before - after)}` + (before ? ` (${(100 * (before - after) / before).toFixed(0)}%)` : ""));
  if (server.waiting) parts.push("waiting for the server");
  $("#summary-text").textContent = parts.join(" · ");
  $("#overall-progress").value = run.reduce((n, i) => n + progressOf(i), 0) / run.length;
  $("#overall").classList.toggle("finished", run.every((i) => FINAL.has(i.state)));
  $("#download-all").disabled = done.length === 0;
  $("#fallback-note").hidden = !run.some((i) => i.source === "browser");
}

// format=auto: an XHR says "Accept: */*", which tells the server nothing about
// the images this browser shows; decode a 1-pixel AVIF and WebP once and say so.
const PROBES = {
  avif: "AAAAIGZ0eXBhdmlmAAAAAGF2aWZtaWYxbWlhZk1BMUIAAADrbWV0YQAAAAAAAAAhaGRscgAAAAAAAAAAcGljdAAAAAAAAAAAAAAAAAAAAAAOcGl0bQAAAAAAAQAAAB5pbG9jAAAAAEQAAAEAAQAAAAEAAAETAAAAKAAAAChpaW5mAAAAAAABAAAAGmluZmUCAAAAAAEAAGF2MDFDb2xvcgAAAABqaXBycAAAAEtpcGNvAAAAFGlzcGUAAAAAAAAAAQAAAAEAAAAQcGl4aQAAAAADCAgIAAAADGF2MUOBAAwAAAAAE2NvbHJuY2x4AAEADQAGgAAAABdpcG1hAAAAAAAAAAEAAQQBAoMEAAAAMG1kYXQSAAoIGAAGiAhoNCAyGhlHh4Yhh5555oAAAJBAyRxhSytNj1FFTqSg",
  webp: "UklGRjgAAABXRUJQVlA4ICwAAACQAQCdASoBAAEAAsBMJaACdLoAA5gA/u5DH+5sc4twV/9tD/9aH/60P+lAAA==",
};
let acceptPromise = null;
function imageAccept() {
  acceptPromise = acceptPromise || Promise.all(Object.entries(PROBES).map(async ([format, b64]) => {
    try {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      (await createImageBitmap(new Blob([bytes], { type: `image/${format}` }))).close();
      return `image/${format}`;
    } catch (e) { return null; }
  })).then((types) => [...types.filter(Boolean), "*/*;q=0.8"].join(","));
  return acceptPromise;
}

// ---- server path: batch upload with per-file upload progress --------------------------
function upload(url, form, onProgress, accept) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", url);
    if (accept) xhr.setRequestHeader("Accept", accept);
    xhr.responseType = "json";
    if (onProgress) xhr.upload.onprogress = onProgress;
    xhr.onload = () => resolve({ status: xhr.status, body: xhr.response || {} });
    xhr.onerror = () => reject(new Error("network error"));
    xhr.send(form);
  });
}

function fieldsForm() {
  const form = new FormData();
  form.append("format", $("#format").value);
  form.append("priority", $("#priority").value);
  return form;
}

async function uploadChunk(chunk) {
  const form = fieldsForm();
  chunk.forEach((i) => { form.append("images", i.file, i.file.name); set(i, "uploading", { pct: 0, source: "server" }); });
  const total = chunk.reduce((n, i) => n + i.file.size, 0) || 1;
  const accept = form.get("format") === "auto" ? await imageAccept() : null;
  const { status, body } = await upload("/api/process/batch", form, (ev) => {
    // map the bytes sent so far onto each file's slice of the body
    let offset = 0;
    const sent = ev.loaded * total / (ev.total || total);
    chunk.forEach((i) => {
      const pct = Math.max(0, Math.min(100, 100 * (sent - offset) / (i.file.size || 1)));
      offset += i.file.size;
      if (Math.round(pct) !== Math.round(i.pct)) set(i, "uploading", { pct });
    });
  }, accept);
  if (status >= 500 || status === 429) throw new Error(`the server answered ${status}`);
  const noRoom = [];
  for (const r of body.rejected || []) {
    const item = chunk[r.index];
    if (r.code === "QUEUE_FULL") noRoom.push(item); // the server took what fit
    else set(item, "failed", { error: r.error, code: r.code });
  }
  if (status !== 202) {
    if (!body.rejected) chunk.forEach((i) => set(i, "failed", { error: body.error || `HTTP ${status}`, code: body.code }));
    return;
  }
  for (const j of body.jobs) {
    set(chunk[j.index], "queued", { jobId: j.jobId, batchId: body.batchId, position: j.queuePosition });
  }
  for (const item of noRoom) await processInBrowser(item);
}

// ---- following jobs ------------------------------------------------------------------------
function apply(item, job) {
  if (job.status === "queued") set(item, "queued", { position: job.queuePosition });
  else if (job.status === "retrying") set(item, "retrying", { code: job.errorCode });
  else if (job.status === "processing") { if (item.state !== "processing") set(item, "processing"); }
  else if (job.status === "completed") {
    const res = job.result;
    const ext = res.processedFile.filename.split(".").pop();
    set(item, "done", { source: "server", result: { url: res.processedFile.url, name: `${stem(item.file.name)}.${ext}`,
      before: res.originalFile.size, after: res.processedFile.size } });
  } else if (job.status === "failed") set(item, "failed", { error: job.error || "failed", code: job.errorCode });
  else if (job.status === "cancelled") set(item, "cancelled");
}

async function getJson(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(`${url} answered ${r.status}`);
  return r.json();
}

async function pollOnce(open) {
  const byBatch = new Map();
  for (const item of open) {
    if (item.batchId) {
      if (!byBatch.has(item.batchId)) byBatch.set(item.batchId, new Map());
      byBatch.get(item.batchId).set(item.jobId, item);
    } else {
      apply(item, await getJson(`/api/job/${item.jobId}`));
    }
  }
  for (const [batchId, jobs] of byBatch) {
    const batch = await getJson(`/api/batch/${batchId}`);
    for (const job of batch.jobs) if (jobs.has(job.jobId)) apply(jobs.get(job.jobId), job);
  }
}

async function follow() {
  if (polling) return;
  polling = true;
  let failures = 0; // polls that failed while the server said it was up
  try {
    for (;;) {
      const open = items.filter((i) => i.jobId && OPEN.has(i.state));
      if (!open.length) break;
      try {
        await pollOnce(open);
        failures = 0;
      } catch (e) {
        if (++failures > 3 || !(await waitForServer(open))) { await abandon(open); failures = 0; }
        continue;
      }
      await sleep(POLL_MS);
    }
  } finally {
    polling = false;
  }
}

// The server went away with our jobs: they are durable, so wait for it (the
// files it finished are kept, never redone); if it stays away, finish the
// rest here and cancel its copies when it is back.
async function waitForServer(open) {
  server.waiting = true;
  open.forEach((i) => set(i, "waiting", { resumeState: i.state }));
  const deadline = Date.now() + RECONNECT_MS;
  try {
    while (Date.now() < deadline) {
      setPill("down", `Server unavailable: waiting ${Math.ceil((deadline - Date.now()) / 1000)} s for it to come back…`);
      await sleep(1000);
      if (await checkServer()) return true;
    }
    return false;
  } finally {
    server.waiting = false;
    refreshControls();
  }
}

async function abandon(open) {
  for (const item of open) {
    if (!OPEN.has(item.state)) continue;
    pendingCancels.add(item.jobId);
    item.jobId = null;
    item.batchId = null;
    await processInBrowser(item);
  }
}

// ---- retry and cancel ------------------------------------------------------------------------
async function retry(item) {
  const up = await checkServer();
  if (up && item.jobId && item.source === "server") {
    const r = await fetch(`/api/job/${item.jobId}/retry`, { method: "POST" }).catch(() => null);
    if (r && r.status === 202) { set(item, "queued", { position: null }); follow(); return; }
  }
  if (up) {
    const form = fieldsForm();
    form.append("image", item.file, item.file.name);
    set(item, "uploading", { pct: 0, source: "server" });
    try {
      const accept = form.get("format") === "auto" ? await imageAccept() : null;
      const { status, body } = await upload("/api/process/single", form,
        (ev) => set(item, "uploading", { pct: 100 * ev.loaded / (ev.total || 1) }), accept);
      if (status === 202) { set(item, "queued", { jobId: body.jobId, batchId: null, position: body.queuePosition }); follow(); return; }
      if (status < 500 && status !== 429) { set(item, "failed", { error: body.error, code: body.code }); return; }
    } catch (e) { /* fall through to the browser */ }
  }
  await processInBrowser(item);
}

async function cancel(item) {
  const r = await fetch(`/api/job/${item.jobId}`, { method: "DELETE" }).catch(() => null);
  if (r && r.ok) set(item, "cancelled");
}

// ---- browser fallback: canvas resize + encode within the same limits --------------------------
async function sniff(file) {
  const b = new Uint8Array(await file.slice(0, 16).arrayBuffer());
  const text = String.fromCharCode(...b);
  if (b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return "jpeg";
  if (text.startsWith("\x89PNG\r\n\x1a\n")) return "png";
  if (text.startsWith("GIF87a") || text.startsWith("GIF89a")) return "gif";
  if (text.startsWith("RIFF") && text.slice(8, 12) === "WEBP") return "webp";
  if (text.startsWith("BM")) return "bmp";
  if (text.startsWith("II*\0") || text.startsWith("MM\0*")) return "tiff";
  if (text.slice(4, 8) === "ftyp") return /^(avif|avis)/.test(text.slice(8, 12)) ? "avif" : "heic";
  return null;
}

// "original" in the browser: keep PNG and JPEG; canvas cannot write GIF, and
// animated WebP would lose its frames, so those become WebP.
const BROWSER_TYPES = { jpeg: "image/jpeg", png: "image/png", webp: "image/webp" };

async function processInBrowser(item) {
  set(item, "processing", { source: "browser" });
  try {
    const kind = await sniff(item.file);
    if (!kind || !limits.formats.includes(kind)) {
      const what = kind ? kind.toUpperCase() : "not an image format we recognise";
      return set(item, "failed", { code: "UNSUPPORTED_FORMAT",
        error: `Unsupported file type (${what}); accepted: ${limits.formats.map((f) => f.toUpperCase()).join(", ")}` });
    }
    if (item.file.size > limits.maxFileSizeMb * 1024 * 1024) {
      return set(item, "failed", { code: "FILE_TOO_LARGE", error: `The file is larger than the ${limits.maxFileSizeMb} MB limit` });
    }
    const wanted = $("#format").value;
    // canvas writes JPEG, PNG and WebP only: AVIF and "auto" become WebP here
    const format = wanted === "original" ? (kind === "png" || kind === "jpeg" ? kind : "webp")
      : BROWSER_TYPES[wanted] ? wanted : "webp";
    const bitmap = await createImageBitmap(item.file, { imageOrientation: "from-image" });
    const scale = Math.min(1, limits.maxWidth / bitmap.width, limits.maxHeight / bitmap.height);
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    const ctx = canvas.getContext("2d");
    if (format === "jpeg") { ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, canvas.width, canvas.height); }
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    const blob = await new Promise((res) => canvas.toBlob(res, BROWSER_TYPES[format], limits.quality));
    if (!blob) throw new Error("the browser could not encode the image");
    const ext = blob.type === "image/jpeg" ? "jpg" : blob.type.split("/")[1];
    set(item, "done", { result: { url: URL.createObjectURL(blob), name: `${stem(item.file.name)}.${ext}`,
      before: item.file.size, after: blob.size } });
  } catch (e) {
    set(item, "failed", { error: "The image could not be decoded in the browser", code: "INVALID_IMAGE" });
  }
}

// ---- runs --------------------------------------------------------------------------------------
async function run() {
  const batch = items.filter((i) => i.state === "picked");
  if (!batch.length) return;
  batch.forEach((i) => set(i, "uploading", { pct: 0 }));
  let up = await checkServer();
  for (let start = 0; start < batch.length; start += limits.batchMaxFiles) {
    const chunk = batch.slice(start, start + limits.batchMaxFiles);
    if (up) {
      try { await uploadChunk(chunk); follow(); continue; }
      catch (e) { up = false; setPill("down", `Server unavailable (${e.message}): processing in your browser`); }
    }
    for (const item of chunk) if (!item.jobId && !FINAL.has(item.state)) await processInBrowser(item);
  }
}

function downloadAll() {
  const done = items.filter((i) => i.state === "done");
  const batches = new Set(done.filter((i) => i.source === "server" && i.batchId).map((i) => i.batchId));
  const links = [...batches].map((b, n) => ({ href: `/api/batch/${b}/download`, name: `images${batches.size > 1 ? `-${n + 1}` : ""}.zip` }));
  for (const i of done) if (!(i.source === "server" && i.batchId)) links.push({ href: i.result.url, name: i.result.name });
  links.forEach((l, n) => setTimeout(() => {
    const a = document.createElement("a");
    a.href = l.href;
    a.download = l.name;
    document.body.appendChild(a);
    a.click();
    a.remove();
  }, n * 300)); // browsers drop rapid-fire downloads
}

// ---- before / after ------------------------------------------------------------------------------
function openCompare(item) {
  const dialog = $("#compare-dialog");
  $(".before", dialog).src = item.preview;
  $(".after", dialog).src = item.result.url;
  $("#compare-caption").textContent = `${item.file.name}: ${formatBytes(item.result.before)} before, ` +
    `${formatBytes(item.result.after)} after (${item.result.name})`;
  $("#compare-range").value = 50;
  split(50);
  dialog.showModal();
}

function split(value) {
  $(".before-clip").style.setProperty("clip-path", `inset(0 ${100 - value}% 0 0)`);
  $(".divider").style.setProperty("left", `${value}%`);
}

// ---- wiring --------------------------------------------------------------------------------------
function pick(files) {
  for (const f of files) addItem(f);
  refreshControls();
}

document.addEventListener("DOMContentLoaded", () => {
  const zone = $("#drop-zone");
  const input = $("#file-input");
  showLimits();
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("dragging"); pick(e.dataTransfer.files); });
  input.addEventListener("change", () => { pick(input.files); input.value = ""; });
  $("#upload-form").addEventListener("submit", (e) => { e.preventDefault(); run(); });
  $("#clear").addEventListener("click", () => items.filter((i) => i.state === "picked" || FINAL.has(i.state)).forEach(removeItem));
  $("#download-all").addEventListener("click", downloadAll);
  $("#compare-range").addEventListener("input", (e) => split(Number(e.target.value)));
  $("#compare-close").addEventListener("click", () => $("#compare-dialog").close());
  watchServer();
});
