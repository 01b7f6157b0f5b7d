// The last hour's charts (uPlot, vendor/): per model, requests per minute (and errors), p50/p99 of the
// wait for the model and of the time to first byte; and the waiting requests over time.
// The router sends only the minutes that had requests: the others are filled in here, as 0 requests and
// as gaps (no wait measured), so that a quiet minute reads as quiet rather than as a line between two busy
// ones. Each chart's container says how many points it holds (data-points), and `historyCharts` keeps the
// uPlot instances (chart.data is what is drawn).
"use strict";

const CHART_HEIGHT = 130;
const COLORS = { requests: "#2563eb", errors: "#dc2626", p50: "#16a34a", p99: "#d97706", queue: "#7c3aed" };

const historyCharts = { queue: null, models: new Map() };  // model -> {requests, wait, first_byte}

// a latency in the unit that suits it: a fake engine answers in microseconds, a cold start takes a minute
function seconds(v) {
  if (v === null || v === undefined) return "–";
  if (v === 0) return "0";
  if (v < 0.001) return `${+(v * 1e6).toPrecision(3)} µs`;
  if (v < 1) return `${+(v * 1000).toPrecision(3)} ms`;
  return `${+v.toPrecision(3)} s`;
}

// one x per bucket from the window's start to its end, aligned on the router's buckets (the first one
// may start before the window: it is the minute the window starts in); a bucket is drawn at its middle,
// so that its bar covers its minute
function bucketGrid(h, entries) {
  const step = h.bucket_seconds || 60;
  const anchor = entries.length ? entries[0].start : Math.floor(h.since / step) * step;
  const first = anchor - Math.max(0, Math.ceil((anchor - h.since) / step)) * step;
  const xs = [];
  for (let t = first; t <= h.now; t += step) xs.push(t + step / 2);
  return { xs, step, at: (start) => Math.round((start - first) / step) };
}

function modelSeries(h, entries) {
  const { xs, step, at } = bucketGrid(h, entries);
  const col = (fill) => xs.map(() => fill);
  const d = { xs, step, requests: col(0), errors: col(0), wait_p50: col(null), wait_p99: col(null),
              first_byte_p50: col(null), first_byte_p99: col(null) };
  for (const e of entries) {
    const i = at(e.start);
    if (i < 0 || i >= xs.length) continue;
    for (const k of ["requests", "errors", "wait_p50", "wait_p99", "first_byte_p50", "first_byte_p99"]) {
      if (e[k] !== undefined) d[k][i] = e[k];
    }
  }
  return d;
}

function chartWidth(box) { return Math.max(200, Math.floor(box.getBoundingClientRect().width)); }

const TIME_STEPS = [10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600];
const WHOLE = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];

// y from 0: a count or a latency (seconds); a count (`yValues` String) gets whole ticks
function chartOptions(box, title, series, yValues, xPad = 0) {
  const y = { size: yValues === String ? 44 : 64, space: 16, values: (u, ticks) => ticks.map(yValues) };
  if (yValues === String) y.incrs = WHOLE;
  return {
    title: title ?? undefined, width: chartWidth(box), height: CHART_HEIGHT,
    scales: { x: { time: true, range: (u, min, max) => [min - xPad, max + xPad] }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
    series: [{ value: (u, v) => (v === null || v === undefined ? "–" : clockSeconds(v)) }, ...series],
    axes: [{ space: 70, incrs: TIME_STEPS, values: (u, ticks, axis, space, incr) => ticks.map(clockOf(incr)) }, y],
    padding: [8, 36, 0, 0],  // room for the last time label
    legend: { live: true },
    cursor: { drag: { x: false, y: false } },
  };
}

const bars = () => uPlot.paths.bars({ size: [0.7, 24] });

function line(label, stroke, value) {
  return { label, stroke, width: 1.5, value: (u, v) => value(v), points: { show: true, size: 4 }, spanGaps: false };
}

// a chart in `box`: made once, then only its data changes (and its size, when the page's does)
function drawChart(box, existing, make, data, points) {
  box.dataset.points = String(points);
  if (existing) {
    const width = chartWidth(box);
    if (existing.width !== width) existing.setSize({ width, height: CHART_HEIGHT });
    existing.setData(data);
    return existing;
  }
  box.replaceChildren();
  return new uPlot(make(box), data, box);
}

function counted(values) { return values.filter((v) => v !== null && v !== undefined).length; }

function modelRow(model) {
  const row = el("div", { class: "model-charts", "data-model": model },
    el("div", { class: "model-charts-name", text: model }),
    el("div", { class: "chart", "data-chart": "requests" }),
    el("div", { class: "chart", "data-chart": "wait" }),
    el("div", { class: "chart", "data-chart": "first_byte" }));
  return row;
}

function renderModelCharts(h) {
  const box = $("#model-charts");
  const models = Object.keys(h.models || {}).filter((m) => (h.models[m] || []).length).sort();
  for (const [name, charts] of historyCharts.models) {  // a model gone from the window loses its charts
    if (models.includes(name)) continue;
    for (const c of Object.values(charts)) c.destroy();
    historyCharts.models.delete(name);
    box.querySelector(`.model-charts[data-model="${CSS.escape(name)}"]`)?.remove();
  }
  $("#charts-empty").hidden = models.length > 0;
  $("#charts-empty").textContent = "No requests in this window.";
  for (const model of models) {
    let row = box.querySelector(`.model-charts[data-model="${CSS.escape(model)}"]`);
    if (!row) {
      row = modelRow(model);
      const after = [...box.children].find((r) => r.dataset.model > model);
      box.insertBefore(row, after ?? null);
    }
    const entries = h.models[model];
    const d = modelSeries(h, entries);
    const old = historyCharts.models.get(model) || {};
    const part = (name) => row.querySelector(`[data-chart="${name}"]`);
    const charts = {
      requests: drawChart(part("requests"), old.requests, (b) => chartOptions(b, "requests / min", [
        { label: "requests", stroke: COLORS.requests, fill: COLORS.requests + "55", paths: bars(), points: { show: false } },
        { label: "errors", stroke: COLORS.errors, fill: COLORS.errors + "88", paths: bars(), points: { show: false } },
      ], String, d.step / 2), [d.xs, d.requests.map((n) => n || null), d.errors.map((n) => n || null)], entries.filter((e) => e.requests > 0).length),
      wait: drawChart(part("wait"), old.wait, (b) => chartOptions(b, "wait for the model", [
        line("p50", COLORS.p50, seconds), line("p99", COLORS.p99, seconds),
      ], seconds, d.step / 2), [d.xs, d.wait_p50, d.wait_p99], counted(d.wait_p99)),
      first_byte: drawChart(part("first_byte"), old.first_byte, (b) => chartOptions(b, "time to first byte", [
        line("p50", COLORS.p50, seconds), line("p99", COLORS.p99, seconds),
      ], seconds, d.step / 2), [d.xs, d.first_byte_p50, d.first_byte_p99], counted(d.first_byte_p99)),
    };
    historyCharts.models.set(model, charts);
  }
}

// the queue is a step: a sample holds until the next one, and the last one until now
function renderQueueChart(h) {
  const box = $("#queue-chart");
  const samples = h.queue || [];
  $("#queue-empty").hidden = samples.length > 0;
  box.hidden = samples.length === 0;
  if (!samples.length) return;
  const xs = samples.map((s) => s[0]);
  const ys = samples.map((s) => s[1]);
  if (xs[xs.length - 1] < h.now) { xs.push(h.now); ys.push(ys[ys.length - 1]); }
  if (xs[0] > h.since) { xs.unshift(h.since); ys.unshift(null); }
  historyCharts.queue = drawChart(box, historyCharts.queue, (b) => chartOptions(b, null, [
    { label: "waiting", stroke: COLORS.queue, fill: COLORS.queue + "33", width: 1.5,
      paths: uPlot.paths.stepped({ align: 1 }), points: { show: false } },
  ], String), [xs, ys], samples.length);
}

function renderHistoryCharts(h) {
  if (typeof uPlot === "undefined") return;  // the library did not load: the timeline still works
  renderQueueChart(h);
  renderModelCharts(h);
}
