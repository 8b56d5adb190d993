// bone-server dashboard: plain JS, no build step. Talks to the same HTTP API as every other client.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { selectedJob: null, adapters: [] };

$("api-key").value = localStorage.getItem("bone-api-key") || "";
$("api-key").addEventListener("change", (e) => localStorage.setItem("bone-api-key", e.target.value));

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const data = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const err = data && data.error ? data.error : { message: response.statusText };
    throw new Error(err.message + (err.param ? ` (${err.param})` : ""));
  }
  return data;
}

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

// --- health -------------------------------------------------------------------------------------------
async function refreshHealth() {
  try {
    await api("GET", "/readyz");
    $("health").textContent = "ready"; $("health").className = "pill ready";
  } catch (e) {
    $("health").textContent = "not ready: " + e.message; $("health").className = "pill not-ready";
  }
}

// --- jobs ---------------------------------------------------------------------------------------------
async function refreshJobs() {
  let jobs;
  try { jobs = (await api("GET", "/jobs?limit=20")).data; } catch (e) { return; }
  const body = $("jobs-body");
  body.replaceChildren();
  for (const job of jobs) {
    const tr = document.createElement("tr");
    tr.dataset.jobId = job.id;
    const p = job.progress || {};
    const loss = (job.metrics || {}).train_loss;
    tr.append(cell(job.id), cell(job.adapter_name), cell(job.status, "status-" + job.status),
      cell(`${p.step || 0}/${p.total_steps || "?"}`), cell(loss == null ? "" : loss.toFixed(4)));
    const actions = document.createElement("td");
    const show = document.createElement("button");
    show.className = "link"; show.textContent = "loss curve";
    show.addEventListener("click", () => { state.selectedJob = job.id; refreshChart(); });
    actions.append(show);
    if (job.status === "queued" || job.status === "running") {
      const cancel = document.createElement("button");
      cancel.className = "link"; cancel.textContent = " cancel";
      cancel.addEventListener("click", () => api("POST", `/jobs/${job.id}/cancel`).then(refreshJobs));
      actions.append(cancel);
    }
    if (job.error) actions.append(Object.assign(document.createElement("span"), { className: "error", textContent: " " + job.error }));
    tr.append(actions);
    body.append(tr);
  }
  if (!state.selectedJob && jobs.length) state.selectedJob = jobs[0].id;
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
    if (d.eval_loss != null) evals.push([d.step, d.eval_loss]);
  }
  return { train, evals };
}

function drawChart(canvas, series) {
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, pad = { l: 50, r: 12, t: 12, b: 28 };
  ctx.clearRect(0, 0, W, H);
  const all = series.train.concat(series.evals);
  ctx.fillStyle = "#6b7280"; ctx.font = "12px system-ui";
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
  ctx.fillText(`step ${x0}`, pad.l, H - 8);
  ctx.fillText(`step ${x1}`, W - pad.r - 60, H - 8);
  const line = (points, color) => {
    if (!points.length) return;
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 2; ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    if (points.length === 1) { ctx.beginPath(); ctx.arc(X(points[0][0]), Y(points[0][1]), 3, 0, 7); ctx.fill(); }
  };
  line(series.train, "#2563eb");
  line(series.evals, "#d97706");
  canvas.dataset.trainPoints = series.train.length;
  canvas.dataset.evalPoints = series.evals.length;
}

async function refreshChart() {
  if (!state.selectedJob) return;
  $("job-detail").hidden = false;
  $("job-detail-id").textContent = state.selectedJob;
  try { drawChart($("loss-chart"), lossSeries(await jobEvents(state.selectedJob))); } catch (e) { /* next tick */ }
}

$("job-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target, out = $("job-form-result");
  try {
    const text = await form.file.files[0].text();
    const records = text.split("\n").filter((l) => l.trim()).map((l, i) => {
      try { return JSON.parse(l); } catch (e) { throw new Error(`line ${i + 1} is not JSON`); }
    });
    const job = await api("POST", "/jobs", {
      adapter_name: form.adapter_name.value,
      dataset: { records },
      bone: { r: Number(form.r.value), init_weights: form.variant.value === "bat" ? "bat" : true },
      training: { max_steps: Number(form.max_steps.value), learning_rate: Number(form.learning_rate.value),
                  batch_size: Number(form.batch_size.value) },
    });
    out.textContent = `started ${job.id}`; out.className = "";
    state.selectedJob = job.id;
    refreshJobs();
  } catch (e) {
    out.textContent = e.message; out.className = "error";
  }
});

// --- adapters -----------------------------------------------------------------------------------------
async function refreshAdapters() {
  let adapters;
  try { adapters = (await api("GET", "/adapters")).data; } catch (e) { return; }
  state.adapters = adapters;
  const body = $("adapters-body");
  body.replaceChildren();
  for (const a of adapters) {
    const tr = document.createElement("tr");
    const bone = a.bone || {}, loss = (a.metrics || {}).train_loss;
    tr.append(cell(a.name), cell(a.base_model), cell(String(bone.r)), cell(bone.init_weights === "bat" ? "bat" : "bone"),
      cell(loss == null ? "" : loss.toFixed(4)), cell(`${(a.size_bytes / 1024).toFixed(0)} KiB`),
      cell(new Date(a.created_at * 1000).toLocaleString()));
    const del = document.createElement("button");
    del.className = "link"; del.textContent = "delete";
    del.addEventListener("click", () => api("DELETE", `/adapters/${a.name}`).then(refreshAdapters));
    const td = document.createElement("td"); td.append(del); tr.append(td);
    body.append(tr);
  }
  for (const select of document.querySelectorAll(".adapter-select")) {
    const keep = select.value;
    select.replaceChildren(new Option("(base model)", ""));
    for (const a of adapters) select.append(new Option(a.name, a.name));
    select.value = [...select.options].some((o) => o.value === keep) ? keep : "";
  }
}

// --- playground: the same prompt, two adapters, side by side (both requests share one engine batch) ----
$("generate").addEventListener("click", async () => {
  const prompt = $("prompt").value;
  const params = { max_new_tokens: Number($("max-new-tokens").value), temperature: Number($("temperature").value) };
  const run = async (side) => {
    const out = $("output-" + side);
    out.textContent = "…"; out.classList.remove("error");
    try {
      const adapter = $("adapter-" + side).value || null;
      const reply = await api("POST", "/generate", { prompt, adapter, ...params });
      out.textContent = reply.text;
    } catch (e) {
      out.textContent = e.message; out.classList.add("error");
    }
  };
  await Promise.all([run("left"), run("right")]);
});

async function tick() {
  await Promise.all([refreshHealth(), refreshJobs(), refreshAdapters()]);
  await refreshChart();
}
tick();
setInterval(tick, 1500);
