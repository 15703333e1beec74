// SparseShot web console: plain JavaScript over the v1 HTTP API (no build step, no CDN).
// Pages are routed by the URL hash: #/datasets, #/datasets/ID, #/jobs, #/jobs/ID, #/models, #/models/ID.
"use strict";

const KEY_STORE = "sparseshot.apiKey";
const POLL_MS = 1000;
const GALLERY_PAGE = 60; // thumbnails per class fetched at a time
const UPLOAD_BATCH = 16; // files per request (under the server's max_files_per_request default)
let pageTimer = null; // the polling of the page shown, stopped when the page changes
let objectUrls = []; // blob: URLs of the page shown (thumbnails), revoked when the page changes

// ---------------------------------------------------------------- DOM and API helpers

function h(tag, attrs, ...children) {
  // A DOM element; text children are set as text (never parsed as HTML).
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) if (c !== null && c !== undefined && c !== "") el.append(c instanceof Node ? c : String(c));
  return el;
}

function fill(el, ...children) {
  // Replace el's children; arrays are flattened and null/undefined/"" skipped (like h()).
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== ""));
}

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function api(method, path, { json, form, raw } = {}) {
  // One call to the API with the stored key; problem+json answers are thrown as ApiError.
  const headers = {};
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  let body;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(json); }
  if (form !== undefined) body = form;
  const r = await fetch(path, { method, headers, body });
  if (!r.ok) {
    let problem = { title: r.statusText, status: r.status, detail: "" };
    try { problem = await r.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(r.status, problem);
  }
  if (raw) return r;
  if (r.status === 204) return null;
  return r.json();
}

function showError(err) {
  // A problem+json (or network) error, shown with its title, status, detail and listed items.
  const box = document.getElementById("error");
  fill(box);
  if (err instanceof ApiError) {
    const p = err.problem;
    box.append(h("b", {}, `${p.title || "Error"} (${err.status})`), p.detail || "");
    const items = (p.rejected || []).map((r) => `${r.filename}: ${r.detail}`)
      .concat((p.errors || []).slice(1).map((e) => `${(e.loc || []).join(".")}: ${e.msg}`));
    if (items.length) box.append(h("ul", {}, items.map((t) => h("li", {}, t))));
    if (err.status === 401) box.append(h("div", {}, "Enter a valid API key above (sparseshot keys create)."));
  } else {
    box.append(h("b", {}, "Error"), String(err && err.message ? err.message : err));
  }
  box.hidden = false;
}

function clearError() { const box = document.getElementById("error"); box.hidden = true; fill(box); }

function guard(fn) {
  // An event handler whose failures are shown instead of lost.
  return async (ev) => { try { clearError(); await fn(ev); } catch (e) { showError(e); } };
}

function fmtSeconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "—";
  s = Math.max(0, Math.round(s));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function fmtNum(v, digits = 4) { return v === null || v === undefined ? "—" : Number(v).toPrecision(digits); }
function fmtPct(v) { return v === null || v === undefined ? "—" : `${(100 * v).toFixed(1)} %`; }
function fmtDate(s) { return s ? new Date(s).toLocaleString() : "—"; }
function pill(status) { return h("span", { class: `pill ${status}`, "data-status": status }, status); }
function stat(k, v, id) { return h("div", { class: "stat" }, h("div", { class: "v", id }, v), h("div", { class: "k" }, k)); }

async function authedBlobUrl(path) {
  // <img> and <a> cannot send the key: fetch with it and hand out a blob: URL instead.
  const r = await api("GET", path, { raw: true });
  const url = URL.createObjectURL(await r.blob());
  objectUrls.push(url);
  return url;
}

function dropzone(text, onFiles, { accept, multiple = true, id }) {
  // A drop target plus a file input (the same handler for both).
  const input = h("input", { type: "file", accept, multiple, id });
  input.addEventListener("change", guard(async () => { const f = [...input.files]; input.value = ""; await onFiles(f); }));
  const zone = h("div", { class: "dropzone" }, text, h("div", {}, "or ", input));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", guard(async (e) => {
    e.preventDefault(); zone.classList.remove("over");
    await onFiles([...e.dataTransfer.files]);
  }));
  return zone;
}

// ---------------------------------------------------------------- datasets

async function pageDatasets(view) {
  const list = await api("GET", "/v1/datasets?limit=200");
  const create = h("form", { class: "inline", id: "dataset-create" },
    h("label", {}, "Name", h("input", { name: "name", required: true, placeholder: "pets" })),
    h("label", {}, "Classes (comma-separated, at least two)",
      h("input", { name: "classes", required: true, size: 40, placeholder: "cat, dog" })),
    h("button", { type: "submit" }, "Create dataset"));
  create.addEventListener("submit", guard(async (e) => {
    e.preventDefault();
    const classes = create.elements["classes"].value.split(",").map((c) => c.trim()).filter(Boolean);
    const ds = await api("POST", "/v1/datasets", { json: { name: create.elements["name"].value, classes } });
    location.hash = `#/datasets/${ds.id}`;
  }));
  const rows = list.map((d) => h("tr", { "data-id": d.id },
    h("td", {}, h("a", { href: `#/datasets/${d.id}` }, d.name)),
    h("td", {}, d.classes.map((c) => `${c} (${d.image_counts[c]})`).join(", ")),
    h("td", {}, fmtDate(d.created_at))));
  fill(view, h("h1", {}, "Datasets"),
    h("div", { class: "card" }, h("h2", {}, "New dataset"), create),
    h("div", { class: "card" }, list.length
      ? h("table", { id: "dataset-list" }, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Classes (images)"), h("th", {}, "Created")), rows)
      : h("p", { class: "muted" }, "No datasets yet.")));
}

async function uploadFiles(dataset, files, label, report) {
  // Images go in batches under `label`; each .zip is sent on its own (one folder per class).
  const zips = files.filter((f) => /\.zip$/i.test(f.name) || f.type === "application/zip");
  const images = files.filter((f) => !zips.includes(f));
  const sends = [];
  for (let i = 0; i < images.length; i += UPLOAD_BATCH) {
    const form = new FormData();
    form.append("label", label);
    for (const f of images.slice(i, i + UPLOAD_BATCH)) form.append("files", f, f.name);
    sends.push(form);
  }
  for (const z of zips) { const form = new FormData(); form.append("archive", z, z.name); sends.push(form); }
  for (const form of sends) {
    try {
      const out = await api("POST", `/v1/datasets/${dataset.id}/images`, { form });
      out.added.forEach((a) => report(true, `${a.filename} → ${a.label}`));
      out.rejected.forEach((r) => report(false, `${r.filename}: ${r.detail}`));
    } catch (e) {
      const rejected = (e.problem && e.problem.rejected) || [];
      if (rejected.length) rejected.forEach((r) => report(false, `${r.filename}: ${r.detail}`));
      else report(false, e.message);
      if (!rejected.length) showError(e);
    }
  }
}

function thumbCard(dataset, img, refresh) {
  const pic = h("img", { alt: img.filename });
  authedBlobUrl(img.thumbnail_url).then((u) => { pic.src = u; }).catch(() => { pic.alt = "(no thumbnail)"; });
  const relabel = h("select", { class: "relabel", title: "Move to class" },
    dataset.classes.map((c) => h("option", { value: c, selected: c === img.label }, c)));
  relabel.addEventListener("change", guard(async () => {
    await api("PATCH", `/v1/datasets/${dataset.id}/images/${img.image_id}`, { json: { label: relabel.value } });
    await refresh();
  }));
  const del = h("button", { class: "danger delete", type: "button", title: "Delete image" }, "Delete");
  del.addEventListener("click", guard(async () => {
    await api("DELETE", `/v1/datasets/${dataset.id}/images/${img.image_id}`);
    await refresh();
  }));
  return h("div", { class: "thumb", "data-image-id": img.image_id, "data-label": img.label },
    pic, h("div", { class: "name", title: img.filename }, img.filename), relabel, h("div", { class: "actions" }, del));
}

async function renderGallery(dataset, box, refresh) {
  // One section per class; images come a page at a time ("Show more" fetches the next page).
  const fresh = await api("GET", `/v1/datasets/${dataset.id}`);
  const sections = [];
  for (const c of fresh.classes) {
    const grid = h("div", { class: "gallery" });
    const more = h("button", { type: "button", class: "secondary more", hidden: true }, "Show more");
    let offset = 0;
    const loadPage = async () => {
      const url = `/v1/datasets/${dataset.id}/images?label=${encodeURIComponent(c)}&limit=${GALLERY_PAGE}&offset=${offset}`;
      const imgs = await api("GET", url);
      offset += imgs.length;
      grid.append(...imgs.map((i) => thumbCard(fresh, i, refresh)));
      more.hidden = offset >= fresh.image_counts[c] || imgs.length < GALLERY_PAGE;
    };
    more.addEventListener("click", guard(loadPage));
    if (fresh.image_counts[c]) await loadPage();
    sections.push(h("section", { class: "class-gallery", "data-class": c },
      h("h3", {}, `${c} `, h("span", { class: "muted count" }, `(${fresh.image_counts[c]})`)),
      fresh.image_counts[c] ? [grid, more] : h("p", { class: "muted" }, "No images yet.")));
  }
  fill(box, sections);
  return fresh;
}

function jobForm(dataset) {
  const form = h("form", { id: "job-create" },
    h("div", { class: "inline form" },
      h("label", {}, "Method ", h("select", { name: "method" }, h("option", { value: "so" }, "so (sparse optimization)"),
        h("option", { value: "lora" }, "lora"))),
      h("label", {}, " Preset ", h("select", { name: "preset" }, h("option", { value: "" }, "(server default)"),
        ["quick", "standard", "thorough"].map((p) => h("option", { value: p }, p))))),
    h("label", {}, "Validation: hold out ", h("input", { name: "holdout", type: "number", min: "0", max: "0.5", step: "0.05", placeholder: "0" }),
      " of each class (classes keep 2 training images; when none has more, k-fold cross-validation runs instead), or ",
      h("input", { name: "kfold", type: "number", min: "2", max: "10", step: "1", placeholder: "k" }),
      "-fold cross-validation (k trainings with the quick preset's schedule first)"),
    h("label", {}, "Params (JSON, optional; e.g. ", h("code", {}, '{"n_iters": 50, "lr": 0.01}'), ")",
      h("textarea", { name: "params", placeholder: "{}" })),
    h("button", { type: "submit" }, "Start training"));
  form.addEventListener("submit", guard(async (e) => {
    e.preventDefault();
    let params = {};
    const text = form.elements["params"].value.trim();
    if (text) {
      try { params = JSON.parse(text); } catch (err) { throw new Error(`params is not valid JSON: ${err.message}`); }
    }
    const body = { dataset_id: dataset.id, method: form.elements["method"].value, params };
    if (form.elements["preset"].value) body.preset = form.elements["preset"].value; // only when the user picks one
    const holdout = Number(form.elements["holdout"].value || 0);
    const kfold = Number(form.elements["kfold"].value || 0);
    if (holdout > 0 && kfold > 0) throw new Error("validation: a hold-out fraction or k-fold, not both");
    if (holdout > 0) body.validation = { holdout };
    if (kfold > 0) body.validation = { kfold };
    const job = await api("POST", "/v1/jobs", { json: body });
    if (job.estimated_seconds !== undefined) sessionStorage.setItem(`est.${job.id}`, String(job.estimated_seconds));
    location.hash = `#/jobs/${job.id}`;
  }));
  return form;
}

async function pageDataset(view, id) {
  let dataset = await api("GET", `/v1/datasets/${id}`);
  const gallery = h("div", { id: "gallery" });
  const results = h("ul", { class: "results", id: "upload-results" });
  const label = h("select", { id: "upload-label" }, dataset.classes.map((c) => h("option", { value: c }, c)));
  const counts = h("span", { id: "dataset-counts", class: "muted" });
  const refresh = async () => {
    dataset = await renderGallery(dataset, gallery, refresh);
    counts.textContent = dataset.classes.map((c) => `${c}: ${dataset.image_counts[c]}`).join(" · ");
  };
  const report = (ok, text) => results.prepend(h("li", { class: ok ? "added" : "rejected" }, `${ok ? "added" : "rejected"}: ${text}`));
  const zone = dropzone("Drop images (of the class chosen above) or a .zip with one folder per class here",
    async (files) => { await uploadFiles(dataset, files, label.value, report); await refresh(); },
    { accept: "image/*,.zip,application/zip", id: "upload-input" });
  const del = h("button", { class: "danger", type: "button", id: "dataset-delete" }, "Delete dataset");
  del.addEventListener("click", guard(async () => {
    if (!confirm(`Delete dataset ${dataset.name} and its images?`)) return;
    await api("DELETE", `/v1/datasets/${dataset.id}`);
    location.hash = "#/datasets";
  }));
  fill(view, 
    h("h1", {}, `Dataset: ${dataset.name} `, counts),
    h("div", { class: "row" },
      h("div", { class: "card" }, h("h2", {}, "Add images"), h("label", {}, "Class of dropped images: ", label), zone, results),
      h("div", { class: "card" }, h("h2", {}, "Train a model"), jobForm(dataset))),
    h("div", { class: "card" }, h("h2", {}, "Images per class"), gallery),
    h("p", {}, del));
  await refresh();
}

// ---------------------------------------------------------------- jobs

async function pageJobs(view) {
  const jobs = await api("GET", "/v1/jobs?limit=100");
  const rows = jobs.map((j) => h("tr", {},
    h("td", {}, h("a", { href: `#/jobs/${j.id}` }, j.id.slice(0, 8))), h("td", {}, pill(j.status)),
    h("td", {}, j.method), h("td", {}, j.dataset_id ? h("a", { href: `#/datasets/${j.dataset_id}` }, "dataset") : "—"),
    h("td", {}, j.model_id ? h("a", { href: `#/models/${j.model_id}` }, "model") : "—"), h("td", {}, fmtDate(j.created_at))));
  fill(view, h("h1", {}, "Jobs"), h("div", { class: "card" }, jobs.length
    ? h("table", {}, h("tr", {}, ["Job", "Status", "Method", "Dataset", "Model", "Created"].map((t) => h("th", {}, t))), rows)
    : h("p", { class: "muted" }, "No jobs yet: start one from a dataset's page.")));
}

function drawChart(canvas, points) {
  // Loss (left axis, blue) and accuracy (right axis 0–1, orange: train solid, validation dashed) by step.
  const dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth || 600, H = canvas.clientHeight || 260;
  canvas.width = W * dpr; canvas.height = H * dpr;
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, W, H);
  const pad = { l: 52, r: 46, t: 28, b: 30 };
  const pw = W - pad.l - pad.r, ph = H - pad.t - pad.b;
  g.font = "11px system-ui, sans-serif"; g.fillStyle = "#66727f"; g.strokeStyle = "#d9dee4";
  g.strokeRect(pad.l, pad.t, pw, ph);
  const withLoss = points.filter((p) => p.loss !== null && p.loss !== undefined);
  if (points.length === 0) { g.fillText("waiting for the first steps…", pad.l + 10, pad.t + 20); return; }
  const maxStep = Math.max(1, ...points.map((p) => p.step));
  const lossMax = Math.max(1e-6, ...withLoss.map((p) => p.loss)) * 1.05;
  const x = (s) => pad.l + (pw * s) / maxStep;
  const yL = (v) => pad.t + ph - (ph * v) / lossMax;
  const yA = (v) => pad.t + ph - ph * v;
  for (let i = 0; i <= 4; i++) { // grid and axis labels
    const yy = pad.t + (ph * i) / 4;
    g.beginPath(); g.moveTo(pad.l, yy); g.lineTo(pad.l + pw, yy); g.stroke();
    g.fillText(fmtNum(lossMax * (1 - i / 4), 3), 4, yy + 4);
    g.fillText(`${100 - 25 * i}%`, pad.l + pw + 6, yy + 4);
  }
  g.fillText("0", pad.l, H - 10); g.fillText(`step ${maxStep}`, pad.l + pw - 50, H - 10);
  const line = (pts, yf, key, colour, dash) => {
    const pp = pts.filter((p) => p[key] !== null && p[key] !== undefined);
    if (!pp.length) return;
    g.strokeStyle = colour; g.lineWidth = 2; g.setLineDash(dash || []);
    g.beginPath();
    pp.forEach((p, i) => (i ? g.lineTo(x(p.step), yf(p[key])) : g.moveTo(x(p.step), yf(p[key]))));
    g.stroke();
    g.fillStyle = colour; // a dot on each point: a lone point is visible too
    pp.forEach((p) => { g.beginPath(); g.arc(x(p.step), yf(p[key]), 3, 0, 2 * Math.PI); g.fill(); }); g.setLineDash([]); g.lineWidth = 1; g.strokeStyle = "#d9dee4";
  };
  line(points, yL, "loss", "#1f4e79");
  line(points, yA, "train_accuracy", "#e07b24");
  line(points, yA, "val_accuracy", "#2e7d32", [5, 4]);
  const legend = [["loss", "#1f4e79"], ["train accuracy", "#e07b24"], ["validation accuracy", "#2e7d32"]];
  legend.forEach(([t, c], i) => { g.fillStyle = c; g.fillRect(pad.l + i * 150, 8, 10, 10);
    g.fillStyle = "#1d2733"; g.fillText(t, pad.l + 14 + i * 150, 17); });
}

async function loadHistory(id, state) {
  // GET /v1/jobs/{id}/history when the server has it; after a 404 the polled points are plotted.
  if (state.noHistory) return null;
  try {
    const out = await api("GET", `/v1/jobs/${id}/history`);
    return Array.isArray(out) ? out : out.items || [];
  } catch (e) {
    if (e instanceof ApiError && (e.status === 404 || e.status === 405)) { state.noHistory = true; return null; }
    throw e;
  }
}

async function pageJob(view, id) {
  const state = { noHistory: false, polled: [] };
  const bar = h("div", {});
  const stats = h("div", { class: "stats" });
  const canvas = h("canvas", { class: "chart", id: "job-chart" });
  const head = h("h1", {}, "Job ", h("code", {}, id.slice(0, 8)), " ", h("span", { id: "job-status" }));
  const links = h("p", { id: "job-links" });
  const errorBox = h("p", { class: "error", id: "job-error", hidden: true });
  const cancel = h("button", { class: "secondary", type: "button", id: "job-cancel" }, "Cancel job");
  cancel.addEventListener("click", guard(async () => { await api("POST", `/v1/jobs/${id}/cancel`); }));
  const note = h("p", { class: "muted", id: "chart-note" });
  fill(view, head, h("div", { class: "card" }, h("div", { class: "progress" }, bar), stats, links, errorBox, cancel),
    h("div", { class: "card" }, h("h2", {}, "Training curves"), canvas, note));
  const tick = async () => {
    const job = await api("GET", `/v1/jobs/${id}`);
    const p = job.progress;
    const done = ["succeeded", "failed", "cancelled"].includes(job.status);
    const total = p.total_steps || 0;
    bar.style.width = `${total ? Math.min(100, (100 * p.step) / total) : done ? 100 : 0}%`;
    fill(head.querySelector("#job-status"), pill(job.status));
    const est = job.estimated_seconds ?? sessionStorage.getItem(`est.${id}`);
    fill(stats, stat("step", total ? `${p.step} / ${total}` : String(p.step), "job-step"),
      stat("loss", fmtNum(p.loss), "job-loss"), stat("train accuracy", fmtPct(p.train_accuracy), "job-acc"),
      stat("ETA", done ? "—" : fmtSeconds(p.eta_seconds), "job-eta"),
      est !== null && est !== undefined ? stat("estimated duration", fmtSeconds(Number(est)), "job-estimate") : null,
      stat("method", `${job.method}${job.preset ? ` · ${job.preset}` : ""}`), stat("base model", job.base_model));
    if (p.step && (!state.polled.length || state.polled[state.polled.length - 1].step !== p.step))
      state.polled.push({ step: p.step, loss: p.loss, train_accuracy: p.train_accuracy });
    const history = await loadHistory(id, state);
    drawChart(canvas, history && history.length ? history : state.polled);
    note.textContent = history ? "From the job's stored history." : "Points seen while this page polled the job.";
    fill(links, job.dataset_id ? h("a", { href: `#/datasets/${job.dataset_id}` }, "dataset") : "",
      job.model_id ? [" · ", h("a", { href: `#/models/${job.model_id}`, id: "job-model-link" }, "open the model →")] : "");
    errorBox.hidden = !job.error; errorBox.textContent = job.error || "";
    cancel.hidden = done;
    if (!done && location.hash === `#/jobs/${id}`) pageTimer = setTimeout(() => tick().catch(showError), POLL_MS);
  };
  await tick();
}

// ---------------------------------------------------------------- models

async function pageModels(view) {
  const models = await api("GET", "/v1/models?limit=100");
  const rows = models.map((m) => h("tr", {},
    h("td", {}, h("a", { href: `#/models/${m.id}` }, m.id.slice(0, 8))), h("td", {}, m.method),
    h("td", {}, m.classes.join(", ")), h("td", {}, m.base_model), h("td", {}, fmtDate(m.created_at))));
  fill(view, h("h1", {}, "Models"), h("div", { class: "card" }, models.length
    ? h("table", {}, h("tr", {}, ["Model", "Method", "Classes", "Base", "Created"].map((t) => h("th", {}, t))), rows)
    : h("p", { class: "muted" }, "No models yet.")));
}

function fmtValue(v) {
  if (typeof v === "number" && !Number.isInteger(v)) return Number(v.toPrecision(4)).toString();
  return typeof v === "object" && v !== null ? JSON.stringify(v) : String(v);
}

function metricsTable(metrics) {
  // Scalar training metrics; the validation report (an object) has its own card (validationView).
  const rows = Object.entries(metrics || {}).filter(([k]) => k !== "validation")
    .map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, fmtValue(v))));
  return rows.length ? h("table", { id: "model-metrics" }, rows) : h("p", { class: "muted" }, "No metrics recorded.");
}

function reportTables(r, prefix) {
  // Per-class precision/recall/F1/support/threshold and the confusion matrix of a report
  // ({classes, per_class, suggested_thresholds, confusion_matrix}: an evaluation or a job's validation).
  const order = r.classes;
  return [h("table", { id: `${prefix}-per-class` }, h("tr", {}, ["class", "precision", "recall", "F1", "support", "threshold"].map((t) => h("th", {}, t))),
    order.map((c) => { const m = r.per_class[c]; const t = r.suggested_thresholds[c];
      return h("tr", { "data-class": c }, h("td", {}, c), h("td", {}, fmtPct(m.precision)), h("td", {}, fmtPct(m.recall)),
        h("td", {}, fmtPct(m.f1)), h("td", {}, String(m.support)), h("td", {}, t === null || t === undefined ? "—" : fmtNum(t, 3))); })),
  h("h3", {}, "Confusion matrix (rows: true class, columns: predicted)"),
  h("table", { class: "matrix", id: `${prefix}-confusion` }, h("tr", {}, h("th", {}, ""), order.map((c) => h("th", {}, c))),
    r.confusion_matrix.map((row, i) => h("tr", {}, h("th", {}, order[i]),
      row.map((n, j) => h("td", { class: i === j ? "diag" : "" }, String(n))))))];
}

function evaluationView(ev) {
  // One stored evaluation: accuracy, per-class precision/recall/F1/support/threshold, confusion matrix.
  const parts = [h("div", { class: "stats" }, stat("accuracy", fmtPct(ev.accuracy), "eval-accuracy"),
    stat("images", String(ev.n_images), "eval-images"),
    ev.excluded_images ? stat("not evaluated", String(ev.excluded_images)) : null),
    h("p", { class: "muted" }, `Dataset ${ev.dataset_id ? ev.dataset_id.slice(0, 8) : "(deleted)"}, ${fmtDate(ev.created_at)}.`,
      ev.excluded_images ? ` Labels not among the model's classes, left out: ${Object.entries(ev.excluded_labels).map(([l, n]) => `${l} (${n})`).join(", ")}.` : "",
      " Threshold: the probability that maximises the class's F1 on this dataset."),
    reportTables(ev, "eval")];
  return h("div", { class: "evaluation", "data-evaluation": ev.id }, parts);
}

function validationView(v) {
  // The training job's validation (metrics.validation): held-out images, or k-fold cross-validation.
  const kfold = v.mode === "kfold";
  const note = kfold
    ? `${v.folds}-fold cross-validation with the ${v.preset} preset's schedule before the training on all images: ` +
      "the mean of the folds' accuracies; per class and the matrix pooled over the folds (each image measured once, " +
      "by the fold that did not train on it)."
    : "Images held out of training, measured with the final model.";
  return h("div", { class: "evaluation", id: "model-validation" },
    h("div", { class: "stats" }, stat(kfold ? "cross-validated accuracy" : "validation accuracy", fmtPct(v.accuracy), "val-accuracy"),
      stat("images", String(v.n_images), "val-images"),
      kfold ? stat("per fold", v.fold_accuracies.map(fmtPct).join(" · "), "val-folds") : null),
    h("p", { class: "muted" }, note, " Threshold: the probability that maximises the class's F1 on these images."),
    reportTables(v, "val"));
}

async function evaluationSection(model) {
  // The stored evaluations (newest shown; the others one click away) and a form to run a new one.
  const box = h("div", { id: "model-evaluation" });
  const [evals, datasets] = await Promise.all([api("GET", `/v1/models/${model.id}/evaluations`), api("GET", "/v1/datasets")]);
  const render = (list, shown) => {
    const others = list.length > 1 ? h("table", { id: "eval-list" }, h("tr", {}, ["Evaluation", "Accuracy", "Images", "Created"].map((t) => h("th", {}, t))),
      list.map((e) => h("tr", { class: e.id === shown.id ? "selected" : "" },
        h("td", {}, h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); render(list, e); } }, e.id.slice(0, 8))),
        h("td", {}, fmtPct(e.accuracy)), h("td", {}, String(e.n_images)), h("td", {}, fmtDate(e.created_at))))) : null;
    fill(box, shown ? [evaluationView(shown), others] : h("p", { class: "muted" }, "Not evaluated yet."));
  };
  render(evals, evals[0]);
  const choose = h("select", { id: "eval-dataset" }, datasets.map((d) => h("option", { value: d.id }, `${d.name} (${d.id.slice(0, 8)})`)));
  const run = h("button", { type: "button", id: "eval-run", disabled: datasets.length ? null : true }, "Evaluate");
  run.addEventListener("click", guard(async () => {
    run.disabled = true;
    try {
      const ev = await api("POST", `/v1/models/${model.id}/evaluations`, { json: { dataset_id: choose.value } });
      evals.unshift(ev); render(evals, ev);
    } finally { run.disabled = false; }
  }));
  return [h("div", { class: "inline form" }, h("label", {}, "Labelled dataset ", choose), " ", run), box];
}

function topkBars(pred) {
  return h("div", { class: "bars prediction" }, h("div", { class: "muted" }, pred.filename),
    pred.unknown ? h("div", { class: "unknown" }, "unknown: no label reaches the threshold") : null,
    pred.labels.map((l) => h("div", { class: "bar", "data-label": l.label },
      h("span", { class: "lbl" }, l.label),
      h("div", { class: "track" }, h("div", { class: "fill", style: `width:${(100 * l.score).toFixed(1)}%` })),
      h("span", {}, fmtPct(l.score)))));
}

async function pageModel(view, id) {
  const m = await api("GET", `/v1/models/${id}`);
  const out = h("div", { id: "classify-results" });
  const cut = h("input", { id: "classify-threshold", type: "number", min: "0", max: "1", step: "0.05", placeholder: "none" });
  const preview = h("div", {});
  const zone = dropzone("Drop an image here to classify it", async (files) => {
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    form.append("top_k", String(Math.min(5, m.classes.length)));
    if (cut.value.trim()) form.append("threshold", cut.value.trim());
    const res = await api("POST", `/v1/models/${id}/classify`, { form });
    const url = URL.createObjectURL(files[0]); objectUrls.push(url);
    fill(preview, h("img", { src: url, alt: files[0].name }));
    fill(out, ...res.predictions.map(topkBars));
  }, { accept: "image/*", id: "classify-input" });
  // Download: the sparse delta, a merged open_clip checkpoint or an ONNX classifier (the last two
  // are built by the server on the first request, which can take seconds on a large base).
  const fmt = h("select", { id: "export-format" },
    h("option", { value: "delta" }, "sparse delta (.safetensors)"),
    h("option", { value: "checkpoint" }, "merged open_clip checkpoint (.safetensors)"),
    h("option", { value: "onnx" }, "ONNX classifier (.onnx)"));
  const names = { delta: `${id}.safetensors`, checkpoint: `${id}-merged.safetensors`, onnx: `${id}.onnx` };
  const dl = h("button", { type: "button", id: "delta-fetch" }, "Prepare download");
  const dlBox = h("span", { id: "delta-box" });
  dl.addEventListener("click", guard(async () => {
    const kind = fmt.value;
    fill(dlBox, " preparing…");
    const path = kind === "delta" ? `/v1/models/${id}/delta` : `/v1/models/${id}/export?format=${kind}`;
    const url = await authedBlobUrl(path);
    const label = kind === "delta" ? `${names[kind]} (${m.delta.bytes} bytes)` : names[kind];
    const a = h("a", { href: url, download: names[kind], id: kind === "delta" ? "delta-link" : `export-link-${kind}` }, label);
    fill(dlBox, " ", a);
    a.click();
  }));
  fill(view, 
    h("h1", {}, "Model ", h("code", {}, id.slice(0, 8)), " ", pill(m.status)),
    h("div", { class: "row" },
      h("div", { class: "card" }, h("h2", {}, "Model"), h("table", { id: "model-info" },
        [["classes", m.classes.join(", ")], ["base model", m.base_model], ["method", m.method],
          ["template", m.template || "—"], ["delta", `${m.delta.nnz} non-zeros, ${m.delta.bytes} bytes, density ${fmtNum(m.delta.density, 3)}`],
          ["created", fmtDate(m.created_at)]].map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))),
        m.job_id ? h("p", {}, h("a", { href: `#/jobs/${m.job_id}` }, "training job")) : "", h("p", {}, fmt, " ", dl, dlBox)),
      h("div", { class: "card" }, h("h2", {}, "Training metrics"), metricsTable(m.metrics))),
    m.metrics && m.metrics.validation ? h("div", { class: "card" }, h("h2", {}, "Validation"), validationView(m.metrics.validation)) : null,
    h("div", { class: "card" }, h("h2", {}, "Evaluation"), await evaluationSection(m)),
    h("div", { class: "card" }, h("h2", {}, "Try it"), h("p", {}, h("label", {}, "Threshold (labels below it are dropped) ", cut)),
      zone, h("div", { class: "tryit" }, preview, out)));
}

// ---------------------------------------------------------------- routing and the key

const ROUTES = [
  [/^#\/datasets\/([\w-]+)$/, pageDataset], [/^#\/datasets$/, pageDatasets],
  [/^#\/jobs\/([\w-]+)$/, pageJob], [/^#\/jobs$/, pageJobs],
  [/^#\/models\/([\w-]+)$/, pageModel], [/^#\/models$/, pageModels],
];

async function route() {
  clearTimeout(pageTimer);
  objectUrls.forEach((u) => URL.revokeObjectURL(u)); objectUrls = [];
  clearError();
  const view = document.getElementById("view");
  const hash = location.hash || "#/datasets";
  document.querySelectorAll("header nav a").forEach((a) => a.classList.toggle("active", hash.startsWith(a.getAttribute("href"))));
  if (!apiKey()) {
    fill(view, h("div", { class: "card", id: "need-key" }, h("h2", {}, "Enter an API key"),
      h("p", {}, "Create one on the server with ", h("code", {}, "sparseshot keys create --tenant NAME"),
        ", paste it above and press “Use key”.")));
    return;
  }
  for (const [re, page] of ROUTES) {
    const m = hash.match(re);
    if (m) {
      fill(view, h("p", { class: "muted" }, "Loading…"));
      try { await page(view, ...m.slice(1)); } catch (e) { showError(e); fill(view); }
      document.body.dataset.page = page.name;
      return;
    }
  }
  location.hash = "#/datasets";
}

function setupKey() {
  const input = document.getElementById("api-key");
  const state = document.getElementById("key-state");
  const show = () => { state.textContent = apiKey() ? `key ${apiKey().slice(0, 10)}… in use` : "no key"; };
  input.value = apiKey();
  document.getElementById("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(KEY_STORE, input.value.trim()); show(); route();
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    localStorage.removeItem(KEY_STORE); input.value = ""; show(); route();
  });
  show();
}

window.addEventListener("hashchange", route);
setupKey();
route();
