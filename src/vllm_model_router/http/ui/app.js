// Dashboard of the vLLM Model Router: plain JS, no build step.
// Live: an EventSource on /admin/events; every event re-fetches /admin/models. A slow poll covers a
// broken stream. Load/unload/pin/scale call the admin API with the admin key (if any) as a Bearer token.
// A replicated model is one row with a sub-row per replica (its own state, requests, pid and port).
// On a cluster (the answer has "nodes") a table shows each node: alive or lost, its GPUs, the memory the
// units placed there reserve out of what it offers, and those units; on one machine it stays hidden.
// An EventSource cannot send headers, so the event stream gets the key as ?key= (the router accepts a
// key in the URL on its two read-only admin streams only).
// The last hour (timeline, charts: history.js, charts.js) and a model's log (logs.js) are separate
// scripts; each lifecycle event is passed on to them as a "lifecycle" event on the document.
// The page runs under a strict Content-Security-Policy: no inline script or style attribute (styles
// are set through the CSSOM, which the policy allows).
"use strict";

const KEY_STORAGE = "vllm-model-router.admin-key";
const POLL_MS = 5000;
const MAX_EVENTS = 200;

const $ = (sel) => document.querySelector(sel);
let latest = null;           // the last /admin/models answer
let refreshTimer = null;
const busy = new Set();      // "model:action" in progress

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c);
  return node;
}

function adminKey() { return localStorage.getItem(KEY_STORAGE) || ""; }

function headers() {
  const h = { "Accept": "application/json" };
  const key = adminKey();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function showError(text) {
  $("#error-text").textContent = text;
  $("#error").hidden = false;
}

function clearError() { $("#error").hidden = true; }

async function describeFailure(resp) {
  let message = resp.statusText;
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  if (resp.status === 401 || resp.status === 403) {
    const what = resp.status === 401 ? "401 Unauthorized" : "403 Forbidden";
    return `${what}: ${message} — enter a valid admin key above.`;
  }
  return `${resp.status}: ${message}`;
}

function ago(unixSeconds) {
  if (unixSeconds === null || unixSeconds === undefined) return "never";
  const s = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (s < 5) return "just now";
  if (s < 60) return `${Math.floor(s)}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function gb(x) { return `${Number(x).toLocaleString(undefined, { maximumFractionDigits: 1 })} GB`; }

// ------------------------------------------------------------------ rendering
// each server the router runs: a model, or each replica of a replicated one (memory_gb is per copy)
function units(data) {
  return data.models.flatMap((m) => (m.replicas && m.replicas.length)
    ? m.replicas.map((r) => ({ ...r, memory_gb: m.memory_gb })) : [m]);
}

function renderCapacity(data) {
  const cap = data.capacity;
  const resident = units(data).filter((m) => m.resident);  // the router's own definition
  const memBar = $("#memory-bar");
  memBar.replaceChildren();
  const reserved = resident.reduce((sum, m) => sum + (m.memory_gb || 0), 0);
  if (cap.memory_gb) {
    for (const m of resident) {
      if (!m.memory_gb) continue;
      memBar.append(el("div", { class: "seg", "data-state": m.state, title: `${m.name}: ${gb(m.memory_gb)} (${m.state})`,
                                style: `width: ${Math.min(100, (100 * m.memory_gb) / cap.memory_gb)}%` }));
    }
    $("#memory-text").textContent = `${gb(reserved)} / ${gb(cap.memory_gb)}`;
  } else if ((data.nodes || []).length) {  // a cluster: no GPU is measured, each node has its budget
    $("#memory-text").textContent = `${gb(reserved)} (budgets per node below)`;
  } else if ((data.gpus || []).length) {
    $("#memory-text").textContent = `${gb(reserved)} (budgets per GPU below)`;
  } else {
    $("#memory-text").textContent = reserved ? `${gb(reserved)} (no budget)` : "no budget set";
  }
  const countBar = $("#count-bar");
  countBar.replaceChildren();
  for (const m of resident) {
    countBar.append(el("div", { class: "seg", "data-state": m.state, title: `${m.name} (${m.state})`,
                                style: `width: ${100 / Math.max(cap.max_resident, resident.length)}%` }));
  }
  $("#count-text").textContent = `${resident.length} / ${cap.max_resident} resident`;
  renderGpus(data);
}

// one bar per GPU (when the router measures GPUs): its models' reservations, others' use, free memory
function renderGpus(data) {
  const box = $("#gpus");
  box.replaceChildren();
  for (const g of data.gpus || []) {
    const bar = el("div", { class: "bar", role: "img", "aria-label": `GPU ${g.index} memory` });
    for (const m of units(data)) {
      if (!(m.gpus || []).includes(g.index) || !m.memory_gb) continue;  // gpus: where it holds memory now
      bar.append(el("div", { class: "seg", "data-state": m.state, title: `${m.name}: ${gb(m.memory_gb)} (${m.state})`,
                             style: `width: ${Math.min(100, (100 * m.memory_gb) / g.total_gb)}%` }));
    }
    if (g.used_by_others_gb > 0) {
      bar.append(el("div", { class: "seg others", title: `other processes: ${gb(g.used_by_others_gb)}`,
                             style: `width: ${Math.min(100, (100 * g.used_by_others_gb) / g.total_gb)}%` }));
    }
    const text = `${gb(g.reserved_gb)} / ${gb(g.budget_gb)} reserved · others ${gb(g.used_by_others_gb)} · free ${gb(g.free_gb)}`;
    box.append(el("div", { class: "bar-row gpu", "data-gpu": String(g.index) },
      el("span", { class: "bar-label", text: `GPU ${g.index}`, title: g.name }), bar,
      el("span", { class: "bar-text", text })));
  }
}

// Ray's own resources every node has; the others (accelerator_type:..., custom ones) say what a node offers
const RAY_BUILTIN = new Set(["CPU", "GPU", "memory", "object_store_memory"]);

function nodeRow(n) {
  const id = n.node.length > 12 ? n.node.slice(0, 12) + "…" : n.node;
  const idCell = el("td", { class: "node-id", title: n.node }, el("span", { class: "name", text: id }));
  const offers = (n.resources || []).filter((r) => !RAY_BUILTIN.has(r) && !r.startsWith("node:"));
  if (offers.length) idCell.append(el("div", { class: "resources muted", text: "offers " + offers.join(", ") }));
  const memory = el("div", { class: "memory-cell" });
  if (n.alive) {
    const bar = el("div", { class: "bar", role: "img", "aria-label": `node ${id} memory` });
    if (n.gpu_memory_gb > 0 && n.reserved_gb > 0) {
      bar.append(el("div", { class: "seg", "data-state": "loaded",
                             style: `width: ${Math.min(100, (100 * n.reserved_gb) / n.gpu_memory_gb)}%` }));
    }
    memory.append(bar, el("span", { class: "memory-text", text: `${gb(n.reserved_gb)} / ${gb(n.gpu_memory_gb)}` }));
  } else {
    memory.append(el("span", { class: "memory-text muted", text: "–" }));  // it offers nothing any more
  }
  const state = n.alive ? "alive" : "lost";
  return el("tr", { "data-node": n.node, "data-state": state },
    idCell,
    el("td", { class: "address", text: n.address || "–" }),
    el("td", {}, el("span", { class: "state node-state", "data-state": state, text: state })),
    el("td", { class: "gpus", title: "the router's GPU ids", text: n.gpus.join(", ") || "–" }),
    el("td", { class: "memory" }, memory),
    el("td", { class: "units", text: n.units.join(", ") || "–" }));
}

function renderNodes(data) {
  const nodes = data.nodes || [];
  $("#nodes-card").hidden = nodes.length === 0;
  $("#nodes tbody").replaceChildren(...nodes.map(nodeRow));
}

function actionButton(model, action, label, enabled, query = "") {
  const id = `${model}:${action}`;
  return el("button", {
    type: "button", class: "action", "data-action": action, disabled: !enabled || busy.has(id),
    onclick: () => act(model, action, query),
  }, label);
}

function stateCell(m) {
  const cell = el("td", {}, el("span", { class: "state", "data-state": m.state, text: m.state }));
  if (m.draining) cell.append(el("span", { class: "detail", text: "draining" }));
  if (m.last_error && m.state === "failed") {
    cell.append(el("span", { class: "detail", title: m.last_error, text: m.last_error.split("\n")[0] }));
  }
  return cell;
}

function lastUsedCell(ts) {
  return el("td", { class: "last-used", "data-ts": ts ?? "",
                    title: ts ? new Date(ts * 1000).toLocaleString() : "", text: ago(ts) });
}

// a replicated model: how many replicas are kept (the pinned ones), and − / + to keep one fewer or more
function scaleControl(m) {
  const cfg = m.replicas_config || { min: 0, max: m.replicas.length };
  const kept = m.replicas.filter((r) => r.pinned).length;
  const running = m.replicas.filter((r) => r.resident).length;
  const down = actionButton(m.name, "scale", "−", kept > cfg.min, `?replicas=${kept - 1}`);
  const up = actionButton(m.name, "scale", "+", kept < cfg.max, `?replicas=${kept + 1}`);
  down.dataset.scale = "down";
  down.title = `keep ${kept - 1} replicas`;
  up.dataset.scale = "up";
  up.title = `keep ${kept + 1} replicas`;
  return el("div", { class: "replicas-summary" },
    el("span", { class: "replica-count", text: `${running}/${cfg.max} replicas · keep ${kept}` }), down, up);
}

// one sub-row per replica: its own state, requests and server
function replicaRow(m, r, last) {
  const nameCell = el("td", { class: "replica-name" }, el("span", { class: "name", text: r.name }));
  if (r.pinned) nameCell.append(el("span", { class: "pin", title: "kept: never evicted", text: "kept" }));
  if (r.extra) nameCell.append(el("span", { class: "pin", title: "beyond the replicas kept: stopped when idle",
                                            text: "extra" }));
  const server = [r.pid != null ? `pid ${r.pid}` : null, r.port != null ? `port ${r.port}` : null,
                  (r.gpus || []).length ? `GPU ${r.gpus.join(",")}` : null].filter(Boolean).join(" · ");
  return el("tr", { class: last ? "replica last" : "replica", "data-replica": r.name, "data-model-of": m.name },
    nameCell,
    stateCell(r),
    el("td", { class: "num", text: r.resident && m.memory_gb ? gb(m.memory_gb) : "" }),
    el("td", { class: "num in-flight", text: String(r.in_flight) }),
    el("td", { class: "num waiting", text: "" }),
    lastUsedCell(r.last_used),
    el("td", { class: "actions server muted", text: server || "–" }));
}

function renderModels(data) {
  const rows = data.models.flatMap((m) => {
    const replicas = m.replicas || [];
    const canLoad = m.state === "unloaded" || m.state === "failed";
    const canUnload = m.state === "loaded" || m.state === "loading";
    const nameCell = el("td", {}, el("span", { class: "name", text: m.name }));
    if (m.pinned) nameCell.append(el("span", { class: "pin", title: "pinned: never evicted", text: "pinned" }));
    if (m.aliases && m.aliases.length) {
      const label = m.aliases.length === 1 ? "alias" : "aliases";
      nameCell.append(el("div", { class: "aliases", text: `${label}: ${m.aliases.join(", ")}` }));
    }
    if (replicas.length) nameCell.append(scaleControl(m));
    const row = el("tr", { "data-model": m.name, class: replicas.length ? "replicated" : null },
      nameCell,
      stateCell(m),
      el("td", { class: "num", text: m.memory_gb ? gb(m.memory_gb) + (replicas.length ? " each" : "") : "–" }),
      el("td", { class: "num in-flight", text: String(m.in_flight) }),
      el("td", { class: "num waiting", text: String(m.waiting) }),
      lastUsedCell(m.last_used),
      el("td", { class: "actions" },
        actionButton(m.name, "load", "Load", canLoad),
        actionButton(m.name, "unload", "Unload", canUnload),
        actionButton(m.name, m.pinned ? "unpin" : "pin", m.pinned ? "Unpin" : "Pin", true),
        el("button", { type: "button", class: "action", "data-action": "logs", title: `the last lines of ${m.name}'s output`,
                       onclick: () => openLogs(m.name) }, "Logs")),
    );
    return [row, ...replicas.map((r, i) => replicaRow(m, r, i === replicas.length - 1))];
  });
  $("#models tbody").replaceChildren(...rows);
}

function render() {
  if (!latest) return;
  renderCapacity(latest);
  renderNodes(latest);
  renderModels(latest);
}

function tickTimes() {
  for (const td of document.querySelectorAll("td.last-used")) {
    const ts = td.dataset.ts;
    td.textContent = ago(ts === "" ? null : Number(ts));
  }
}

// ------------------------------------------------------------------ data
async function refresh() {
  try {
    const resp = await fetch("/admin/models", { headers: headers(), cache: "no-store" });
    if (!resp.ok) {
      showError(await describeFailure(resp));
      return;
    }
    latest = await resp.json();
    render();
  } catch (e) {
    setLive("reconnecting", "router unreachable");
  }
}

function refreshSoon() {
  if (refreshTimer !== null) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 50);
}

async function act(model, action, query = "") {
  const id = `${model}:${action}`;
  busy.add(id);
  render();
  clearError();
  try {
    const resp = await fetch(`/admin/models/${encodeURIComponent(model)}/${action}${query}`,
                             { method: "POST", headers: headers() });
    if (!resp.ok) showError(`${action} ${model}: ${await describeFailure(resp)}`);
  } catch (e) {
    showError(`${action} ${model}: the router did not answer (${e})`);
  } finally {
    busy.delete(id);
    refresh();
  }
}

function addEvent(ev) {
  const list = $("#events");
  const time = new Date(ev.time * 1000);
  list.prepend(el("li", { "data-kind": ev.kind, "data-model": ev.model ?? "" },
    el("time", { datetime: time.toISOString(), title: time.toLocaleString(), text: time.toLocaleTimeString() }),
    el("span", { class: "kind", "data-kind": ev.kind, text: ev.kind }),
    el("span", { class: "model", text: ev.model ?? "–" }),
    el("span", { class: "reason", title: ev.reason, text: ev.reason.split("\n")[0] })));
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  $("#events-empty").hidden = true;
}

function setLive(status, text) {
  const live = $("#live");
  live.dataset.status = status;
  live.textContent = text;
}

let events = null;           // the EventSource
let eventsRetry = null;

function connectEvents() {
  if (events) events.close();
  if (eventsRetry !== null) { clearTimeout(eventsRetry); eventsRetry = null; }
  $("#events").replaceChildren();  // a new stream starts with the history again
  $("#events-empty").hidden = false;
  // named=false: every event arrives as a plain message (its kind is in the data), whatever its kind
  const key = adminKey();
  const source = new EventSource("/admin/events?history=50&named=false" +
                                 (key ? "&key=" + encodeURIComponent(key) : ""));
  events = source;
  const onEvent = (msg) => {  // on a reconnect the router sends only what came after Last-Event-ID
    try {
      const ev = JSON.parse(msg.data);
      addEvent(ev);
      document.dispatchEvent(new CustomEvent("lifecycle", { detail: ev }));
    } catch (_) { /* ignore malformed */ }
    refreshSoon();
  };
  source.onmessage = onEvent;
  source.onopen = () => { setLive("live", "live"); refreshSoon(); };
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      // refused (e.g. 401/403: no or a wrong admin key): the browser gives up, so try again later
      setLive("reconnecting", "no live updates (admin key?)");
      if (events === source) eventsRetry = setTimeout(connectEvents, POLL_MS);
    } else {
      setLive("reconnecting", "reconnecting…");
    }
  };
}

function init() {
  const keyInput = $("#admin-key");
  keyInput.value = adminKey();
  keyInput.addEventListener("change", () => {
    if (keyInput.value) localStorage.setItem(KEY_STORAGE, keyInput.value);
    else localStorage.removeItem(KEY_STORAGE);
    clearError();
    refresh();
    connectEvents();
  });
  $("#error-close").addEventListener("click", clearError);
  refresh();
  connectEvents();
  setInterval(refresh, POLL_MS);
  setInterval(tickTimes, 1000);
}

document.addEventListener("DOMContentLoaded", init);
