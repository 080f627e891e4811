// The ferrum console: plain JavaScript over the server's own OpenAI-shaped API (no framework,
// no CDN). The key lives in sessionStorage, sent as a Bearer token like any SDK would.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("ferrum.key") || "", prices: {}, admin: false, project: null };

// ---------------------------------------------------------------------------------------------
// API

class ApiError extends Error {}

async function api(path, { method = "GET", body } = {}) {
  const headers = {};
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!r.ok) {
    const message = data && data.error ? data.error.message : `${r.status} ${r.statusText}`;
    const e = new ApiError(message);
    e.status = r.status;
    throw e;
  }
  return data;
}

/// Every page of a list endpoint (`after` cursors).
async function listAll(path) {
  const out = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    out.push(...page.data);
    if (!page.has_more || !page.data.length) return out;
    after = page.last_id || page.data[page.data.length - 1].id;
  }
}

function show(el, text) { el.textContent = text || ""; }
const usd = (v) => `$${v.toFixed(v < 0.01 && v > 0 ? 6 : 4)}`;
const day = (t) => new Date(t * 1000).toISOString().slice(0, 10);

// ---------------------------------------------------------------------------------------------
// Sign in and tabs

/// Signs in with a key: a project key (or the server's single key) opens the playground and its
/// usage; the admin key opens the organization's usage, costs, projects and keys (OpenAI's admin
/// keys cannot call models, so the playground is hidden for it).
async function signIn(key) {
  state.key = key;
  state.prices = (await api("/console/prices.json")).models;
  let models = null;
  try {
    models = await api("/v1/models");
  } catch (e) {
    if (e.status !== 403) throw e;
  }
  try {
    await api("/v1/organization/projects?limit=1");
    state.admin = true;
  } catch (e) {
    state.admin = false;
    if (!models) throw e;
  }
  sessionStorage.setItem("ferrum.key", key);
  const select = $("model");
  select.replaceChildren();
  for (const m of models ? models.data : []) {
    const price = state.prices[m.id];
    if (price && price.kind !== "chat") continue;
    const option = document.createElement("option");
    option.value = option.textContent = m.id;
    select.append(option);
  }
  $("sign-in").hidden = true;
  $("tabs").hidden = $("sign-out").hidden = false;
  document.querySelector('[data-tab="admin"]').hidden = !state.admin;
  document.querySelector('[data-tab="playground"]').hidden = !models;
  openTab(models ? "playground" : "usage");
}

function signOut() {
  sessionStorage.removeItem("ferrum.key");
  location.reload();
}

function openTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) {
    b.setAttribute("aria-pressed", String(b.dataset.tab === name));
  }
  for (const id of ["playground", "usage", "admin"]) $(id).hidden = id !== name;
  if (name === "usage") loadUsage().catch((e) => show($("usage-error"), e.message));
  if (name === "admin") loadProjects().catch((e) => show($("admin-error"), e.message));
}

// ---------------------------------------------------------------------------------------------
// Playground: a streamed chat completion, tokens shown as they arrive

let running = null;

async function sendChat(event) {
  event.preventDefault();
  show($("chat-error"), "");
  show($("answer-usage"), "");
  const answer = $("answer");
  answer.textContent = "";
  const model = $("model").value;
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  messages.push({ role: "user", content: $("prompt").value });
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  running = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let first = null;
  try {
    const headers = { "Content-Type": "application/json" };
    if (state.key) headers.Authorization = `Bearer ${state.key}`;
    const r = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body), signal: running.signal });
    if (!r.ok) {
      const data = await r.json().catch(() => null);
      throw new ApiError(data && data.error ? data.error.message : `${r.status} ${r.statusText}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let usage = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new ApiError(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const c of chunk.choices || []) {
            if (c.delta && c.delta.content) {
              if (first === null) first = performance.now();
              answer.textContent += c.delta.content;
            }
          }
        }
      }
    }
    if (usage) showUsage(model, usage, started, first);
  } catch (e) {
    if (e.name !== "AbortError") show($("chat-error"), e.message);
  } finally {
    running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function showUsage(model, usage, started, first) {
  const cached = (usage.prompt_tokens_details || {}).cached_tokens || 0;
  const p = state.prices[model];
  const cost = p
    ? ((usage.prompt_tokens - cached) * p.input + cached * p.cached_input + usage.completion_tokens * p.output) / 1e6
    : null;
  const ttft = first === null ? "" : `, first token after ${Math.round(first - started)} ms`;
  show($("answer-usage"),
    `${usage.prompt_tokens} input tokens (${cached} cached), ${usage.completion_tokens} output tokens` +
    (cost === null ? "" : `, ${usd(cost)}`) + ttft);
}

// ---------------------------------------------------------------------------------------------
// Usage and costs: per day from the organization usage and costs APIs (admin key), else the
// totals of /v1/usage

async function loadUsage() {
  show($("usage-error"), "");
  const days = Number($("usage-days").value);
  const group = $("usage-group").value;
  $("usage-key").textContent = state.admin && group === "project_id" ? "project" : "model";
  const start = Math.floor(Date.now() / 1000 / 86400 - days + 1) * 86400;
  if (!state.admin) {
    const totals = await api("/v1/usage");
    fillTotals(totals.data.map((t) => ({ ...t, key: t.model })));
    show($("usage-note"), "Per-day charts need the admin key (the organization usage and costs APIs).");
    drawBars($("cost-chart"), [], usd);
    drawBars($("tokens-chart"), [], String);
    return;
  }
  show($("usage-note"), "");
  const q = `start_time=${start}&bucket_width=1d&limit=${days}`;
  const costGroup = group === "model" ? "line_item" : "project_id";
  const [usage, costs] = await Promise.all([
    pages(`/v1/organization/usage/completions?${q}&group_by=${group}`),
    pages(`/v1/organization/costs?${q}&group_by=${costGroup}`),
  ]);
  drawBars($("tokens-chart"), usage.map((b) => ({
    label: day(b.start_time),
    parts: b.results.map((r) => ({ key: r[group] || "all", value: r.input_tokens + r.output_tokens })),
  })), String);
  const costKey = (r) => group === "model" ? (r.line_item || "all").split(",")[0] : r.project_id || "all";
  drawBars($("cost-chart"), costs.map((b) => ({
    label: day(b.start_time),
    // A line item is "<model>, input" and the like: summed per model.
    parts: b.results.map((r) => ({ key: costKey(r), value: r.amount.value })),
  })), usd);
  // The period's totals per model (or project), from the same buckets.
  const rows = new Map();
  const row = (key) => rows.get(key) || rows.set(key, {
    key, requests: 0, prompt_tokens: 0, cached_tokens: 0, completion_tokens: 0, cost_usd: 0,
  }).get(key);
  for (const b of usage) {
    for (const r of b.results) {
      const t = row(r[group] || "all");
      t.requests += r.num_model_requests;
      t.prompt_tokens += r.input_tokens;
      t.cached_tokens += r.input_cached_tokens;
      t.completion_tokens += r.output_tokens;
    }
  }
  for (const b of costs) for (const r of b.results) row(costKey(r)).cost_usd += r.amount.value;
  fillTotals([...rows.values()]);
}

/// The buckets of every page of a usage or costs query (`next_page` cursors).
async function pages(path) {
  const out = [];
  let page = null;
  for (;;) {
    const r = await api(page ? `${path}&page=${encodeURIComponent(page)}` : path);
    out.push(...r.data);
    if (!r.has_more || !r.next_page) return out;
    page = r.next_page;
  }
}

function fillTotals(rows) {
  const body = $("usage-table").tBodies[0];
  body.replaceChildren();
  for (const t of rows) {
    const tr = body.insertRow();
    tr.insertCell().textContent = t.key;
    for (const v of [t.requests, t.prompt_tokens, t.cached_tokens, t.completion_tokens]) {
      const td = tr.insertCell();
      td.className = "num";
      td.textContent = v.toLocaleString("en");
    }
    const td = tr.insertCell();
    td.className = "num";
    td.textContent = usd(t.cost_usd);
  }
}

const COLORS = ["#9a3b12", "#2463eb", "#3d8b37", "#b8860b", "#7b3fa0", "#1b7f86", "#b3261e"];

/// A stacked bar chart as SVG: one bar per bucket, one colour per key, with a legend.
function drawBars(el, buckets, format) {
  el.replaceChildren();
  // One segment per key and bucket (a model's line items add up).
  buckets = buckets.map((b) => {
    const sums = new Map();
    for (const p of b.parts) sums.set(p.key, (sums.get(p.key) || 0) + p.value);
    return { label: b.label, parts: [...sums].map(([key, value]) => ({ key, value })) };
  });
  const keys = [...new Set(buckets.flatMap((b) => b.parts.map((p) => p.key)))];
  const totals = buckets.map((b) => b.parts.reduce((s, p) => s + p.value, 0));
  const max = Math.max(0, ...totals);
  if (!buckets.length || max <= 0) {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = "No usage in this period.";
    el.append(p);
    return;
  }
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  // Drawn at the element's own width, so the bars span it (a fixed viewBox would be
  // letterboxed in a wide page).
  const W = Math.max(300, el.clientWidth || 600), H = 160, top = 10, bottom = 20;
  svg.setAttribute("viewBox", `0 0 ${W} ${H + 20}`);
  const w = W / buckets.length;
  buckets.forEach((b, i) => {
    let y = H - bottom;
    for (const part of b.parts) {
      const h = (part.value / max) * (H - bottom - top);
      const rect = document.createElementNS(ns, "rect");
      rect.setAttribute("x", i * w + w * 0.15);
      rect.setAttribute("width", w * 0.7);
      rect.setAttribute("y", y - h);
      rect.setAttribute("height", h);
      rect.setAttribute("fill", COLORS[keys.indexOf(part.key) % COLORS.length]);
      const title = document.createElementNS(ns, "title");
      title.textContent = `${b.label} ${part.key}: ${format(part.value)}`;
      rect.append(title);
      svg.append(rect);
      y -= h;
    }
    if (buckets.length <= 31 && (i % Math.ceil(buckets.length / 8) === 0)) {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", i * w + w / 2);
      t.setAttribute("y", H);
      t.setAttribute("font-size", "10");
      t.setAttribute("text-anchor", "middle");
      t.textContent = b.label.slice(5);
      svg.append(t);
    }
  });
  const scale = document.createElementNS(ns, "text");
  scale.setAttribute("x", W - 4);
  scale.setAttribute("y", 12);
  scale.setAttribute("font-size", "11");
  scale.setAttribute("text-anchor", "end");
  scale.textContent = `highest day: ${format(max)}`;
  svg.append(scale);
  keys.forEach((k, i) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", 10 + i * 150);
    t.setAttribute("y", H + 16);
    t.setAttribute("font-size", "11");
    t.setAttribute("fill", COLORS[i % COLORS.length]);
    t.textContent = `■ ${k}`;
    svg.append(t);
  });
  el.setAttribute("aria-label", `${el.getAttribute("aria-label").split(":")[0]}: ` +
    buckets.map((b, i) => `${b.label} ${format(totals[i])}`).join(", "));
  el.append(svg);
}

// ---------------------------------------------------------------------------------------------
// Projects, service accounts (keys) and rate limits: the admin API

async function loadProjects() {
  show($("admin-error"), "");
  const projects = await listAll("/v1/organization/projects?include_archived=true");
  const body = $("projects-table").tBodies[0];
  body.replaceChildren();
  for (const p of projects) {
    const tr = body.insertRow();
    tr.insertCell().textContent = p.name;
    tr.insertCell().textContent = p.id;
    tr.insertCell().textContent = p.status;
    const actions = tr.insertCell();
    actions.append(button("Open", () => openProject(p)));
    if (p.status === "active") {
      actions.append(button("Archive", async () => {
        await api(`/v1/organization/projects/${p.id}/archive`, { method: "POST" });
        await loadProjects();
      }));
    }
  }
}

function button(text, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.addEventListener("click", () => onClick().catch((e) => show($("admin-error"), e.message)));
  return b;
}

async function openProject(p) {
  state.project = p;
  $("project-detail").hidden = false;
  $("new-key").hidden = true;
  show($("project-detail-title"), `${p.name} (${p.id})`);
  const keys = await listAll(`/v1/organization/projects/${p.id}/api_keys`);
  const kb = $("keys-table").tBodies[0];
  kb.replaceChildren();
  for (const k of keys) {
    const tr = kb.insertRow();
    tr.insertCell().textContent = k.name || (k.owner && k.owner.service_account ? k.owner.service_account.name : "");
    tr.insertCell().textContent = k.redacted_value;
    tr.insertCell().textContent = k.last_used_at ? new Date(k.last_used_at * 1000).toLocaleString() : "never";
    tr.insertCell().append(button("Revoke", async () => {
      await api(`/v1/organization/projects/${p.id}/api_keys/${k.id}`, { method: "DELETE" });
      await openProject(p);
    }));
  }
  const limits = await listAll(`/v1/organization/projects/${p.id}/rate_limits`);
  const lb = $("limits-table").tBodies[0];
  lb.replaceChildren();
  for (const l of limits) {
    const tr = lb.insertRow();
    tr.insertCell().textContent = l.model;
    const fields = ["max_requests_per_1_minute", "max_tokens_per_1_minute", "reserved_tokens_per_1_minute"];
    const inputs = fields.map((f) => {
      const input = document.createElement("input");
      input.type = "number";
      input.min = "0";
      input.value = l[f] ?? 0;
      input.setAttribute("aria-label", `${l.model} ${f.replaceAll("_", " ")}`);
      tr.insertCell().append(input);
      return [f, input];
    });
    tr.insertCell().append(button("Save", async () => {
      const body = Object.fromEntries(inputs.map(([f, i]) => [f, Number(i.value)]));
      await api(`/v1/organization/projects/${p.id}/rate_limits/${l.id}`, { method: "POST", body });
      await openProject(p);
    }));
  }
}

async function createProject(event) {
  event.preventDefault();
  show($("admin-error"), "");
  try {
    await api("/v1/organization/projects", { method: "POST", body: { name: $("project-name").value } });
    $("project-name").value = "";
    await loadProjects();
  } catch (e) {
    show($("admin-error"), e.message);
  }
}

async function createAccount(event) {
  event.preventDefault();
  show($("admin-error"), "");
  const p = state.project;
  try {
    const account = await api(`/v1/organization/projects/${p.id}/service_accounts`,
      { method: "POST", body: { name: $("account-name").value } });
    $("account-name").value = "";
    await openProject(p);
    const note = $("new-key");
    note.hidden = false;
    note.textContent = `New key for ${account.name} (shown once): ${account.api_key.value}`;
  } catch (e) {
    show($("admin-error"), e.message);
  }
}

// ---------------------------------------------------------------------------------------------

$("sign-in-form").addEventListener("submit", (event) => {
  event.preventDefault();
  show($("sign-in-error"), "");
  signIn($("key").value.trim()).catch((e) => show($("sign-in-error"), e.message));
});
$("sign-out").addEventListener("click", signOut);
for (const b of document.querySelectorAll("#tabs button")) {
  b.addEventListener("click", () => openTab(b.dataset.tab));
}
$("chat-form").addEventListener("submit", sendChat);
$("stop").addEventListener("click", () => running && running.abort());
$("usage-refresh").addEventListener("click", () => loadUsage().catch((e) => show($("usage-error"), e.message)));
$("project-form").addEventListener("submit", createProject);
$("account-form").addEventListener("submit", createAccount);
if (state.key || sessionStorage.getItem("ferrum.key") !== null) {
  signIn(state.key).catch(() => sessionStorage.removeItem("ferrum.key"));
}
