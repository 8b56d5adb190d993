// bone-server dashboard: plain JS, no build step, no inline code (the page runs under a strict CSP).
// Talks to the same HTTP API as every other client.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "bone-api-key";
const FINAL = ["succeeded", "failed", "cancelled"];
// The key lives in this page's memory; it goes to localStorage only when the user ticks "remember".
const state = { key: localStorage.getItem(KEY_STORE) || "", selectedJob: null, adapters: [], needsKey: false };

$("api-key").value = state.key;
$("remember-key").checked = Boolean(localStorage.getItem(KEY_STORE));

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  useKey();
});
$("api-key").addEventListener("change", useKey);
$("remember-key").addEventListener("change", useKey);

function useKey() {
  state.key = $("api-key").value.trim();
  if ($("remember-key").checked && state.key) localStorage.setItem(KEY_STORE, state.key);
  else localStorage.removeItem(KEY_STORE);
  tick();
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

async function check(response) {
  const data = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (response.status === 401) showKeyNeeded(data && data.error ? data.error.message : "");
  if (!response.ok) {
    const err = data && data.error ? data.error : { message: response.statusText };
    throw new ApiError(response.status, err.message + (err.param ? ` (${err.param})` : ""));
  }
  return data;
}

async function api(method, path, body) {
  const response = await fetch(path, { method, headers: headers(body !== undefined),
                                       body: body === undefined ? undefined : JSON.stringify(body) });
  return check(response);
}

async function upload(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  return check(await fetch("/files", { method: "POST", headers: headers(false), body: form }));
}

function showKeyNeeded(message) {
  state.needsKey = true;
  $("key-needed").hidden = false;
  $("key-error").textContent = state.key ? `The server refused this key: ${message}` : "";
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function cell(text, cls) {
  return el("td", { textContent: text, className: cls || "" });
}

function hintRow(body, columns, text) {
  body.replaceChildren(el("tr", {}, el("td", { colSpan: columns, className: "hint", textContent: text })));
}

const fmt = (value, digits = 4) => (value == null ? "" : Number(value).toFixed(digits));

// --- health and key -----------------------------------------------------------------------------------
async function refreshHealth() {
  try {
    await api("GET", "/readyz");
    $("health").textContent = "ready"; $("health").className = "pill ready";
  } catch (e) {
    $("health").textContent = "not ready: " + e.message; $("health").className = "pill not-ready";
  }
}

async function keyIsAccepted() {
  try {
    await api("GET", "/jobs?limit=1");
    state.needsKey = false;
    $("key-needed").hidden = true;
    return true;
  } catch (e) {
    if (e.status !== 401) return true; // another problem: the sections say it themselves
    for (const [body, cols, what] of [["jobs-body", 6, "jobs"], ["adapters-body", 8, "adapters"]]) {
      hintRow($(body), cols, `Enter your API key (top right) to see ${what}.`);
    }
    $("evals-list").replaceChildren(el("p", { className: "hint", textContent: "Enter your API key to see evaluations." }));
    return false;
  }
}

// --- jobs ---------------------------------------------------------------------------------------------
async function refreshJobs() {
  const jobs = (await api("GET", "/jobs?limit=20")).data;
  const body = $("jobs-body");
  if (!jobs.length) {
    hintRow(body, 6, "No jobs yet: start one above (examples/capitals.jsonl is a good first one).");
    return;
  }
  body.replaceChildren();
  for (const job of jobs) {
    const p = job.progress || {};
    const tr = el("tr", { className: job.id === state.selectedJob ? "selected" : "" });
    tr.dataset.jobId = job.id;
    const actions = el("td", { className: "actions" });
    actions.append(el("button", { type: "button", className: "link", textContent: "details" }));
    actions.lastChild.addEventListener("click", () => { state.selectedJob = job.id; refreshJobs(); refreshJobDetail(); });
    if (!FINAL.includes(job.status)) {
      const cancel = el("button", { type: "button", className: "link danger", textContent: "cancel" });
      cancel.addEventListener("click", () => api("POST", `/jobs/${job.id}/cancel`).then(refreshJobs).catch(() => {}));
      actions.append(cancel);
    }
    tr.append(cell(job.id, "mono"), cell(job.adapter_name), cell(job.status, "status-" + job.status),
      cell(`${p.step || 0}/${p.total_steps || "?"}`), cell(fmt((job.metrics || {}).train_loss)), actions);
    body.append(tr);
  }
  if (!state.selectedJob) state.selectedJob = jobs[0].id;
}

async function jobEvents(jobId) {
  const events = [];
  let after = null;
  for (let page = 0; page < 50; page++) {
    const query = `/jobs/${jobId}/events?limit=1000` + (after ? `&after=${encodeURIComponent(after)}` : "");
    const batch = await api("GET", query);
    events.push(...batch.data);
    if (!batch.has_more || !batch.data.length) break;
    after = batch.data[batch.data.length - 1].id;
  }
  return events;
}

function lossSeries(events) {
  const train = [], evals = [];
  for (const e of events) {
    const d = e.data || {};
    if (d.step == null) continue;
    if (d.loss != null && e.type === "step") train.push([d.step, d.loss]);
    if (d.eval_loss != null && e.type === "eval") evals.push([d.step, d.eval_loss]);
  }
  return { train, evals };
}

// Round tick spacing (1, 2 or 5 × 10^k) so the x-axis labels about `count` steps.
function niceTicks(lo, hi, count) {
  const raw = Math.max((hi - lo) / count, 1);
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi; t += step) ticks.push(t);
  return ticks;
}

function drawChart(canvas, series) {
  // Draw at the canvas's displayed width, so the chart fills its column.
  const width = Math.max(300, Math.floor(canvas.clientWidth || canvas.width));
  if (canvas.width !== width) canvas.width = width;
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = { l: 56, r: 16, t: 12, b: 40 };
  ctx.clearRect(0, 0, W, H);
  const all = series.train.concat(series.evals);
  ctx.fillStyle = "#6b7280"; ctx.font = "12px system-ui";
  canvas.dataset.trainPoints = series.train.length;
  canvas.dataset.evalPoints = series.evals.length;
  $("legend-eval").hidden = series.evals.length === 0;
  if (!all.length) { ctx.fillText("no steps yet", pad.l, H / 2); return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const y0 = Math.min(...ys) * 0.95, y1 = Math.max(...ys) * 1.05 || 1;
  const X = (x) => pad.l + (x - x0) / (x1 - x0) * (W - pad.l - pad.r);
  const Y = (y) => H - pad.b - (y - y0) / (y1 - y0 || 1) * (H - pad.t - pad.b);
  ctx.strokeStyle = "#e5e7eb"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    ctx.beginPath(); ctx.moveTo(pad.l, Y(y)); ctx.lineTo(W - pad.r, Y(y)); ctx.stroke();
    ctx.fillText(y.toFixed(3), 4, Y(y) + 4);
  }
  const ticks = niceTicks(x0, x1, Math.max(2, Math.floor((W - pad.l - pad.r) / 70)));
  ctx.textAlign = "center";
  for (const t of ticks) {
    ctx.beginPath(); ctx.moveTo(X(t), H - pad.b); ctx.lineTo(X(t), H - pad.b + 5); ctx.stroke();
    ctx.fillText(String(t), X(t), H - pad.b + 18);
  }
  ctx.fillText("step", (pad.l + W - pad.r) / 2, H - 4);
  ctx.textAlign = "start";
  canvas.dataset.xTicks = ticks.length;
  const line = (points, color) => {
    if (!points.length) return;
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 2; ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (points.length < 20) for (const [x, y] of points) { ctx.beginPath(); ctx.arc(X(x), Y(y), 3, 0, 7); ctx.fill(); }
  };
  line(series.train, "#2563eb");
  line(series.evals, "#d97706");
}

function definitionList(target, entries) {
  target.replaceChildren(...entries.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: v })]));
}

function settingsOf(job) {
  const dataset = job.dataset || {};
  const entries = [["adapter", job.adapter_name], ["base model", job.base_model],
    ["dataset", dataset.file_id || dataset.path || dataset.hf_dataset || (dataset.records ? "inline records" : JSON.stringify(dataset))]];
  for (const [k, v] of Object.entries(job.bone || {})) if (v != null) entries.push([`bone.${k}`, JSON.stringify(v)]);
  for (const [k, v] of Object.entries(job.training || {})) if (v != null && v !== false) entries.push([`training.${k}`, String(v)]);
  if (job.queue) entries.push(["queue", job.queue]);
  if (job.worker) entries.push(["worker", job.worker]);
  return entries;
}

async function refreshJobDetail() {
  if (!state.selectedJob) return;
  const id = state.selectedJob;
  const [job, events, checkpoints] = await Promise.all([
    api("GET", `/jobs/${id}`), jobEvents(id), api("GET", `/jobs/${id}/checkpoints`).catch(() => ({ data: [] }))]);
  $("job-detail").hidden = false;
  $("job-detail-id").textContent = id;
  $("job-detail-status").textContent = job.status;
  $("job-detail-status").className = "pill status-" + job.status;
  $("job-detail-error").hidden = !job.error;
  $("job-detail-error").textContent = job.error || "";
  drawChart($("loss-chart"), lossSeries(events));
  definitionList($("job-settings"), settingsOf(job));
  definitionList($("job-metrics"), Object.entries(job.metrics || {}).map(([k, v]) => [k, typeof v === "number" ? String(+v.toFixed(4)) : String(v)]));
  const cp = $("job-checkpoints");
  if (!checkpoints.data.length) hintRow(cp, 4, "none (set training.save_every to keep checkpoints)");
  else cp.replaceChildren(...checkpoints.data.map((c) => el("tr", {}, cell(String(c.step)), cell(fmt(c.train_loss)),
    cell(fmt(c.eval_loss)), cell(c.adapter || ""))));
  // Every event except the per-step and per-epoch ones (the curve and the metrics show those), newest last.
  const notable = events.filter((e) => !["step", "phase", "epoch"].includes(e.type));
  $("job-events").replaceChildren(...notable.slice(-50).map((e) => el("li", { className: "event-" + e.type },
    el("time", { textContent: new Date(e.created_at * 1000).toLocaleTimeString() }),
    el("span", { className: "kind", textContent: e.type }), el("span", { textContent: e.message || JSON.stringify(e.data) }))));
}

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target, out = $("job-form-result");
  out.textContent = "uploading…"; out.className = "";
  try {
    const file = await upload(form.file.files[0]);
    out.textContent = `uploaded ${file.id} (${file.rows} rows, ${file.format}); starting…`;
    const job = await api("POST", "/jobs", {
      adapter_name: form.adapter_name.value,
      dataset: { file_id: file.id },
      bone: { r: Number(form.r.value), init_weights: form.variant.value === "bat" ? "bat" : true },
      training: { max_steps: Number(form.max_steps.value), learning_rate: Number(form.learning_rate.value),
                  batch_size: Number(form.batch_size.value) },
    });
    out.textContent = `started ${job.id} on ${file.id}`;
    state.selectedJob = job.id;
    refreshJobs();
  } catch (e) {
    out.textContent = e.message; out.className = "error";
  }
});

// --- adapters -----------------------------------------------------------------------------------------
async function refreshAdapters() {
  const adapters = (await api("GET", "/adapters")).data;
  state.adapters = adapters;
  const body = $("adapters-body");
  if (!adapters.length) hintRow(body, 8, "No adapters yet: a job that succeeds publishes one.");
  else body.replaceChildren();
  for (const a of adapters) {
    const bone = a.bone || {};
    const del = el("button", { type: "button", className: "link danger", textContent: "delete" });
    del.addEventListener("click", () => api("DELETE", `/adapters/${a.name}`).then(refreshAdapters).catch(() => {}));
    body.append(el("tr", {}, cell(a.name), cell(a.base_model), cell(String(bone.r)),
      cell(bone.init_weights === "bat" ? "bat" : "bone"), cell(fmt((a.metrics || {}).train_loss)),
      cell(`${(a.size_bytes / 1024).toFixed(0)} KiB`), cell(new Date(a.created_at * 1000).toLocaleString()),
      el("td", {}, del)));
  }
  const fill = (select, withBase) => {
    const keep = [...select.selectedOptions].map((o) => o.value);
    select.replaceChildren(...(withBase ? [new Option("(base model)", "")] : []),
      ...adapters.map((a) => new Option(a.name, a.name)));
    for (const o of select.options) o.selected = keep.includes(o.value);
  };
  for (const select of document.querySelectorAll(".adapter-select")) fill(select, true);
  fill($("eval-adapters"), false);
}

// --- evaluations --------------------------------------------------------------------------------------
function evalTable(evaluation) {
  const rows = Object.entries(evaluation.results || {}).map(([model, m]) => el("tr", {},
    cell(model === "__base__" ? "base model" : model), cell(fmt(m.loss)), cell(fmt(m.perplexity, 2)),
    cell(fmt(m.token_accuracy, 3)), cell(m.exact_match == null ? "" : `${fmt(m.exact_match, 2)} of ${m.exact_match_examples}`),
    cell(String(m.examples))));
  return el("table", {}, el("thead", {}, el("tr", {}, ...["model", "loss", "perplexity", "token accuracy", "exact match", "examples"]
    .map((h) => el("th", { textContent: h })))), el("tbody", {}, ...rows));
}

async function refreshEvals() {
  const evaluations = (await api("GET", "/evals?limit=5")).data;
  const list = $("evals-list");
  if (!evaluations.length) {
    list.replaceChildren(el("p", { className: "hint", textContent: "No evaluations yet: pick adapters and a file above." }));
    return;
  }
  list.replaceChildren(...evaluations.map((ev) => el("div", { className: "eval" },
    el("h3", {}, el("span", { className: "mono", textContent: ev.id }), " ",
      el("span", { className: "pill status-" + ev.status, textContent: ev.status }), " ",
      el("span", { className: "muted", textContent: ev.adapters.join(", ") })),
    ev.error ? el("p", { className: "error", textContent: ev.error }) : "",
    Object.keys(ev.results || {}).length ? evalTable(ev) : "")));
}

$("eval-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target, out = $("eval-form-result");
  out.textContent = "uploading…"; out.className = "";
  try {
    const file = await upload(form.file.files[0]);
    const evaluation = await api("POST", "/evals", {
      adapters: [...$("eval-adapters").selectedOptions].map((o) => o.value),
      include_base: form.include_base.checked, dataset: { file_id: file.id } });
    out.textContent = `started ${evaluation.id} on ${file.id}`;
    refreshEvals();
  } catch (e) {
    out.textContent = e.message; out.className = "error";
  }
});

// --- playground: the same prompt on two adapters, streamed side by side (one engine batch) -------------
async function streamInto(out, body) {
  const response = await fetch("/generate", { method: "POST", headers: { ...headers(true), Accept: "text/event-stream" },
                                               body: JSON.stringify({ ...body, stream: true }) });
  if (!response.ok) await check(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", event = "message", text = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line.startsWith("event:")) event = line.slice(6).trim();
      else if (line.startsWith("data:")) {
        const data = line.slice(5).trim();
        if (data === "[DONE]") return text;
        const payload = JSON.parse(data);
        if (event === "error") throw new Error((payload.error || payload).message);
        if (event === "done") text = payload.text;
        else if (payload.text) text += payload.text;
        out.textContent = text;
      } else if (!line) event = "message";
    }
  }
  return text;
}

$("generate").addEventListener("click", async () => {
  const prompt = $("prompt").value;
  const params = { prompt, max_new_tokens: Number($("max-new-tokens").value), temperature: Number($("temperature").value) };
  const run = async (side) => {
    const out = $("output-" + side);
    out.textContent = "…"; out.classList.remove("error"); out.dataset.state = "streaming";
    try {
      out.textContent = await streamInto(out, { ...params, adapter: $("adapter-" + side).value || null });
    } catch (e) {
      out.textContent = e.message; out.classList.add("error");
    }
    out.dataset.state = "done";
  };
  await Promise.all([run("left"), run("right")]);
});

async function tick() {
  await refreshHealth();
  if (!(await keyIsAccepted())) return;
  await Promise.all([refreshJobs(), refreshAdapters(), refreshEvals()].map((p) => p.catch(() => {})));
  await refreshJobDetail().catch(() => {});
}
tick();
setInterval(tick, 1500);
