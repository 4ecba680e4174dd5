// sonodistill app: pick a model, drop a file, watch the mask at the measured speed.
// Plain JavaScript, no dependencies: the page works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const HEADERS = { "X-Sonodistill": "1" };  // the server refuses state changes without it
const COLOURS = [[0, 0, 0], [255, 196, 0], [0, 200, 255], [255, 64, 160], [120, 255, 80],
  [180, 120, 255]];

const state = {
  models: [], session: null, rows: [], frames: [], probs: [], labels: [], loaded: 0,
  current: 0, playing: false, acc: 0, last: 0, poll: null, spacing: null,
};

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function detail(response) {
  try { return (await response.json()).detail || response.statusText; }
  catch (e) { return response.statusText; }
}

async function loadModels() {
  const response = await fetch("/api/models");
  const info = await response.json();
  state.models = info.models;
  $("limit").textContent = info.max_upload_mb;
  $("smooth-hint").textContent = `(EMA ${info.smoothing})`;
  const select = $("model");
  select.replaceChildren(...info.models.map((m) => new Option(
    `${m.label} (${m.task_type}, ${m.image_size} px)`, m.id)));
  fillBackends();
  setStatus(info.models.length ? "Choose a file." : "No model found.", !info.models.length);
}

function fillBackends() {
  const model = state.models.find((m) => m.id === $("model").value);
  const select = $("backend");
  select.replaceChildren(...(model ? model.backends : []).map((b) => new Option(b.label, b.id)));
}

async function upload(file) {
  if (!file) return;
  await closeSession(false);
  const params = new URLSearchParams({
    model: $("model").value, backend: $("backend").value, name: file.name,
    smooth: $("smooth").checked ? "true" : "false",
  });
  setStatus(`Uploading ${file.name}…`);
  const response = await fetch(`/api/sessions?${params}`, {
    method: "POST", headers: HEADERS, body: file,
  });
  if (!response.ok) {
    setStatus(`Refused: ${await detail(response)}`, true);
    return;
  }
  state.session = await response.json();
  $("close").disabled = false;
  setStatus(`Running ${state.session.name}…`);
  poll();
}

async function poll() {
  const s = state.session;
  if (!s) return;
  const response = await fetch(`/api/sessions/${s.id}?since=${state.rows.length}`);
  if (!response.ok) { setStatus(`Session lost: ${await detail(response)}`, true); return; }
  const info = await response.json();
  if (!state.session || state.session.id !== info.id) return;
  Object.assign(state.session, info, { frames: undefined });
  state.spacing = info.spacing_mm;
  for (const row of info.frames) {
    state.rows.push(row);
    loadFrame(state.rows.length - 1);
  }
  const total = info.total || "?";
  if (info.status === "failed") {
    setStatus(`Failed after ${info.done} frames: ${info.error}`, true);
  } else if (info.status === "done") {
    const t = info.timing;
    setStatus(`Done: ${info.done} frame${info.done === 1 ? "" : "s"} of ${info.name} (${info.kind}).`);
    $("fps").textContent = `${t.fps_end_to_end.toFixed(1)} frames/s end to end ` +
      `(model alone ${t.fps_model_only.toFixed(1)})`;
    updateDownloads();
  } else {
    setStatus(`Running ${info.name}: ${info.done} / ${total} frames…`);
    state.poll = setTimeout(poll, 150);
  }
  $("seek").max = Math.max(0, state.rows.length - 1);
}

async function loadImage(url) {
  const image = new Image();
  image.src = url;
  await image.decode();
  return image;
}

function pixels(image) {
  const canvas = document.createElement("canvas");
  canvas.width = image.width; canvas.height = image.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(image, 0, 0);
  const rgba = ctx.getImageData(0, 0, image.width, image.height).data;
  const out = new Uint8Array(image.width * image.height);
  for (let i = 0; i < out.length; i++) out[i] = rgba[4 * i];
  return out;
}

async function loadFrame(i) {
  const s = state.session;
  const base = `/api/sessions/${s.id}`;
  const frame = await loadImage(`${base}/frames/${i}.jpg`);
  if (s.task_type === "seg") {
    state.probs[i] = pixels(await loadImage(`${base}/probs/${i}.png`));
    if (s.classes.length > 2) state.labels[i] = pixels(await loadImage(`${base}/labels/${i}.png`));
  }
  if (state.session !== s) return;
  state.frames[i] = frame;
  state.loaded += 1;
  if (i === 0) {
    $("play").disabled = false;
    $("seek").disabled = false;
    render(0);
    play(true);
  }
}

function render(i) {
  const frame = state.frames[i];
  if (!frame) return;
  const canvas = $("view");
  if (canvas.width !== frame.width || canvas.height !== frame.height) {
    canvas.width = frame.width; canvas.height = frame.height;
  }
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(frame, 0, 0);
  const row = state.rows[i];
  const s = state.session;
  if (s.task_type === "seg") {
    const area = drawMask(ctx, frame.width, frame.height, state.probs[i], state.labels[i]);
    const mm2 = state.spacing ? ` (${(area * state.spacing[0] * state.spacing[1]).toFixed(1)} mm²)`
      : " (no pixel spacing in this file)";
    $("area").textContent = `${area} px${mm2}`;
  } else {
    const p = row[`p_${row.predicted}`];
    ctx.font = `${Math.max(14, frame.height / 18)}px system-ui`;
    ctx.fillStyle = "rgb(255,196,0)";
    ctx.fillText(`${row.predicted} ${p.toFixed(2)}`, 8, Math.max(20, frame.height / 14));
    $("area-label").textContent = "Class";
    $("area").textContent = `${row.predicted} (p = ${p.toFixed(3)})`;
  }
  const time = row.time_s === null ? "" : `, t = ${row.time_s.toFixed(2)} s`;
  $("frame-info").textContent = `${i + 1} / ${s.total || state.rows.length}${time}`;
  $("latency").textContent = `${row.latency_ms.toFixed(1)} ms per frame ` +
    `(model ${row.model_ms.toFixed(1)} ms)`;
  $("seek").value = i;
}

function drawMask(ctx, w, h, prob, labels) {
  if (!prob) return 0;
  const image = ctx.getImageData(0, 0, w, h);
  const d = image.data;
  const thr = Math.round(parseFloat($("threshold").value) * 255);
  const a = parseFloat($("opacity").value);
  const fg = new Uint8Array(w * h);
  let area = 0;
  for (let k = 0; k < fg.length; k++) {
    if (prob[k] < thr) continue;
    const c = COLOURS[Math.min(labels ? labels[k] : 1, COLOURS.length - 1)];
    fg[k] = 1; area += 1;
    d[4 * k] = d[4 * k] * (1 - a) + c[0] * a;
    d[4 * k + 1] = d[4 * k + 1] * (1 - a) + c[1] * a;
    d[4 * k + 2] = d[4 * k + 2] * (1 - a) + c[2] * a;
  }
  for (let y = 0; y < h; y++) {  // outline: foreground pixels with a background neighbour
    for (let x = 0; x < w; x++) {
      const k = y * w + x;
      if (!fg[k]) continue;
      if (x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
          !fg[k - 1] || !fg[k + 1] || !fg[k - w] || !fg[k + w]) {
        const c = COLOURS[Math.min(labels ? labels[k] : 1, COLOURS.length - 1)];
        d[4 * k] = c[0]; d[4 * k + 1] = c[1]; d[4 * k + 2] = c[2];
      }
    }
  }
  ctx.putImageData(image, 0, 0);
  return area;
}

function frameMs(i) {
  const s = state.session;
  if ($("speed").value === "recorded" && s.source_fps) return 1000 / s.source_fps;
  if (s.status === "done" && s.timing.wall_ms_per_frame) return s.timing.wall_ms_per_frame;
  return state.rows[i].latency_ms;
}

function ready() {  // frames loaded in order from the first
  let n = 0;
  while (state.frames[n]) n += 1;
  return n;
}

function tick(now) {
  if (!state.playing || !state.session) return;
  state.acc += now - state.last;
  state.last = now;
  const n = ready();
  let next = state.current;
  while (n > 0 && state.acc >= frameMs(next)) {
    state.acc -= frameMs(next);
    next = (next + 1) % n;
  }
  if (next !== state.current) { state.current = next; render(next); }
  requestAnimationFrame(tick);
}

function play(on) {
  state.playing = on;
  $("play").textContent = on ? "Pause" : "Play";
  if (on) { state.last = performance.now(); state.acc = 0; requestAnimationFrame(tick); }
}

function updateDownloads() {
  const s = state.session;
  const done = s && s.status === "done";
  for (const id of ["download-csv", "download-video"]) {
    $(id).classList.toggle("disabled", !done);
    $(id).setAttribute("aria-disabled", String(!done));
  }
  if (!done) { $("download-csv").removeAttribute("href"); $("download-video").removeAttribute("href"); return; }
  const t = parseFloat($("threshold").value);
  const o = parseFloat($("opacity").value);
  $("download-csv").href = `/api/sessions/${s.id}/predictions.csv?threshold=${t}`;
  $("download-video").href = `/api/sessions/${s.id}/overlay.mp4?threshold=${t}&opacity=${o}`;
}

async function closeSession(say = true) {
  const s = state.session;
  clearTimeout(state.poll);
  play(false);
  Object.assign(state, { session: null, rows: [], frames: [], probs: [], labels: [], loaded: 0,
    current: 0, spacing: null });
  $("close").disabled = true; $("play").disabled = true; $("seek").disabled = true;
  updateDownloads();
  if (s) {
    await fetch(`/api/sessions/${s.id}`, { method: "DELETE", headers: HEADERS, keepalive: true });
    if (say) setStatus("Session closed: its frames are gone from the server.");
  }
}

function sliders() {
  $("threshold-value").textContent = parseFloat($("threshold").value).toFixed(2);
  $("opacity-value").textContent = parseFloat($("opacity").value).toFixed(2);
  if (state.session) { render(state.current); updateDownloads(); }
}

window.addEventListener("DOMContentLoaded", () => {
  $("model").addEventListener("change", fillBackends);
  $("file").addEventListener("change", (e) => upload(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    upload(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter") $("file").click(); });
  $("threshold").addEventListener("input", sliders);
  $("opacity").addEventListener("input", sliders);
  $("play").addEventListener("click", () => play(!state.playing));
  $("seek").addEventListener("input", (e) => {
    play(false); state.current = parseInt(e.target.value, 10); render(state.current);
  });
  $("close").addEventListener("click", () => closeSession(true));
  window.addEventListener("pagehide", () => { if (state.session) closeSession(false); });
  loadModels().catch((e) => setStatus(`Cannot reach the server: ${e}`, true));
});
