// patchcore inspection page: plain JS against the server's /v1 API (no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, threshold: null, results: [], counter: 0 };

function token() { return $("token").value.trim(); }
function authHeaders() { return token() ? { Authorization: "Bearer " + token() } : {}; }
function setStatus(text) { $("status").textContent = text; }

async function api(path, options = {}) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  if (!response.ok) {
    const detail = body && body.detail ? (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) : response.statusText;
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

async function loadModels() {
  const { models } = await api("/v1/models");
  const select = $("model");
  select.innerHTML = "";
  for (const m of models) {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = m.name;
    select.appendChild(option);
  }
  if (models.length) await selectModel(models[0].name);
  else setStatus("no models served");
}

async function selectModel(name) {
  const info = await api(`/v1/models/${encodeURIComponent(name)}`);
  state.model = info;
  $("model-info").textContent = `v${info.version} · ${info.backbone} · bank ${info.bank_rows} rows · ` +
    `threshold ${info.threshold === null ? "none" : info.threshold.toFixed(2)}`;
  if (info.threshold !== null) setThreshold(info.threshold, true);
  $("pending").textContent = info.feedback ? info.feedback.good_pending : 0;
  loadFeedback();
  loadRoc();
}

function setThreshold(value, rescale) {
  const slider = $("threshold");
  if (rescale) {
    const top = Math.max(2 * value, ...state.results.map((r) => r.score * 1.1), 1);
    slider.max = top.toFixed(1);
  }
  slider.value = value;
  state.threshold = Number(slider.value);
  $("threshold-value").textContent = state.threshold.toFixed(1);
  relabel();
}

function relabel() {
  for (const r of state.results) {
    const defect = state.threshold !== null && r.score > state.threshold;
    const label = r.card.querySelector(".label");
    label.textContent = defect ? "defect" : "good";
    label.className = "label " + (defect ? "defect" : "good");
    r.card.classList.toggle("defect", defect);
    r.card.querySelector(".score").textContent = r.score.toFixed(2);
  }
}

function render() {
  const order = $("sort").value;
  const sorted = [...state.results];
  if (order === "score-desc") sorted.sort((a, b) => b.score - a.score);
  else if (order === "score-asc") sorted.sort((a, b) => a.score - b.score);
  else sorted.sort((a, b) => b.seq - a.seq);
  const gallery = $("gallery");
  for (const r of sorted) gallery.appendChild(r.card);  // appendChild moves: the gallery ends up in order
}

function makeCard(result, fileName) {
  const card = $("card-template").content.firstElementChild.cloneNode(true);
  card.dataset.resultId = result.result_id;
  card.querySelector(".name").textContent = fileName;
  card.querySelector(".input").src = "data:image/png;base64," + result.input_png;
  const heat = card.querySelector(".heat");
  heat.src = "data:image/png;base64," + result.heatmap_png;
  heat.style.opacity = $("opacity").value;
  card.querySelector(".mark-good").addEventListener("click", () => mark(result.result_id, "good"));
  card.querySelector(".mark-defect").addEventListener("click", () => mark(result.result_id, "defect"));
  return card;
}

async function scoreFiles(files) {
  const name = $("model").value;
  let done = 0;
  setStatus(`scoring ${files.length} image(s)...`);
  await Promise.all([...files].map(async (file) => {
    const form = new FormData();
    form.append("file", file, file.name);
    try {
      const result = await api(`/v1/models/${encodeURIComponent(name)}/predict?heatmap=1&input=1`,
                               { method: "POST", body: form, headers: authHeaders() });
      const entry = { id: result.result_id, score: result.score, seq: state.counter++, card: makeCard(result, file.name) };
      state.results.push(entry);
      done += 1;
      setThreshold(state.threshold ?? result.threshold ?? result.score, true);
      render();
    } catch (err) {
      setStatus(`${file.name}: ${err.message}`);
      throw err;
    }
  })).then(() => setStatus(`scored ${done} image(s)`), () => {});
}

async function mark(resultId, verdict) {
  const entry = state.results.find((r) => r.id === resultId);
  try {
    const body = await api(`/v1/models/${encodeURIComponent($("model").value)}/feedback`, {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ result_id: resultId, verdict }),
    });
    entry.card.querySelector(".verdict").textContent = `marked ${verdict}`;
    $("pending").textContent = body.counts.good_pending;
    setStatus(`feedback saved (${body.stored_as})`);
    await loadFeedback();
    loadRoc();
  } catch (err) {
    setStatus(`feedback refused: ${err.message}`);
  }
}

async function loadFeedback() {
  const name = $("model").value;
  if (!name) return;
  let body;
  try {
    body = await api(`/v1/models/${encodeURIComponent(name)}/feedback`, { headers: authHeaders() });
  } catch (err) {
    setStatus(`cannot list feedback: ${err.message}`);
    return;
  }
  const rows = $("review-rows");
  rows.innerHTML = "";
  for (const f of body.feedback) {
    const tr = document.createElement("tr");
    tr.dataset.feedbackId = f.feedback_id;
    const status = f.status === "applied" ? `applied in v${f.applied_version}`
      : f.status === "left_out" ? `left out: ${f.left_out}` : "pending";
    for (const text of [f.feedback_id, f.verdict, f.score.toFixed(2), status, f.note || ""]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.appendChild(td);
    }
    const td = document.createElement("td");
    if (f.status !== "applied") {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "withdraw";
      button.textContent = "withdraw";
      button.addEventListener("click", () => withdraw(f.feedback_id));
      td.appendChild(button);
    }
    tr.appendChild(td);
    rows.appendChild(tr);
  }
  $("review-count").textContent = body.feedback.length;
  $("pending").textContent = body.counts.good_pending;
}

async function withdraw(feedbackId) {
  try {
    const body = await api(`/v1/models/${encodeURIComponent($("model").value)}/feedback/${feedbackId}`, {
      method: "DELETE", headers: authHeaders(),
    });
    const entry = state.results.find((r) => r.id === body.withdrawn.result_id);
    if (entry) entry.card.querySelector(".verdict").textContent = "withdrawn";
    setStatus(`feedback ${feedbackId} withdrawn`);
  } catch (err) {
    setStatus(`withdraw refused: ${err.message}`);
  }
  await loadFeedback();
}

async function applyUpdate() {
  const button = $("apply-update");
  button.disabled = true;
  setStatus("updating the model...");
  try {
    const body = await api(`/v1/models/${encodeURIComponent($("model").value)}/apply-update`, {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() }, body: "{}",
    });
    for (const r of body.rescored) {
      const entry = state.results.find((e) => e.id === r.result_id);
      if (!entry) continue;
      entry.card.querySelector(".was").textContent = `(was ${entry.score.toFixed(2)})`;
      entry.score = r.score_after;
    }
    await selectModel($("model").value);
    setThreshold(state.threshold, false);
    render();
    const left = body.left_out.length ? `; left out: ${body.left_out.map((l) => l.reason).join("; ")}` : "";
    setStatus(`model v${body.model_version}: bank ${body.bank_rows_before} -> ${body.bank_rows_after} rows ` +
              `(stopped by ${body.stopped_by}); previous file kept as ${body.previous_file}${left}`);
    await loadFeedback();
  } catch (err) {
    setStatus(`update refused: ${err.message}`);
  } finally {
    button.disabled = false;
    loadFeedback();
  }
}

// ---- threshold from feedback: the ROC of the marked results (scored again by the served model), a proposal
const SVG = "http://www.w3.org/2000/svg";
const percent = (x) => (x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%");
// a rate on few marks says little: with its 95% upper bound ("0 of 6" allows up to 39%)
const rate = (x, high) => `${percent(x)}; up to ${percent(high)} at 95%`;

function svgElement(tag, attributes, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function drawRoc(body) {
  const svg = $("roc");
  svg.replaceChildren();
  const x = (rate) => 30 + 200 * rate, y = (rate) => 210 - 200 * rate;  // false alarms across, detections up
  svg.appendChild(svgElement("rect", { x: 30, y: 10, width: 200, height: 200, fill: "none", stroke: "#ccc" }));
  svg.appendChild(svgElement("line", { class: "chance", x1: x(0), y1: y(0), x2: x(1), y2: y(1) }));
  svg.appendChild(svgElement("text", { x: 30, y: 232 }, "false alarms among marked good"));
  svg.appendChild(svgElement("text", { x: 12, y: 210, transform: "rotate(-90 12 210)" }, "defects caught"));
  if (!body.roc) return;
  const points = body.roc.map((p) => `${x(p.false_alarm_rate).toFixed(1)},${y(p.detection_rate).toFixed(1)}`);
  svg.appendChild(svgElement("polyline", { class: "curve", points: points.join(" ") }));
  for (const [cls, p] of [["current", body.current], ["proposal", body.proposal]]) {
    if (p && p.false_alarm_rate !== null && p.detection_rate !== null)
      svg.appendChild(svgElement("circle", { class: cls, cx: x(p.false_alarm_rate), cy: y(p.detection_rate), r: 5 }));
  }
}

function rocTarget() {
  const target = Number($("roc-target").value);
  return $("roc-target").value !== "" && target >= 0 && target <= 1 ? target : null;
}

async function loadRoc() {
  const name = $("model").value;
  if (!name || !$("threshold-panel").open) return;
  const target = rocTarget();
  const query = target === null ? "" : `?${$("roc-rule").value}=${target}`;
  $("roc-apply").disabled = true;
  let body;
  try {
    body = await api(`/v1/models/${encodeURIComponent(name)}/roc${query}`, { headers: authHeaders() });
  } catch (err) {
    $("roc-current").textContent = `cannot score the marked results: ${err.message}`;
    return;
  }
  drawRoc(body);
  const c = body.current;
  const threshold = body.threshold === null ? "none" : body.threshold.toFixed(2);
  $("roc-current").textContent = `${body.marked.good} marked good, ${body.marked.defect} marked defect (scored by v` +
    `${body.model_version}${body.auc === null ? "" : `; AUC ${body.auc.toFixed(3)}`}). Current threshold ${threshold}` +
    (c === null ? "." :
    `: ${c.false_alarms} of ${c.n_good} good flagged (${rate(c.false_alarm_rate, c.false_alarm_rate_high)}), ` +
    `${c.misses} of ${c.n_defect} defects missed (${rate(c.miss_rate, c.miss_rate_high)}).`);
  const p = body.proposal;
  $("roc-proposal").textContent = target === null ? "target: a rate between 0 and 1"
    : p ? `proposed threshold ${p.threshold.toFixed(2)}: ${p.false_alarms} of ${p.n_good} good flagged ` +
          `(${rate(p.false_alarm_rate, p.false_alarm_rate_high)}), ${p.misses} of ${p.n_defect} defects missed ` +
          `(${rate(p.miss_rate, p.miss_rate_high)})`
    : body.reason;
  $("roc-apply").disabled = !p;
}

async function applyThreshold() {
  const name = $("model").value, target = rocTarget();
  if (target === null) return;
  $("roc-apply").disabled = true;
  try {  // the server proposes again from the marks it holds now, and says what it applied
    const body = await api(`/v1/models/${encodeURIComponent(name)}/threshold`, {
      method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ [$("roc-rule").value]: target }),
    });
    await selectModel(name);  // the new threshold relabels the cards
    setStatus(body.changed ? `model v${body.model_version}: threshold ` +
      `${body.old === null ? "none" : body.old.toFixed(2)} -> ${body.new.toFixed(2)}; previous file kept as ` +
      `${body.previous_file}` : `threshold unchanged (${body.new.toFixed(2)})`);
  } catch (err) {
    setStatus(`threshold refused: ${err.message}`);
    loadRoc();
  }
}

function init() {
  $("token").value = sessionStorage.getItem("patchcore-token") || "";
  $("token").addEventListener("change", () => sessionStorage.setItem("patchcore-token", token()));
  $("model").addEventListener("change", (e) => selectModel(e.target.value));
  $("files").addEventListener("change", (e) => { scoreFiles(e.target.files); e.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); scoreFiles(e.dataTransfer.files); });
  $("threshold").addEventListener("input", (e) => setThreshold(Number(e.target.value), false));
  $("threshold-reset").addEventListener("click", () => state.model && setThreshold(state.model.threshold, true));
  $("opacity").addEventListener("input", (e) => {
    for (const img of document.querySelectorAll(".card .heat")) img.style.opacity = e.target.value;
  });
  $("sort").addEventListener("change", render);
  $("apply-update").addEventListener("click", applyUpdate);
  $("threshold-panel").addEventListener("toggle", loadRoc);
  $("roc-propose").addEventListener("click", loadRoc);
  $("roc-apply").addEventListener("click", applyThreshold);
  loadModels().catch((err) => setStatus(`cannot list models: ${err.message}`));
}

init();
