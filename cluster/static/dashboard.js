// onspec's dashboard: plain SVG and DOM, no library, nothing fetched but this server's own JSON.
// Data: dashboard/data (history from Redis + live sums), v1/admin/drafters, v1/admin/trainer.
// Keys (docs/security.md): on a server with keys every call carries one as a bearer token. It comes from the URL's
// fragment (/dashboard#key=..., which browsers never send, and which is taken out of the address bar at once) or
// from a prompt after a 401, and is kept in this tab's sessionStorage. An API key shows the charts; promoting,
// rolling back and the registry and trainer panels need an admin key.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg"; // an XML namespace name, never requested
const PALETTE = ["#1a56c4", "#e07b00", "#1a8f3c", "#8e44ad", "#c62828", "#00838f", "#6d4c41", "#d81b60",
                 "#558b2f", "#455a64"];
const REFRESH_MS = 5000;
const BINS = 120;
const colors = new Map();
const state = { data: null, drafters: null, trainer: null, busy: false, again: false };

const $ = (id) => document.getElementById(id);

function color(name) {
  if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length]);
  return colors.get(name);
}

function el(tag, attrs = {}, text) {
  const ns = ["svg", "g", "line", "path", "circle", "text", "title", "rect"].includes(tag) ? SVG_NS : null;
  const node = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const KEY_STORE = "onspec-key";
function currentKey() {
  try { return sessionStorage.getItem(KEY_STORE) || state.key || ""; } catch (e) { return state.key || ""; }
}
function setKey(key) {
  state.key = key;
  try { sessionStorage.setItem(KEY_STORE, key); } catch (e) { /* storage off: the key lives in this page only */ }
}
function takeKeyFromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const key = params.get("key");
  if (!key) return;
  setKey(key.trim());
  params.delete("key");
  const rest = params.toString();
  history.replaceState(null, "", rest ? `#${rest}` : location.pathname + location.search);
}
// After a 401: ask once for a key (again if the one sent was refused); cancelling stops the asking.
function askKey(refused) {
  if (state.declined) return false;
  const k = window.prompt(refused ? "The server refused that key. Key (an API key to view, an admin key to promote or roll back):"
                                  : "This onspec server needs a key (an API key to view, an admin key to promote or roll back):");
  if (!k || !k.trim()) { state.declined = true; return false; }
  setKey(k.trim());
  return true;
}

async function api(path, options = {}, retried = false) {
  const sent = currentKey();
  const headers = { ...(options.headers || {}) };
  if (sent) headers.Authorization = `Bearer ${sent}`;
  const resp = await fetch(path, { ...options, headers });
  // Another call may have got a new key meanwhile: retry with it before asking.
  if (resp.status === 401 && !retried && (currentKey() !== sent || askKey(Boolean(sent)))) {
    return api(path, options, true);
  }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) {
    const err = new Error((body && body.error && body.error.message) || `HTTP ${resp.status}`);
    err.status = resp.status;
    throw err;
  }
  return body;
}

// ---- formatting ---------------------------------------------------------------------------------------------
const pad = (n) => String(n).padStart(2, "0");
function clock(t, withDay, withSeconds) {
  const d = new Date(t * 1000);
  const hm = `${pad(d.getHours())}:${pad(d.getMinutes())}${withSeconds ? `:${pad(d.getSeconds())}` : ""}`;
  return withDay ? `${d.getMonth() + 1}/${d.getDate()} ${hm}` : hm;
}
function stamp(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}
const fixed = (x, n) => (x === null || x === undefined || Number.isNaN(x) ? "–" : Number(x).toFixed(n));
const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);
const labelName = (l) => (l ? l : "(no label)");

// ---- series -------------------------------------------------------------------------------------------------
// Rolling ratio sum(num) / sum(den) over the trailing `rolling` seconds, evaluated at BINS instants of [t0, t1],
// one series per key. A bin with no point of the series in its trailing window has no value (a gap).
function rollingRatio(points, key, num, den, t0, t1, rolling) {
  const groups = new Map();
  for (const p of points) {
    const k = key(p);
    if (!groups.has(k)) groups.set(k, []);
    groups.get(k).push(p);
  }
  const step = (t1 - t0) / BINS;
  const series = [];
  for (const [name, pts] of [...groups.entries()].sort()) {
    pts.sort((a, b) => a.t - b.t);
    const out = [];
    let lo = 0, hi = 0, n = 0, d = 0;
    for (let i = 1; i <= BINS; i++) {
      const b = t0 + i * step;
      while (hi < pts.length && pts[hi].t <= b) { n += num(pts[hi]); d += den(pts[hi]); hi++; }
      while (lo < hi && pts[lo].t <= b - rolling) { n -= num(pts[lo]); d -= den(pts[lo]); lo++; }
      if (lo < hi && d > 0) out.push([b, n / d]);
    }
    if (out.length) series.push({ name, pts: out, gap: step * 1.5 });
  }
  return series;
}

// Tokens per second in 60 bins: each point's tokens are spread evenly over the interval it sums ([t - dt, t]),
// so the flush period never aliases with the bin width.
function throughput(points, t0, t1, value = (p) => p.tokens, name = "all traffic") {
  const nb = 60, w = (t1 - t0) / nb, bins = new Array(nb).fill(0);
  let first = Infinity;
  for (const p of points) {
    const a = Math.max(p.t - p.dt, t0), z = Math.min(p.t, t1);
    if (z <= a || !value(p)) continue;
    first = Math.min(first, a);
    const rate = value(p) / p.dt;
    for (let i = Math.max(0, Math.floor((a - t0) / w)); i < nb && t0 + i * w < z; i++) {
      const lo = Math.max(a, t0 + i * w), hi = Math.min(z, t0 + (i + 1) * w);
      if (hi > lo) bins[i] += rate * (hi - lo);
    }
  }
  const pts = [];
  for (let i = 0; i < nb; i++) if (t0 + (i + 1) * w > first) pts.push([t0 + (i + 1) * w, bins[i] / w]);
  return pts.length ? [{ name, pts, gap: Infinity }] : [];
}

// ---- the chart ----------------------------------------------------------------------------------------------
const TIME_STEPS = [10, 15, 30, 60, 300, 600, 900, 1800, 3600, 10800, 21600, 43200, 86400];

// The smallest 1, 2, 2.5 or 5 times a power of ten that is at least x: round tick labels.
function niceStep(x) {
  const p = 10 ** Math.floor(Math.log10(x));
  return [1, 2, 2.5, 5, 10].map((f) => f * p).find((s) => s >= x);
}

function chart(svg, { series, t0, t1, yMax, yFmt, events = [], empty = "no data in this window" }) {
  const W = svg.clientWidth || 600, H = svg.clientHeight || 220;
  const m = { l: 48, r: 14, t: 18, b: 22 };
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const values = series.flatMap((s) => s.pts.map((p) => p[1]));
  const top = yMax !== undefined ? yMax : values.length ? 4 * niceStep(Math.max(1e-9, ...values) * 1.05 / 4) : 1;
  const x = (t) => m.l + ((t - t0) / (t1 - t0)) * (W - m.l - m.r);
  const y = (v) => H - m.b - (v / top) * (H - m.t - m.b);
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    svg.append(el("line", { class: "grid", x1: m.l, x2: W - m.r, y1: y(v), y2: y(v) }));
    if (values.length || yMax !== undefined) {
      svg.append(el("text", { x: m.l - 6, y: y(v) + 4, "text-anchor": "end" }, yFmt(v)));
    }
  }
  const stepS = TIME_STEPS.find((s) => (t1 - t0) / s <= 7) || 86400;
  for (let t = Math.ceil(t0 / stepS) * stepS; t <= t1; t += stepS) {
    svg.append(el("line", { class: "grid", x1: x(t), x2: x(t), y1: m.t, y2: H - m.b }));
    svg.append(el("text", { x: x(t), y: H - 6, "text-anchor": "middle" }, clock(t, t1 - t0 > 86400, stepS < 60)));
  }
  svg.append(el("line", { class: "axis", x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
  // Labels of nearby events are staggered so that a promotion followed by a rollback stays readable.
  events.forEach((ev, i) => drawEvent(svg, ev, x(ev.at), m.t + 10 + (i % 3) * 12, H - m.b, W - m.r));
  let count = 0;
  for (const s of series) {
    const c = color(s.name);
    let d = "", prev = null;
    for (const [t, v] of s.pts) {
      d += `${prev === null || t - prev > s.gap ? "M" : "L"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      prev = t;
    }
    svg.append(el("path", { class: "series", d, stroke: c }));
    for (const [t, v] of s.pts) {
      const dot = el("circle", { class: "pt", cx: x(t), cy: y(v), r: 2.2, fill: c, "data-series": s.name });
      dot.append(el("title", {}, `${s.name}  ${clock(t, true)}  ${yFmt(v)}`));
      svg.append(dot);
      count++;
    }
  }
  if (!count) svg.append(el("text", { class: "empty", x: W / 2, y: H / 2, "text-anchor": "middle" }, empty));
  svg.dataset.points = String(count);
  const legend = $(`${svg.id}-legend`);
  if (legend) {
    legend.replaceChildren(...series.map((s) => {
      const item = el("span", { style: `--c: ${color(s.name)}` }, s.name);
      return item;
    }));
  }
}

function drawEvent(svg, ev, px, yLabel, yBottom, xMax) {
  const kind = ev.action === "rollback" ? "rollback" : ev.action === "promote" ? "promote" : "init";
  const mark = { promote: "▲", rollback: "▼", init: "●" }[kind];
  const g = el("g", { class: `ev ${kind}` });
  g.append(el("line", { x1: px, x2: px, y1: yLabel - 10, y2: yBottom }));
  const right = px > xMax - 70; // near the right edge the label goes on the left of its line
  g.append(el("text", { x: right ? px - 3 : px + 3, y: yLabel, "text-anchor": right ? "end" : "start" },
              `${mark} ${ev.version}`));
  g.append(el("title", {}, `${stamp(ev.at)} ${ev.action} ${ev.previous || "–"} → ${ev.version}: ${ev.reason || ""}`));
  svg.append(g);
}

// ---- rendering ----------------------------------------------------------------------------------------------
function renderCharts() {
  const data = state.data;
  if (!data) return;
  const rolling = Number($("rolling").value);
  const pts = data.points;
  const t1 = Math.max(data.now, ...pts.map((p) => p.t));
  const t0 = start(data, t1);
  const events = data.events.filter((e) => e.at >= t0);
  const ratio = (v) => pct(v).replace(" %", "%");
  chart($("chart-acc-version"), {
    // The drafter model's own acceptance (suffix drafts are not the version's doing); older entries lack the split.
    series: rollingRatio(pts, (p) => p.version, (p) => p.model_accepted ?? p.accepted,
                         (p) => p.model_drafted ?? p.drafted, t0, t1, rolling),
    t0, t1, yMax: 1, yFmt: ratio, events,
  });
  chart($("chart-sources"), {
    series: [...throughput(pts, t0, t1, (p) => p.model_accepted, "drafter model"),
             ...throughput(pts, t0, t1, (p) => p.suffix_accepted, "suffix (text seen before)")],
    t0, t1, yFmt: (v) => fixed(v, 1), events,
  });
  chart($("chart-acc-label"), {
    series: rollingRatio(pts, (p) => labelName(p.label), (p) => p.accepted, (p) => p.drafted, t0, t1, rolling),
    t0, t1, yMax: 1, yFmt: ratio, events,
  });
  chart($("chart-throughput"), { series: throughput(pts, t0, t1), t0, t1, yFmt: (v) => fixed(v, 1), events });
  chart($("chart-tps"), {
    series: rollingRatio(pts, (p) => p.version, (p) => p.tokens, (p) => p.steps, t0, t1, rolling),
    t0, t1, yFmt: (v) => fixed(v, 2), events,
  });
  const loss = data.trainer.filter((p) => p.loss !== null).map((p) => [p.t, p.loss]);
  chart($("chart-loss"), {
    series: loss.length ? [{ name: "trainer loss", pts: loss, gap: data.interval_s * 3 }] : [], t0, t1,
    yFmt: (v) => fixed(v, 3), empty: "no trainer figures in this window",
  });
  renderSummary(pts, t1);
}

// The charts begin where the window's data begins (a little before), not at an empty window's start.
function start(data, t1) {
  const begins = [...data.points.map((p) => p.t - p.dt), ...data.events.map((e) => e.at),
                  ...data.trainer.map((p) => p.t)].filter((t) => t > t1 - data.window_s);
  if (!begins.length) return t1 - data.window_s;
  const first = Math.min(...begins);
  return Math.max(t1 - data.window_s, Math.min(first - 0.05 * (t1 - first), t1 - 60));
}

function renderSummary(pts, t1) {
  const sum = (f) => pts.reduce((a, p) => a + f(p), 0);
  const requests = sum((p) => p.requests), drafted = sum((p) => p.drafted), steps = sum((p) => p.steps);
  const recent = throughput(pts, t1 - 60, t1);
  const lastMinute = recent.length ? recent[0].pts.reduce((a, p) => a + p[1], 0) / 60 : 0;
  const tiles = [
    ["requests in the window", String(requests)],
    ["acceptance in the window", drafted ? pct(sum((p) => p.accepted) / drafted) : "–"],
    ["tokens per forward pass", steps ? fixed(sum((p) => p.tokens) / steps, 2) : "–"],
    ["tokens/s, last minute", fixed(lastMinute, 1)],
    ["mean latency", requests ? `${fixed(sum((p) => p.latency_s) / requests, 2)} s` : "–"],
  ];
  $("summary").replaceChildren(...tiles.map(([k, v]) => {
    const t = el("div", { class: "tile" });
    t.append(el("div", { class: "v" }, v), el("div", { class: "k" }, k));
    return t;
  }));
}

function table(node, head, rows) {
  const thead = el("tr");
  for (const h of head) thead.append(el("th", {}, h));
  node.replaceChildren(thead, ...rows);
}

function renderReplicas() {
  const data = state.data;
  if (!data) return;
  const now = data.now;
  table($("replicas"), ["replica", "drafter", "in flight", "swaps", "reported"], data.replicas.map((r) => {
    const tr = el("tr", { "data-replica": r.replica_id });
    tr.append(el("td", {}, r.replica_id), el("td", { class: "drafter" }, r.drafter_version || "–"),
              el("td", {}, String(r.in_flight ?? "–")), el("td", {}, String(r.drafter_swaps ?? "–")),
              el("td", {}, r.seen ? `${Math.max(0, Math.round(now - r.seen))} s ago` : "–"));
    return tr;
  }));
}

function renderEvents() {
  const data = state.data;
  if (!data) return;
  table($("events"), ["when", "action", "version", "previous", "reason"], [...data.events].reverse().map((e) => {
    const tr = el("tr");
    tr.append(el("td", {}, stamp(e.at)), el("td", { class: e.action }, e.action), el("td", {}, e.version),
              el("td", {}, e.previous || "–"), el("td", { class: "reason" }, e.reason || ""));
    return tr;
  }));
}

function gate(evaluation) {
  if (!evaluation || !Object.keys(evaluation).length) return "–";
  const c = evaluation.candidate, s = evaluation.serving;
  if (c && s && c.gate !== undefined) {
    return `${fixed(c.gate, 3)} vs ${fixed(s.gate, 3)} (${evaluation.serving_version || "serving"})`;
  }
  if (evaluation.acceptance_rate !== undefined) return `acceptance ${fixed(evaluation.acceptance_rate, 3)}`;
  return JSON.stringify(evaluation);
}

function renderRegistry() {
  const reg = state.drafters;
  if (reg instanceof Error) {
    $("serving").textContent = "unknown";
    table($("registry"), ["registry"], [rowOf(reg.message)]);
    $("rollback").disabled = true;
    return;
  }
  if (!reg) return;
  $("serving").textContent = reg.serving || "none";
  $("rollback").disabled = !reg.serving;
  table($("registry"), ["version", "status", "parent", "gate", "reason", "created", ""],
        [...reg.drafters].reverse().map((d) => {
    const tr = el("tr", { "data-version": d.version, class: d.status === "serving" ? "serving" : "" });
    const status = el("td");
    status.append(el("span", { class: `status ${d.status}` }, d.status + (d.pruned ? " (files pruned)" : "")));
    const act = el("td");
    if (d.status === "candidate" || (d.status === "rejected" && !d.pruned)) {
      act.append(button("Promote", "promote", () => promote(d.version)));
    } else if (d.status === "retired") {
      act.append(button("Roll back to", "rollback-to danger", () => rollback(d.version)));
    }
    tr.append(el("td", {}, d.version), status, el("td", {}, d.parent_version || "–"),
              el("td", {}, gate(d.evaluation)), el("td", { class: "reason" }, d.reason || ""),
              el("td", {}, stamp(d.created)), act);
    return tr;
  }));
}

function rowOf(text) {
  const tr = el("tr");
  tr.append(el("td", { class: "muted" }, text));
  return tr;
}

function button(text, cls, onclick) {
  const b = el("button", { type: "button", class: cls }, text);
  b.addEventListener("click", onclick);
  return b;
}

function renderTrainer() {
  const t = state.trainer;
  const dl = $("trainer");
  if (t instanceof Error || !t) {
    dl.replaceChildren(el("dt", {}, "state"), el("dd", { class: "muted" },
      t instanceof Error ? t.message : "…"));
    return;
  }
  const ev = t.last_eval || {};
  const n = (v) => v ?? 0;
  const facts = [
    ["state", t.alive === false ? "stopped" : t.paused ? "paused by an operator" : "running"],
    ["steps", `${n(t.steps)} (${n(t.record_steps)} on logged windows, ${n(t.onpolicy_steps)} on-policy)`],
    ["last loss", fixed(t.last_loss, 4)],
    ["throughput", `${fixed(t.steps_per_min, 1)} steps/min, ${fixed(t.tokens_supervised_per_min, 0)} tokens supervised/min` +
      ` (last 5 min, ${n(t.threads)} threads)`],
    ["record wait", t.record_wait_p50_s == null ? "–" :
      `${fixed(t.record_wait_p50_s, 1)} s median, ${fixed(t.record_wait_max_s, 1)} s max (stream to training step)`],
    ["records consumed", `${n(t.records_acked)} of ${n(t.records_read)} read (${n(t.held_back)} held back for the gate)`],
    ["paused for serving load", `${n(t.busy_waits)} times`],
    ["candidates", `${n(t.candidates)}: ${(t.promoted || []).length} promoted, ${(t.rejected || []).length} rejected`],
    ["last gate", ev.version ? `${ev.version} ${ev.decision}: ${gate(ev)}` : "–"],
    ["follows", t.serving_version || "–"],
  ];
  dl.replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function renderErrors() {
  const errs = state.data ? state.data.errors : [];
  $("errors").replaceChildren(...errs.map((e) => el("div", {}, e)));
}

// ---- actions ------------------------------------------------------------------------------------------------
function say(text, isError) {
  const m = $("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}

async function act(path, body, what) {
  if (!window.confirm(what)) return;
  try {
    const res = await api(path, { method: "POST", headers: { "content-type": "application/json" },
                                  body: JSON.stringify(body) });
    say(res.changed ? `${res.version} is now serving (was ${res.previous || "none"})` : `${res.version} was already serving`);
  } catch (e) {
    say(e.message, true);
  }
  await refresh();
}

function promote(version) {
  return act(`v1/admin/drafters/${encodeURIComponent(version)}/promote`,
             { reason: "promoted from the dashboard" }, `Promote ${version} to every replica?`);
}

function rollback(version) {
  const body = { reason: "rolled back from the dashboard" };
  if (version) body.version = version;
  return act("v1/admin/drafters/rollback", body,
             version ? `Roll back to ${version}?` : "Roll back to the version that served before the current one?");
}

// ---- the loop -----------------------------------------------------------------------------------------------
async function settle(promise) {
  try { return await promise; } catch (e) { return e; }
}

async function refresh() {
  if (state.busy) { state.again = true; return; } // e.g. after a click: once the running one is done
  state.busy = true;
  try {
    const windowS = $("window").value;
    const [data, drafters, trainer] = await Promise.all([
      settle(api(`dashboard/data?window_s=${windowS}`)), settle(api("v1/admin/drafters")),
      settle(api("v1/admin/trainer")),
    ]);
    if (!(data instanceof Error)) state.data = data;
    state.drafters = drafters;
    state.trainer = trainer;
    renderCharts();
    renderReplicas();
    renderEvents();
    renderRegistry();
    renderTrainer();
    renderErrors();
    if (data instanceof Error) $("errors").append(el("div", {}, `dashboard data: ${data.message}`));
    $("updated").textContent = `updated ${stamp(Date.now() / 1000)} · history in ${state.data ? state.data.store : "?"}`;
  } finally {
    state.busy = false;
  }
  if (state.again) {
    state.again = false;
    await refresh();
  }
}

// The window and rolling choices live in the URL's hash, so a reload (or a shared link) keeps them.
function loadSettings() {
  const params = new URLSearchParams(location.hash.slice(1));
  for (const id of ["window", "rolling"]) {
    const v = params.get(id), select = $(id);
    if (v && [...select.options].some((o) => o.value === v)) select.value = v;
  }
}
function saveSettings() {
  const params = new URLSearchParams({ window: $("window").value, rolling: $("rolling").value });
  history.replaceState(null, "", `#${params}`);
}

takeKeyFromHash();
loadSettings();
$("window").addEventListener("change", () => { saveSettings(); refresh(); });
$("rolling").addEventListener("change", () => { saveSettings(); renderCharts(); });
$("rollback").addEventListener("click", () => rollback(null));
window.addEventListener("resize", renderCharts);
refresh();
setInterval(refresh, REFRESH_MS);
