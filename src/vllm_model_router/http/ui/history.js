// The last hour on the dashboard: GET /admin/history (every 10 s, and soon after a lifecycle event)
// drawn as a residency timeline, one lane per unit (a replica is its own lane: chat, chat@1), and handed to
// charts.js for the per-model and queue charts.
// The timeline is plain DOM, not a chart: a lane is a row of absolutely placed spans (one per state) and
// marks (a swap, a failure, a load...), positioned in % of the window, so that tests and assistive
// tools can read it. Hovering or focusing a mark shows its event. Marks closer than a few pixels (a
// failed load and the request it rejects, an hour's window squeezing a swap into one spot) are one mark
// that lists all their events: its colour is the most serious one's, data-kinds and data-event-kinds
// name them all, so none hides under another.
// Times are the router's (its `now` and `since`), never the browser's clock.
"use strict";

const HISTORY_MINUTES = [60, 15, 5, 1];  // the windows offered; the router keeps 60 minutes
const MARK_MERGE_PX = 6;
const MARK_ORDER = ["failure", "swap", "node", "load", "sleep", "wake"];  // the first one colours a group
const HISTORY_POLL_MS = 10000;
const HISTORY_SOON_MS = 500;      // events come in bursts (a swap is several): one fetch after them

let lastHistory = null;           // the last /admin/history answer
let historyFetching = false;
let historyAgain = false;
let historySoonTimer = null;
let tipKey = null;                // what the tooltip shows (a redraw shows it again on the new element)

function clock(t) { return new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }); }

function clockOf(step) { return step < 60 ? (t) => new Date(t * 1000).toLocaleTimeString() : clock; }

function clockSeconds(t) { return new Date(t * 1000).toLocaleTimeString(); }

function duration(s) {
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

// ------------------------------------------------------------------ timeline
function pct(t, h) { return (100 * (t - h.since)) / Math.max(1e-9, h.now - h.since); }

// every unit with a lane, in the router's order; a mark's unit the router did not list gets one too, and
// node marks (no unit) a "nodes" lane of their own
function laneList(h) {
  const lanes = h.lanes.map((l) => ({ unit: l.unit, model: l.model, spans: l.spans, marks: [] }));
  const byUnit = new Map(lanes.map((l) => [l.unit, l]));
  let nodes = null;
  for (const m of h.marks) {
    if (m.unit === null || m.unit === undefined) {
      if (!nodes) nodes = { unit: "", model: "", label: "nodes", spans: [], marks: [] };
      nodes.marks.push(m);
      continue;
    }
    if (!byUnit.has(m.unit)) {
      const lane = { unit: m.unit, model: m.model ?? m.unit, spans: [], marks: [] };
      byUnit.set(m.unit, lane);
      lanes.push(lane);
    }
    byUnit.get(m.unit).marks.push(m);
  }
  lanes.sort((a, b) => a.unit.localeCompare(b.unit));
  return nodes ? [nodes, ...lanes] : lanes;
}

function spanText(s, h) {
  const end = s.end ?? h.now;
  return `${s.state}\n${clockSeconds(s.start)} – ${s.end === null || s.end === undefined ? "now" : clockSeconds(end)}` +
         ` (${duration(end - s.start)})`;
}

function markText(m) {
  const ev = m.event || {};
  const lines = [`${m.kind}: ${ev.kind ?? "?"}`, `${clockSeconds(m.time)} · ${m.unit ?? ev.model ?? "cluster"}`];
  if (ev.reason) {
    const reason = ev.reason.split("\n");
    lines.push(...reason.slice(0, 6), ...(reason.length > 6 ? ["…"] : []));
  }
  return lines.join("\n");
}

// marks (oldest first) in groups whose neighbours are less than MARK_MERGE_PX apart on a track this wide
function markGroups(marks, h, width) {
  const near = (MARK_MERGE_PX / Math.max(1, width)) * (h.now - h.since);
  const groups = [];
  for (const m of marks) {
    const last = groups[groups.length - 1];
    if (last && m.time - last[last.length - 1].time < near) last.push(m);
    else groups.push([m]);
  }
  return groups;
}

function markGroup(group, h) {
  const rank = (k) => { const i = MARK_ORDER.indexOf(k); return i < 0 ? MARK_ORDER.length : i; };
  const lead = group.reduce((a, b) => (rank(b.kind) < rank(a.kind) ? b : a));
  const text = group.map(markText).join("\n\n");
  const eventKind = (m) => (m.event || {}).kind ?? "";
  return hoverable(el("span", {
    class: "mark", tabindex: "0", role: "img", "aria-label": text.split("\n").join(", "),
    "data-kind": lead.kind, "data-event-kind": eventKind(lead), "data-unit": lead.unit ?? "",
    "data-kinds": group.map((m) => m.kind).join(" "), "data-event-kinds": group.map(eventKind).join(" "),
    "data-count": String(group.length), "data-time": String(lead.time),
    style: `left: ${Math.min(100, Math.max(0, pct(group[0].time, h)))}%`,
  }), text, `mark ${lead.unit ?? ""} ${group[0].time}`);
}

function showTip(target, text) {
  tipKey = target.dataset.tip;
  const tip = $("#timeline-tip");
  tip.textContent = text;
  tip.hidden = false;
  const box = $("#timeline").getBoundingClientRect();
  const at = target.getBoundingClientRect();
  const left = Math.min(Math.max(0, at.left - box.left), Math.max(0, box.width - tip.offsetWidth));
  tip.style.left = `${left}px`;
  tip.style.top = `${at.bottom - box.top + 4}px`;
}

function hideTip() { tipKey = null; $("#timeline-tip").hidden = true; }

function hoverable(node, text, key) {
  node.dataset.tip = key;
  node.tipText = text;
  node.addEventListener("mouseenter", () => showTip(node, text));
  node.addEventListener("mouseleave", hideTip);
  node.addEventListener("focus", () => showTip(node, text));
  node.addEventListener("blur", hideTip);
  return node;
}

function laneRow(lane, h, width) {
  const track = el("div", { class: "track" });
  for (const s of lane.spans) {
    const start = Math.max(s.start, h.since);
    const end = Math.min(s.end ?? h.now, h.now);
    if (end < start) continue;
    track.append(hoverable(el("div", {
      class: "span", "data-state": s.state, "data-start": String(s.start), "data-end": s.end == null ? "" : String(s.end),
      style: `left: ${pct(start, h)}%; width: ${Math.max(0, pct(end, h) - pct(start, h))}%`,
    }), spanText(s, h), `span ${lane.unit} ${s.start}`));
  }
  for (const group of markGroups(lane.marks, h, width)) track.append(markGroup(group, h));
  const label = lane.label ?? lane.unit;
  return el("div", { class: "lane", "data-unit": lane.unit, "data-model": lane.model ?? "" },
    el("span", { class: "lane-label", title: label, text: label }), track);
}

// ticks on round times, 4 to 8 of them whatever the window
function renderAxis(h) {
  const axis = $("#timeline-axis");
  const span = h.now - h.since;
  const step = [10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600].find((s) => span / s <= 8) ?? 3600;
  const label = clockOf(step);
  const ticks = [];
  for (let t = Math.ceil(h.since / step) * step; pct(t, h) <= 96; t += step) {  // none spilling out at the end
    ticks.push(el("span", { class: "tick", style: `left: ${pct(t, h)}%`, text: label(t) }));
  }
  axis.replaceChildren(el("span", { class: "lane-label" }), el("div", { class: "ticks" }, ...ticks));
}

function renderTimeline(h) {
  const lanes = laneList(h);
  renderAxis(h);
  const box = $("#lanes");
  const width = (box.clientWidth || 1000) - 118;  // less the lane's label (style.css: .lane)
  const key = tipKey;
  const focused = document.activeElement?.dataset?.tip;
  box.replaceChildren(...lanes.map((l) => laneRow(l, h, width)));
  const again = key === null ? null : box.querySelector(`[data-tip="${CSS.escape(key)}"]`);
  if (again && focused === key) again.focus();
  const empty = lanes.every((l) => l.spans.length === 0 && l.marks.length === 0);
  $("#timeline-empty").hidden = !empty;
  $("#timeline-empty").textContent = "No model was resident in this window.";
  if (again) showTip(again, again.tipText);
  else hideTip();
}

// ------------------------------------------------------------------ data
function setHistoryStatus(text) { $("#history-status").textContent = text; }

function renderHistory() {
  if (!lastHistory) return;
  renderTimeline(lastHistory);
  renderHistoryCharts(lastHistory);  // charts.js
  setHistoryStatus(`· ${clock(lastHistory.since)} – ${clock(lastHistory.now)}`);
}

async function refreshHistory() {
  if (historyFetching) { historyAgain = true; return; }
  historyFetching = true;
  try {
    const minutes = Number($("#history-minutes").value) || HISTORY_MINUTES[0];
    const resp = await fetch(`/admin/history?minutes=${minutes}`, { headers: headers(), cache: "no-store" });
    if (!resp.ok) {
      setHistoryStatus(`· unavailable (${await describeFailure(resp)})`);
      return;
    }
    lastHistory = await resp.json();
    renderHistory();
    Object.assign($("#history").dataset, { updated: String(lastHistory.now), minutes: String(lastHistory.minutes) });
  } catch (e) {
    setHistoryStatus("· unavailable (the router did not answer)");
  } finally {
    historyFetching = false;
    if (historyAgain) { historyAgain = false; refreshHistory(); }
  }
}

function refreshHistorySoon() {
  if (historySoonTimer !== null) return;
  historySoonTimer = setTimeout(() => { historySoonTimer = null; refreshHistory(); }, HISTORY_SOON_MS);
}

function initHistory() {
  document.addEventListener("lifecycle", refreshHistorySoon);
  $("#admin-key").addEventListener("change", refreshHistory);
  const minutes = $("#history-minutes");
  minutes.replaceChildren(...HISTORY_MINUTES.map((m) => el("option", { value: String(m), text: `last ${m} min` })));
  minutes.addEventListener("change", refreshHistory);
  // a redrawn mark under the pointer got no mouseenter, so it gets no mouseleave: moving off it hides the tip
  document.addEventListener("mousemove", (e) => {
    if (tipKey === null || document.activeElement?.dataset?.tip === tipKey) return;
    if (e.target.closest?.("[data-tip]")?.dataset.tip !== tipKey) hideTip();
  });
  window.addEventListener("resize", renderHistory);
  refreshHistory();
  setInterval(refreshHistory, HISTORY_POLL_MS);
}

document.addEventListener("DOMContentLoaded", initHistory);
