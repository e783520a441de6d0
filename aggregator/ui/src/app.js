// Vigil's dashboard: one small page app over the aggregator's Prometheus API
// (/api/v1/query, /api/v1/query_range: the server downsamples with its step), its own JSON
// (/api/vigil/v1/fleet, /events, /verdicts) and live updates (/api/vigil/v1/live, server-sent
// events read with fetch so the bearer token goes in a header, not in the URL).
//
// Views: / (fleet), /node/<node>, /server/<node>/<server or pid>, /alerts.
// window.__vigil exposes what the browser tests check: charts and their data, live updates
// received, API errors, and `ready` once the first load is done.
"use strict";

const V = (window.__vigil = {
  ready: false,
  charts: {},
  liveUpdates: 0,
  apiErrors: [],
  view: null,
});

// ---------------------------------------------------------------- token and API

const TOKEN_KEY = "vigil-token";

function takeTokenFromFragment() {
  const match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (match) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
    // Out of the address bar (and so out of screenshots and shared links).
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: "Bearer " + token } : {};
}

class Unauthorized extends Error {}

function apiUrl(path, params) {
  const url = new URL(path, location.origin);
  for (const [name, value] of Object.entries(params || {})) {
    if (Array.isArray(value)) value.forEach((v) => url.searchParams.append(name, v));
    else if (value !== undefined && value !== null) url.searchParams.set(name, value);
  }
  return url;
}

async function api(path, params) {
  const response = await fetch(apiUrl(path, params), { headers: authHeaders() });
  if (response.status === 401) throw new Unauthorized(await response.text());
  const body = await response.json();
  if (body.status !== "success") {
    throw new Error(`${path}: ${body.error || response.statusText}`);
  }
  return body.data;
}

function reportApiError(what, error) {
  if (error instanceof Unauthorized) {
    showTokenForm();
    return;
  }
  const message = `${what}: ${error.message}`;
  V.apiErrors.push(message);
  const banner = document.getElementById("banner");
  banner.hidden = false;
  banner.textContent = message;
}

function showTokenForm() {
  const app = document.getElementById("app");
  app.innerHTML = "";
  const form = el("form", { class: "token-form" }, [
    el("h1", {}, "A reader token is needed"),
    el("p", { class: "muted" }, "This aggregator has a tokens file: paste a token of role reader or admin. It is kept in this tab only."),
    el("input", { type: "password", name: "token", autocomplete: "off" }),
    el("button", { type: "submit" }, "Use token"),
  ]);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, form.elements.token.value.trim());
    location.reload();
  });
  app.append(form);
}

// ---------------------------------------------------------------- small helpers

function el(tag, attrs, children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of [].concat(children === undefined ? [] : children)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function link(href, text) {
  return el("a", { href }, text);
}

function selector(name, labels) {
  const parts = Object.entries(labels).map(([k, v]) => `${k}=${JSON.stringify(String(v))}`);
  return `${name}{${parts.join(",")}}`;
}

const fmt = {
  ratio: (v) => (v === null || v === undefined ? "-" : (v * 100).toFixed(0) + "%"),
  bytes: (v) => {
    if (v === null || v === undefined) return "-";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return v.toFixed(v >= 100 || i === 0 ? 0 : 1) + " " + units[i];
  },
  num: (v, digits) => (v === null || v === undefined ? "-" : Number(v).toFixed(digits === undefined ? 2 : digits)),
  celsius: (v) => (v === null || v === undefined ? "-" : v.toFixed(0) + " °C"),
  watts: (v) => (v === null || v === undefined ? "-" : v.toFixed(0) + " W"),
  hertz: (v) => (v === null || v === undefined ? "-" : (v / 1e6).toFixed(0) + " MHz"),
  seconds: (v) => {
    if (v === null || v === undefined || !isFinite(v)) return "-";
    if (v < 1e-6) return (v * 1e9).toFixed(0) + " ns";
    if (v < 1e-3) return (v * 1e6).toFixed(1) + " µs";
    if (v < 1) return (v * 1e3).toFixed(1) + " ms";
    return v.toFixed(2) + " s";
  },
  ago: (ms) => {
    if (!ms) return "-";
    const s = Math.max(0, (Date.now() - ms) / 1000);
    if (s < 90) return s.toFixed(0) + " s ago";
    if (s < 5400) return (s / 60).toFixed(0) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  },
  time: (ms) => new Date(ms).toLocaleString(),
};

// ---------------------------------------------------------------- time range

const state = {
  range: 900,
  live: true,
};

function readControls() {
  const params = new URLSearchParams(location.search);
  const range = Number(params.get("range"));
  if (range > 0) state.range = range;
  state.live = params.get("live") !== "0";
  const select = document.getElementById("range");
  if (![...select.options].some((o) => Number(o.value) === state.range)) {
    select.append(el("option", { value: state.range }, `${state.range} s`));
  }
  select.value = String(state.range);
  document.getElementById("live").checked = state.live;
  const persist = () => {
    const next = new URLSearchParams(location.search);
    next.set("range", String(state.range));
    if (state.live) next.delete("live");
    else next.set("live", "0");
    history.replaceState(null, "", location.pathname + "?" + next.toString());
  };
  select.addEventListener("change", () => {
    state.range = Number(select.value);
    persist();
    reloadAll();
  });
  document.getElementById("live").addEventListener("change", (event) => {
    state.live = event.target.checked;
    persist();
    if (state.live) live.start();
    else live.stop();
  });
  // Links between views keep the range.
  document.addEventListener("click", (event) => {
    const a = event.target.closest && event.target.closest("a[href^='/']");
    if (!a || a.dataset.keepRange === "no") return;
    const url = new URL(a.href);
    if (!url.searchParams.has("range")) url.searchParams.set("range", String(state.range));
    if (!state.live) url.searchParams.set("live", "0");
    a.href = url.pathname + url.search;
  });
}

/// Step so that a chart has at most ~600 points: the server evaluates at each step, so
/// 24 h of 1 s data comes back as 600 points per series.
function window_() {
  const end = Date.now() / 1000;
  const start = end - state.range;
  const step = Math.max(1, Math.ceil(state.range / 600));
  return { start, end, step };
}

/// A rate window that covers at least a few samples and the step.
function rateWindow() {
  const { step } = window_();
  return `${Math.max(10, 2 * step)}s`;
}

// ---------------------------------------------------------------- charts

const PALETTE = ["#5ab0ff", "#3fb950", "#d29922", "#f85149", "#bc8cff", "#39c5cf", "#ff9bce", "#e3b341", "#8b949e", "#79c0ff"];

const charts = [];

/// A time-series chart of one or more PromQL expressions. `spec`:
///   id, title, unit (fmt key), queries: [{expr: () => string, legend: labels => string}],
///   append: {name, labels} when the chart is a plain gauge selector (live points are appended
///   as they arrive); otherwise `metrics` (names whose live updates make it refetch).
class Chart {
  constructor(parent, spec) {
    this.spec = spec;
    this.panel = el("div", { class: "panel", "data-chart": spec.id }, [el("h3", {}, spec.title)]);
    this.body = el("div", { class: "chart-body" });
    this.panel.append(this.body);
    parent.append(this.panel);
    this.series = new Map(); // legend -> Map(time_s -> value)
    this.plot = null;
    this.dirty = false;
    charts.push(this);
  }

  async load() {
    const { start, end, step } = window_();
    const series = new Map();
    try {
      for (const query of this.spec.queries) {
        const data = await api("/api/v1/query_range", { query: query.expr(), start, end, step });
        for (const result of data.result) {
          const name = query.legend(result.metric);
          const points = series.get(name) || new Map();
          for (const [t, v] of result.values || []) points.set(Number(t), Number(v));
          series.set(name, points);
        }
      }
    } catch (error) {
      reportApiError(this.spec.title, error);
      return;
    }
    this.series = series;
    this.render();
  }

  /// Live points of a plain selector's series.
  append(labels, points) {
    const name = this.spec.queries[0].legend(labels);
    const series = this.series.get(name) || new Map();
    for (const [timeMs, value] of points) {
      if (typeof value === "number") series.set(timeMs / 1000, value);
    }
    this.series.set(name, series);
    const { start } = window_();
    for (const points of this.series.values()) {
      for (const t of points.keys()) if (t < start) points.delete(t);
    }
    this.render();
  }

  data() {
    const times = new Set();
    for (const points of this.series.values()) for (const t of points.keys()) times.add(t);
    const xs = [...times].sort((a, b) => a - b);
    const names = [...this.series.keys()].sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
    const columns = names.map((name) => {
      const points = this.series.get(name);
      return xs.map((t) => (points.has(t) ? points.get(t) : null));
    });
    return { xs, names, columns };
  }

  render() {
    const { xs, names, columns } = this.data();
    const record = {
      title: this.spec.title,
      series: names.map((name, i) => ({
        name,
        points: columns[i].filter((v) => v !== null).length,
        last: [...columns[i]].reverse().find((v) => v !== null),
      })),
      lastTime: xs.length ? xs[xs.length - 1] : null,
    };
    V.charts[this.spec.id] = record;
    if (!xs.length) {
      if (this.plot) { this.plot.destroy(); this.plot = null; }
      this.body.innerHTML = "";
      this.body.append(el("div", { class: "empty" }, this.spec.empty || "no data in this range"));
      return;
    }
    const key = names.join("\u0000");
    if (this.plot && this.plotKey === key) {
      this.plot.setData([xs, ...columns]);
      return;
    }
    if (this.plot) this.plot.destroy();
    this.body.innerHTML = "";
    const format = fmt[this.spec.unit] || ((v) => fmt.num(v));
    const opts = {
      width: Math.max(300, this.body.clientWidth || this.panel.clientWidth - 20),
      height: 180,
      cursor: { drag: { x: false, y: false } },
      // From zero (unless a chart fixes its range), so that a flat line reads as flat rather
      // than as noise stretched over the whole height.
      scales: {
        x: { time: true },
        y: { range: this.spec.yRange || ((u, min, max) => [Math.min(0, min), max > 0 ? max * 1.1 : 1]) },
      },
      axes: [
        { stroke: "#8593a3", grid: { stroke: "#2a3542" }, ticks: { stroke: "#2a3542" } },
        {
          stroke: "#8593a3",
          grid: { stroke: "#2a3542" },
          ticks: { stroke: "#2a3542" },
          size: 84,
          values: (u, values) => values.map((v) => format(v)),
        },
      ],
      series: [
        {},
        ...names.map((name, i) => ({
          label: name,
          stroke: PALETTE[i % PALETTE.length],
          width: 1.5,
          spanGaps: false,
          value: (u, v) => (v === null ? "-" : format(v)),
        })),
      ],
    };
    this.plot = new uPlot(opts, [xs, ...columns], this.body);
    this.plotKey = key;
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: Math.max(300, this.body.clientWidth), height: 180 });
  }
}

window.addEventListener("resize", () => charts.forEach((c) => c.resize()));

/// A syscall latency heatmap: time on x, log2 latency rows on y (the agent's log-linear
/// buckets, merged per power of two), colour = calls per second. Drawn by uPlot (axes, scales,
/// cursor) with the cells painted in its draw hook.
class Heatmap {
  constructor(parent, spec) {
    this.spec = spec;
    this.panel = el("div", { class: "panel wide", "data-chart": spec.id }, [el("h3", {}, spec.title)]);
    this.body = el("div");
    this.legend = el("div", { class: "heatmap-legend" });
    this.panel.append(this.body, this.legend);
    parent.append(this.panel);
    this.plot = null;
    charts.push(this);
  }

  async load() {
    const { start, end, step } = window_();
    let data;
    try {
      data = await api("/api/v1/query_range", { query: this.spec.expr(), start, end, step });
    } catch (error) {
      reportApiError(this.spec.title, error);
      return;
    }
    // The native histogram's buckets (per-second rates of its log-linear buckets, Prometheus's
    // [boundary rule, lower, upper, count] shape) -> calls/s per power-of-two row: row r holds
    // latencies in (2^(r-1), 2^r] ns. Native rather than the classic `_bucket` series: one
    // series per step instead of one per bucket, which keeps 24 h ranges within the query
    // limits (and ~4x faster at 1 h).
    const byTime = new Map();
    for (const result of data.result) {
      for (const [t, histogram] of result.histograms || []) {
        const rows = byTime.get(Number(t)) || new Map();
        for (const [, , upper, count] of histogram.buckets || []) {
          const rate = Number(count);
          const bound = Number(upper);
          if (!(rate > 0) || !isFinite(bound) || bound <= 0) continue;
          const row = Math.ceil(Math.log2(bound * 1e9) - 1e-9);
          rows.set(row, (rows.get(row) || 0) + rate);
        }
        byTime.set(Number(t), rows);
      }
    }
    const xs = [...byTime.keys()].sort((a, b) => a - b);
    const cells = []; // [timeIndex, row, rate]
    let minRow = Infinity;
    let maxRow = -Infinity;
    let maxRate = 0;
    xs.forEach((t, i) => {
      for (const [row, rate] of byTime.get(t)) {
        cells.push([i, row, rate]);
        minRow = Math.min(minRow, row);
        maxRow = Math.max(maxRow, row);
        maxRate = Math.max(maxRate, rate);
      }
    });
    V.charts[this.spec.id] = {
      title: this.spec.title,
      cells: cells.length,
      series: [{ name: "heatmap", points: cells.length }],
      lastTime: xs.length ? xs[xs.length - 1] : null,
      rows: cells.length ? [minRow, maxRow] : null,
    };
    if (this.plot) { this.plot.destroy(); this.plot = null; }
    this.body.innerHTML = "";
    if (!cells.length) {
      this.body.append(el("div", { class: "empty" }, this.spec.empty || "no syscall latency data in this range"));
      this.legend.textContent = "";
      return;
    }
    const stepS = xs.length > 1 ? xs[1] - xs[0] : window_().step;
    const color = (rate) => {
      const x = Math.log1p(rate) / Math.log1p(maxRate);
      const hue = 220 - 180 * x;
      return `hsl(${hue}, 85%, ${25 + 35 * x}%)`;
    };
    const opts = {
      width: Math.max(300, this.body.clientWidth || this.panel.clientWidth - 20),
      height: 240,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { auto: false, range: [minRow - 1, maxRow] } },
      axes: [
        { stroke: "#8593a3", grid: { stroke: "#2a3542" } },
        {
          stroke: "#8593a3",
          grid: { show: false },
          size: 84,
          splits: () => {
            const out = [];
            for (let r = minRow - 1; r <= maxRow; r += Math.max(1, Math.round((maxRow - minRow) / 8))) out.push(r);
            return out;
          },
          values: (u, values) => values.map((r) => fmt.seconds(Math.pow(2, r) / 1e9)),
        },
      ],
      series: [{}, { label: "calls/s", stroke: "transparent", points: { show: false } }],
      hooks: {
        draw: [
          (u) => {
            const ctx = u.ctx;
            ctx.save();
            for (const [i, row, rate] of cells) {
              const x0 = u.valToPos(xs[i] - stepS, "x", true);
              const x1 = u.valToPos(xs[i], "x", true);
              const y0 = u.valToPos(row, "y", true);
              const y1 = u.valToPos(row - 1, "y", true);
              ctx.fillStyle = color(rate);
              ctx.fillRect(x0, y0, Math.max(1, x1 - x0), Math.max(1, y1 - y0));
            }
            ctx.restore();
          },
        ],
      },
    };
    this.plot = new uPlot(opts, [xs, xs.map(() => null)], this.body);
    this.legend.textContent = `colour: calls per second per latency band (darkest blue = few, yellow = ${maxRate.toFixed(1)}/s); rows are powers of two of the syscall latency`;
  }

  resize() {
    if (this.plot) this.plot.setSize({ width: Math.max(300, this.body.clientWidth), height: 240 });
  }
}

async function reloadAll() {
  await Promise.all(charts.map((chart) => chart.load()));
  if (V.view && V.view.refresh) await V.view.refresh();
}

// ---------------------------------------------------------------- live updates

const live = {
  controller: null,
  lastRefresh: 0,
  start() {
    this.stop();
    const selectors = [];
    for (const chart of charts) {
      if (chart.spec.append) selectors.push(selector(chart.spec.append.name, chart.spec.append.labels));
    }
    // What tells the other views that a pass arrived: the agents' own series, one per pass.
    selectors.push("vigil_agent_spool_bytes");
    const controller = new AbortController();
    this.controller = controller;
    const status = document.getElementById("live-state");
    const url = apiUrl("/api/vigil/v1/live", { "match[]": selectors, events: "1" });
    (async () => {
      while (!controller.signal.aborted) {
        try {
          const response = await fetch(url, { headers: authHeaders(), signal: controller.signal });
          if (!response.ok) throw new Error(`live updates: ${response.status} ${await response.text()}`);
          status.textContent = "streaming";
          const reader = response.body.getReader();
          const decoder = new TextDecoder();
          let buffer = "";
          for (;;) {
            const { value, done } = await reader.read();
            if (done) break;
            buffer += decoder.decode(value, { stream: true });
            let end;
            while ((end = buffer.indexOf("\n\n")) >= 0) {
              const block = buffer.slice(0, end);
              buffer = buffer.slice(end + 2);
              this.onEvent(block);
            }
          }
        } catch (error) {
          if (controller.signal.aborted) return;
          console.warn("live updates interrupted, retrying", error);
        }
        status.textContent = "reconnecting";
        await new Promise((resolve) => setTimeout(resolve, 2000));
      }
    })();
  },
  stop() {
    if (this.controller) this.controller.abort();
    this.controller = null;
    document.getElementById("live-state").textContent = "";
  },
  onEvent(block) {
    let kind = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("event:")) kind = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
    }
    if (kind === "lagged") {
      reloadAll();
      return;
    }
    if (kind !== "update") return;
    const update = JSON.parse(data.join("\n"));
    V.liveUpdates++;
    for (const series of update.series) {
      for (const chart of charts) {
        const spec = chart.spec.append;
        if (!spec || series.labels.__name__ !== spec.name) continue;
        if (Object.entries(spec.labels).every(([k, v]) => series.labels[k] === String(v))) {
          chart.append(series.labels, series.points);
        }
      }
    }
    // Everything else (rates, histograms, tables) is refetched, at most every 5 s.
    const now = Date.now();
    if (now - this.lastRefresh >= 5000) {
      this.lastRefresh = now;
      for (const chart of charts) if (!chart.spec.append) chart.load();
      if (V.view && V.view.refresh) V.view.refresh();
    }
    if (V.view && V.view.onEvents && update.events.length) V.view.onEvents(update.events);
  },
};

// ---------------------------------------------------------------- tables

/// A sortable, filterable table. columns: [{title, value: row => sortable, render: row => node|string, num}]
function table(columns, rows, options) {
  const wrap = el("div", { class: "table-wrap" });
  const filter = options && options.filter ? el("input", { type: "text", class: "filter", placeholder: "filter..." }) : null;
  const tableEl = el("table", { "data-table": (options && options.id) || "" });
  let sortIndex = options && options.sort !== undefined ? options.sort : 0;
  let descending = !!(options && options.descending);
  const draw = () => {
    tableEl.innerHTML = "";
    const head = el("tr", {}, columns.map((c, i) => {
      const th = el("th", { class: i === sortIndex ? (descending ? "sorted-desc" : "sorted-asc") : null }, c.title);
      th.addEventListener("click", () => {
        if (sortIndex === i) descending = !descending;
        else { sortIndex = i; descending = false; }
        draw();
      });
      return th;
    }));
    tableEl.append(el("thead", {}, head));
    const needle = filter ? filter.value.trim().toLowerCase() : "";
    const shown = rows.filter((row) => !needle || columns.some((c) => String(c.value(row) ?? "").toLowerCase().includes(needle)));
    const key = columns[sortIndex].value;
    shown.sort((a, b) => {
      const x = key(a), y = key(b);
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x ?? "").localeCompare(String(y ?? ""), undefined, { numeric: true });
      return descending ? -order : order;
    });
    const body = el("tbody");
    for (const row of shown) {
      body.append(el("tr", {}, columns.map((c) => el("td", { class: c.num ? "num" : null }, c.render ? c.render(row) : String(c.value(row) ?? "-")))));
    }
    if (!shown.length) body.append(el("tr", {}, el("td", { colspan: columns.length, class: "muted" }, (options && options.empty) || "nothing")));
    tableEl.append(body);
  };
  if (filter) {
    filter.addEventListener("input", draw);
    wrap.append(filter);
  }
  wrap.append(tableEl);
  draw();
  return wrap;
}

function badge(kind, text) {
  return el("span", { class: `badge ${kind}` }, text || kind);
}

async function instant(expr) {
  const data = await api("/api/v1/query", { query: expr });
  return data.result.map((r) => ({ labels: r.metric, value: Number(r.value[1]) }));
}

function index(results, ...keys) {
  const map = new Map();
  for (const r of results) map.set(keys.map((k) => r.labels[k] ?? "").join("\u0000"), r.value);
  return (...values) => map.get(values.join("\u0000"));
}

function serverPath(node, server, pid) {
  return `/server/${encodeURIComponent(node)}/${encodeURIComponent(server || pid)}`;
}

function verdictBadge(verdict) {
  if (!verdict) return el("span", { class: "muted" }, "-");
  const b = badge(verdict.kind);
  b.title = verdict.summary;
  return b;
}

function gpuHealth(up, xids, remapPending) {
  if (up === 0) return "lost";
  if ((xids || 0) > 0 || (remapPending || 0) > 0) return "degraded";
  if (up === 1) return "ok";
  return "unknown";
}

function gpuNote(node) {
  const gpu = node && node.collectors && node.collectors.gpu;
  if (gpu && gpu.status && gpu.status !== "ok") {
    return `No GPU data from ${node.node}: the agent's gpu collector is ${gpu.status}: ${gpu.reason || "no reason given"}.`;
  }
  return `No GPU series from ${node ? node.node : "this node"}: it has no NVIDIA GPU (or driver), or the agent's gpu collector is disabled. Run the demo with --fake-gpu to see the GPU views with the stand-in driver.`;
}

// ---------------------------------------------------------------- views

async function fleetView(app) {
  app.append(el("h1", {}, "Fleet"));
  const nodesSection = el("section", { id: "nodes" });
  const gpusSection = el("section", { id: "gpus" });
  const serversSection = el("section", { id: "servers" });
  const alertsSection = el("section", { id: "firing" });
  app.append(
    el("h2", {}, "Nodes"), nodesSection,
    el("h2", {}, "GPUs"), gpusSection,
    el("h2", {}, "Model servers"), serversSection,
    el("h2", {}, "Firing alerts"), alertsSection,
  );
  const grid = el("div", { class: "grid" });
  app.append(el("h2", {}, "Fleet GPU utilization"), grid);
  new Chart(grid, {
    id: "fleet-gpu-utilization",
    title: "GPU utilization by node",
    unit: "ratio",
    yRange: [0, 1],
    queries: [{ expr: () => "avg by (node) (vigil_gpu_utilization_ratio)", legend: (l) => l.node }],
    metrics: ["vigil_gpu_utilization_ratio"],
    empty: "no GPU series in the fleet (nodes without GPUs, or gpu collectors unavailable: see Nodes)",
  });
  new Chart(grid, {
    id: "fleet-server-cpu",
    title: "Model-server CPU (cores)",
    unit: "num",
    queries: [{ expr: () => `sum by (node, server) (rate(vigil_process_cpu_seconds_total[${rateWindow()}]))`, legend: (l) => `${l.node}/${l.server}` }],
    metrics: ["vigil_process_cpu_seconds_total"],
  });

  const refresh = async () => {
    let fleet, utils, memUsed, memTotal, temps, ups, xids, remaps, spool, spoolBytes, cpu, rss, alerts;
    try {
      [fleet, utils, memUsed, memTotal, temps, ups, xids, remaps, spool, spoolBytes, cpu, rss, alerts] = await Promise.all([
        api("/api/vigil/v1/fleet"),
        instant("vigil_gpu_utilization_ratio"),
        instant("vigil_gpu_memory_used_bytes"),
        instant("vigil_gpu_memory_total_bytes"),
        instant("vigil_gpu_temperature_celsius"),
        instant("vigil_gpu_up"),
        instant("increase(vigil_gpu_xid_errors_total[1h])"),
        instant("vigil_gpu_row_remap_pending"),
        instant("vigil_agent_spool_unacked_batches"),
        instant("vigil_agent_spool_bytes"),
        instant("sum by (node, server, pid, comm) (rate(vigil_process_cpu_seconds_total[1m]))"),
        instant("sum by (node, server, pid, comm) (vigil_process_resident_memory_bytes)"),
        api("/api/v1/alerts"),
      ]);
    } catch (error) {
      reportApiError("fleet", error);
      return;
    }
    const firing = alerts.alerts.filter((a) => a.state === "firing");
    const util = index(utils, "node", "gpu");
    const used = index(memUsed, "node", "gpu");
    const total = index(memTotal, "node", "gpu");
    const temp = index(temps, "node", "gpu");
    const up = index(ups, "node", "gpu");
    const xid = index(xids, "node", "gpu");
    const remap = index(remaps, "node", "gpu");
    const backlog = index(spool, "node");
    const backlogBytes = index(spoolBytes, "node");
    const cpuOf = index(cpu, "node", "server", "pid");
    const rssOf = index(rss, "node", "server", "pid");
    const verdicts = new Map();
    for (const node of fleet.nodes) for (const v of node.verdicts) verdicts.set(`${v.node}\u0000${v.server}`, v);

    const nodeRows = fleet.nodes.filter((n) => n.node !== "vigil-aggregator" || n.agent);
    nodesSection.innerHTML = "";
    nodesSection.append(table([
      { title: "Node", value: (n) => n.node, render: (n) => link(`/node/${encodeURIComponent(n.node)}`, n.node) },
      { title: "Agent", value: (n) => (n.agent ? (n.agent.connected ? "connected" : "disconnected") : "unknown"), render: (n) => badge(n.agent ? (n.agent.connected ? "connected" : "disconnected") : "warn", n.agent ? (n.agent.connected ? "connected" : "disconnected") : "not since restart") },
      { title: "Version", value: (n) => (n.agent ? n.agent.version : "") },
      { title: "Last seen", value: (n) => (n.agent ? n.agent.last_seen_ms : 0), render: (n) => (n.agent ? fmt.ago(n.agent.last_seen_ms) : "-") },
      { title: "Spool backlog", num: true, value: (n) => backlog(n.node) ?? -1, render: (n) => (backlog(n.node) === undefined ? "-" : `${backlog(n.node)} batches, ${fmt.bytes(backlogBytes(n.node))}`) },
      { title: "GPUs", num: true, value: (n) => n.gpus.length, render: (n) => (n.gpus.length ? String(n.gpus.length) : el("span", { class: "muted", title: gpuNote(n) }, n.collectors.gpu ? `0 (gpu ${n.collectors.gpu.status})` : "0")) },
      { title: "Model servers", num: true, value: (n) => cpu.filter((c) => c.labels.node === n.node).length },
      { title: "Firing alerts", num: true, value: (n) => firing.filter((a) => a.labels.node === n.node).length },
    ], nodeRows, { id: "nodes", filter: true, empty: "no node has connected yet" }));

    const gpuRows = [];
    for (const n of fleet.nodes) {
      for (const g of n.gpus) gpuRows.push({ node: n.node, ...g });
    }
    gpusSection.innerHTML = "";
    if (!gpuRows.length) {
      gpusSection.append(el("div", { class: "note" }, fleet.nodes.length ? fleet.nodes.map(gpuNote).join(" ") : "No node has connected yet."));
    } else {
      gpusSection.append(table([
        { title: "Node", value: (g) => g.node, render: (g) => link(`/node/${encodeURIComponent(g.node)}`, g.node) },
        { title: "GPU", value: (g) => Number(g.gpu) },
        { title: "Model", value: (g) => g.model },
        { title: "Utilization", num: true, value: (g) => util(g.node, g.gpu) ?? -1, render: (g) => fmt.ratio(util(g.node, g.gpu)) },
        { title: "Memory", num: true, value: (g) => used(g.node, g.gpu) ?? -1, render: (g) => `${fmt.bytes(used(g.node, g.gpu))} / ${fmt.bytes(total(g.node, g.gpu))}` },
        { title: "Temperature", num: true, value: (g) => temp(g.node, g.gpu) ?? -1, render: (g) => fmt.celsius(temp(g.node, g.gpu)) },
        { title: "Health", value: (g) => gpuHealth(up(g.node, g.gpu), xid(g.node, g.gpu), remap(g.node, g.gpu)), render: (g) => { const h = gpuHealth(up(g.node, g.gpu), xid(g.node, g.gpu), remap(g.node, g.gpu)); return badge(h === "ok" ? "ok" : h === "lost" ? "bad" : "warn", h); } },
      ], gpuRows, { id: "gpus", filter: true }));
    }

    serversSection.innerHTML = "";
    serversSection.append(table([
      { title: "Node", value: (s) => s.labels.node, render: (s) => link(`/node/${encodeURIComponent(s.labels.node)}`, s.labels.node) },
      { title: "Server", value: (s) => s.labels.server, render: (s) => link(serverPath(s.labels.node, s.labels.server, s.labels.pid), s.labels.server || s.labels.pid) },
      { title: "PID", value: (s) => Number(s.labels.pid) },
      { title: "comm", value: (s) => s.labels.comm },
      { title: "CPU (cores)", num: true, value: (s) => cpuOf(s.labels.node, s.labels.server, s.labels.pid), render: (s) => fmt.num(cpuOf(s.labels.node, s.labels.server, s.labels.pid)) },
      { title: "RSS", num: true, value: (s) => rssOf(s.labels.node, s.labels.server, s.labels.pid) ?? -1, render: (s) => fmt.bytes(rssOf(s.labels.node, s.labels.server, s.labels.pid)) },
      { title: "Bottleneck", value: (s) => (verdicts.get(`${s.labels.node}\u0000${s.labels.server}`) || {}).kind, render: (s) => verdictBadge(verdicts.get(`${s.labels.node}\u0000${s.labels.server}`)) },
    ], cpu, { id: "servers", filter: true, empty: "no tracked model server is running" }));

    alertsSection.innerHTML = "";
    alertsSection.append(alertTable(firing, "firing"));
  };
  return { refresh };
}

function alertTable(alerts, id) {
  return table([
    { title: "Alert", value: (a) => a.labels.alertname },
    { title: "State", value: (a) => a.state, render: (a) => badge(a.state) },
    { title: "Node", value: (a) => a.labels.node || "", render: (a) => (a.labels.node ? link(`/node/${encodeURIComponent(a.labels.node)}`, a.labels.node) : "-") },
    { title: "Labels", value: (a) => Object.entries(a.labels).filter(([k]) => k !== "alertname" && k !== "node").map(([k, v]) => `${k}=${v}`).join(", "), render: (a) => {
      const text = Object.entries(a.labels).filter(([k]) => k !== "alertname" && k !== "node").map(([k, v]) => `${k}=${v}`).join(", ");
      return a.labels.node && a.labels.server ? link(serverPath(a.labels.node, a.labels.server), text) : text;
    } },
    { title: "Since", value: (a) => a.activeAt || "", render: (a) => (a.activeAt ? fmt.ago(Date.parse(a.activeAt)) : "-") },
    { title: "Value", num: true, value: (a) => Number(a.value) },
    { title: "Summary", value: (a) => (a.annotations && (a.annotations.summary || a.annotations.description)) || "" },
  ], alerts, { id, filter: true, empty: "no alert is " + id });
}

function eventTable(events, id) {
  return table([
    { title: "Time", value: (e) => e.time_ms, render: (e) => fmt.time(e.time_ms) },
    { title: "Kind", value: (e) => e.kind, render: (e) => badge(/xid|ecc|lost|exit|error/.test(e.kind) ? "bad" : "ok", e.kind) },
    { title: "Labels", value: (e) => Object.entries(e.labels).map(([k, v]) => `${k}=${v}`).join(", ") },
    { title: "Message", value: (e) => e.message },
  ], events, { id, sort: 0, descending: true, filter: true, empty: "no events in this range" });
}

async function nodeView(app, node) {
  app.append(el("h1", {}, ["Node ", el("span", { id: "node-name" }, node)]));
  const info = el("section", { id: "node-info" });
  app.append(info);
  const gpuGrid = el("div", { class: "grid", id: "gpu-charts" });
  const hostGrid = el("div", { class: "grid", id: "host-charts" });
  const servers = el("section", { id: "node-servers" });
  const events = el("section", { id: "node-events" });
  const gpuNoteEl = el("div", { id: "gpu-note" });
  app.append(el("h2", {}, "GPUs"), gpuNoteEl, gpuGrid, el("h2", {}, "Model servers"), servers, el("h2", {}, "Host"), hostGrid, el("h2", {}, "GPU events (XID, ECC) and other events"), events);
  const n = { node };
  const gpu = (l) => `GPU ${l.gpu}`;
  const gauge = (id, title, unit, name, legend, extra) => new Chart(gpuGrid, { id, title, unit, queries: [{ expr: () => selector(name, { ...n, ...(extra || {}) }), legend }], append: { name, labels: { ...n, ...(extra || {}) } }, ...(unit === "ratio" ? { yRange: [0, 1] } : {}) });
  gauge("gpu-utilization", "GPU utilization", "ratio", "vigil_gpu_utilization_ratio", gpu);
  gauge("gpu-memory", "GPU memory used", "bytes", "vigil_gpu_memory_used_bytes", gpu);
  gauge("gpu-power", "GPU power", "watts", "vigil_gpu_power_watts", gpu);
  gauge("gpu-temperature", "GPU temperature", "celsius", "vigil_gpu_temperature_celsius", gpu);
  gauge("gpu-clocks", "GPU SM clock", "hertz", "vigil_gpu_clock_hertz", gpu, { clock: "sm" });
  new Chart(gpuGrid, { id: "gpu-throttle", title: "GPU throttle reasons active", unit: "num", queries: [{ expr: () => `${selector("vigil_gpu_throttle_reason", n)} > 0`, legend: (l) => `GPU ${l.gpu} ${l.reason}` }], metrics: ["vigil_gpu_throttle_reason"], empty: "no throttle reason active in this range" });

  const rw = rateWindow;
  new Chart(hostGrid, { id: "host-cpu", title: "Host CPU (cores busy, by mode)", unit: "num", queries: [{ expr: () => `sum by (mode) (rate(vigil_host_cpu_seconds_total{node=${JSON.stringify(node)},mode!~"idle|iowait"}[${rw()}]))`, legend: (l) => l.mode }], metrics: ["vigil_host_cpu_seconds_total"] });
  new Chart(hostGrid, { id: "host-memory", title: "Host memory", unit: "bytes", queries: [
    { expr: () => selector("vigil_host_memory_used_bytes", n), legend: () => "used" },
    { expr: () => selector("vigil_host_memory_available_bytes", n), legend: () => "available" },
  ], metrics: ["vigil_host_memory_used_bytes"] });
  new Chart(hostGrid, { id: "host-psi", title: "Pressure stall (share of time, some)", unit: "ratio", queries: ["cpu", "memory", "io"].map((what) => ({ expr: () => `rate(${selector(`vigil_host_pressure_${what}_some_seconds_total`, n)}[${rw()}])`, legend: () => what })), metrics: ["vigil_host_pressure_cpu_some_seconds_total"] });
  new Chart(hostGrid, { id: "host-network", title: "Network (bytes/s)", unit: "bytes", queries: [
    { expr: () => `sum by (device) (rate(${selector("vigil_host_network_receive_bytes_total", n)}[${rw()}]))`, legend: (l) => `${l.device} rx` },
    { expr: () => `sum by (device) (rate(${selector("vigil_host_network_transmit_bytes_total", n)}[${rw()}]))`, legend: (l) => `${l.device} tx` },
  ], metrics: ["vigil_host_network_receive_bytes_total"] });
  new Chart(hostGrid, { id: "gpu-xid", title: "GPU XID and ECC errors (per interval)", unit: "num", queries: [
    { expr: () => `increase(${selector("vigil_gpu_xid_errors_total", n)}[${rw()}])`, legend: (l) => `GPU ${l.gpu} XID` },
    { expr: () => `sum by (gpu) (increase(${selector("vigil_gpu_ecc_errors_total", n)}[${rw()}]))`, legend: (l) => `GPU ${l.gpu} ECC` },
  ], metrics: ["vigil_gpu_xid_errors_total"], empty: "no GPU error counters (no GPU on this node)" });

  const refresh = async () => {
    let fleet, cpu, eventsList;
    const { start, end } = window_();
    try {
      [fleet, cpu, eventsList] = await Promise.all([
        api("/api/vigil/v1/fleet"),
        instant(`sum by (server, pid, comm) (rate(${selector("vigil_process_cpu_seconds_total", n)}[1m]))`),
        api("/api/vigil/v1/events", { node, start, end, limit: 500 }),
      ]);
    } catch (error) {
      reportApiError("node", error);
      return;
    }
    const me = fleet.nodes.find((x) => x.node === node);
    info.innerHTML = "";
    if (!me) {
      info.append(el("div", { class: "note" }, `No node named ${node} has sent anything.`));
    } else {
      const agent = me.agent;
      const collectors = Object.entries(me.collectors).map(([name, c]) => `${name}: ${c.status}${c.status !== "ok" && c.reason ? ` (${c.reason})` : ""}`).join("; ");
      info.append(el("dl", { class: "kv" }, [
        el("dt", {}, "Agent"), el("dd", {}, agent ? `${agent.version} (${agent.connected ? "connected" : "disconnected"}, last seen ${fmt.ago(agent.last_seen_ms)})` : "not heard from since the aggregator started"),
        el("dt", {}, "GPUs"), el("dd", {}, me.gpus.length ? me.gpus.map((g) => `${g.gpu}: ${g.model || "?"} ${g.uuid}`).join(", ") : "none"),
        el("dt", {}, "Collectors"), el("dd", {}, collectors || "no status reported"),
        el("dt", {}, "Series"), el("dd", {}, String(me.series)),
      ]));
    }
    gpuNoteEl.innerHTML = "";
    gpuGrid.hidden = !(me && me.gpus.length);
    const gpuStatus = me && me.collectors.gpu;
    if (!me || !me.gpus.length) {
      gpuNoteEl.append(el("div", { class: "note", id: "gpu-empty" }, gpuNote(me || { node, collectors: {} })));
    } else if (gpuStatus && gpuStatus.status !== "ok") {
      // GPUs known from earlier series, but the collector is not (fully) working now.
      gpuNoteEl.append(el("div", { class: "note", id: "gpu-status" }, `The agent's gpu collector is ${gpuStatus.status}: ${gpuStatus.reason || "no reason given"}`));
    }
    const verdicts = new Map((me ? me.verdicts : []).map((v) => [v.server, v]));
    servers.innerHTML = "";
    servers.append(table([
      { title: "Server", value: (s) => s.labels.server, render: (s) => link(serverPath(node, s.labels.server, s.labels.pid), s.labels.server || s.labels.pid) },
      { title: "PID", value: (s) => Number(s.labels.pid) },
      { title: "comm", value: (s) => s.labels.comm },
      { title: "CPU (cores)", num: true, value: (s) => s.value, render: (s) => fmt.num(s.value) },
      { title: "Bottleneck", value: (s) => (verdicts.get(s.labels.server) || {}).kind, render: (s) => verdictBadge(verdicts.get(s.labels.server)) },
    ], cpu, { id: "node-servers", empty: "no tracked model server on this node" }));
    events.innerHTML = "";
    events.append(eventTable(eventsList, "node-events"));
  };
  return { refresh };
}

async function serverView(app, node, server) {
  const byPid = /^\d+$/.test(server);
  const n = byPid ? { node, pid: server } : { node, server };
  app.append(el("h1", {}, ["Model server ", el("span", { id: "server-name" }, server), " on ", link(`/node/${encodeURIComponent(node)}`, node)]));
  const verdictEl = el("section", { id: "verdict" });
  app.append(el("h2", {}, "Bottleneck verdict"), verdictEl);
  const grid = el("div", { class: "grid", id: "server-charts" });
  app.append(el("h2", {}, "Process"), grid);
  const rw = rateWindow;
  const perPid = (l) => `pid ${l.pid}`;
  new Chart(grid, { id: "server-cpu", title: "CPU (cores, by mode)", unit: "num", queries: [{ expr: () => `sum by (mode) (rate(${selector("vigil_process_cpu_seconds_total", n)}[${rw()}]))`, legend: (l) => l.mode }], metrics: ["vigil_process_cpu_seconds_total"] });
  new Chart(grid, { id: "server-rss", title: "Resident memory", unit: "bytes", queries: [{ expr: () => selector("vigil_process_resident_memory_bytes", n), legend: perPid }], append: { name: "vigil_process_resident_memory_bytes", labels: n } });
  new Chart(grid, { id: "server-threads", title: "Threads", unit: "num", queries: [{ expr: () => selector("vigil_process_threads", n), legend: perPid }], append: { name: "vigil_process_threads", labels: n } });
  new Chart(grid, { id: "server-gpu-share", title: "GPU share (SM utilization of its kernels)", unit: "ratio", yRange: [0, 1], queries: [{ expr: () => selector("vigil_gpu_process_sm_utilization_ratio", n), legend: (l) => `GPU ${l.gpu}` }], append: { name: "vigil_gpu_process_sm_utilization_ratio", labels: n }, empty: "no GPU use by this server in this range" });
  new Chart(grid, { id: "server-gpu-memory", title: "GPU memory", unit: "bytes", queries: [{ expr: () => selector("vigil_gpu_process_memory_used_bytes", n), legend: (l) => `GPU ${l.gpu}` }], append: { name: "vigil_gpu_process_memory_used_bytes", labels: n }, empty: "no GPU memory held by this server in this range" });

  const sys = el("div", { class: "grid", id: "syscall-charts" });
  app.append(el("h2", {}, "Kernel: syscall latency"), sys);
  new Heatmap(sys, { id: "syscall-heatmap", title: "Syscall latency heatmap (all syscalls)", expr: () => `sum(rate(${selector("vigil_syscall_latency_seconds", n)}[${rw()}]))`, empty: "no syscall latency data (the syscalls collector needs root / CAP_BPF on the agent)" });
  new Chart(sys, { id: "syscall-p99", title: "p99 latency per syscall (top 6 by calls)", unit: "seconds", queries: [{ expr: () => `histogram_quantile(0.99, sum by (syscall) (rate(${selector("vigil_syscall_latency_seconds", n)}[${rw()}]))) and on (syscall) topk(6, sum by (syscall) (rate(${selector("vigil_syscalls_total", n)}[5m])))`, legend: (l) => l.syscall }], metrics: ["vigil_syscall_latency_seconds"] });
  const syscallTable = el("section", { id: "syscall-table" });
  app.append(el("h3", {}, "Per syscall, last minute"), syscallTable);
  const events = el("section", { id: "server-events" });
  app.append(el("h2", {}, "Events (restarts, GPU errors)"), events);

  const refresh = async () => {
    const { start, end } = window_();
    let verdicts, p50, p99, calls, time, eventList;
    const h = selector("vigil_syscall_latency_seconds", n);
    try {
      [verdicts, p50, p99, calls, time, eventList] = await Promise.all([
        api("/api/vigil/v1/verdicts"),
        instant(`histogram_quantile(0.5, sum by (syscall) (rate(${h}[1m])))`),
        instant(`histogram_quantile(0.99, sum by (syscall) (rate(${h}[1m])))`),
        instant(`sum by (syscall) (rate(${selector("vigil_syscalls_total", n)}[1m]))`),
        instant(`sum by (syscall) (rate(${selector("vigil_syscall_latency_seconds_sum", n)}[1m]))`),
        api("/api/vigil/v1/events", byPid ? { node, pid: server, start, end } : { node, server, start, end }),
      ]);
    } catch (error) {
      reportApiError("server", error);
      return;
    }
    // GPU errors of the node concern every server on it.
    let gpuEvents = [];
    try {
      gpuEvents = (await api("/api/vigil/v1/events", { node, start, end })).filter((e) => e.kind.startsWith("gpu_"));
    } catch (error) {
      reportApiError("events", error);
    }
    const verdict = verdicts.find((v) => v.node === node && (byPid ? false : v.server === server));
    verdictEl.innerHTML = "";
    if (!verdict) {
      verdictEl.append(el("div", { class: "note" }, byPid ? "Verdicts are per server name; open this server by its name." : "No verdict yet (computed every 5 s from the last minute of data)."));
    } else {
      const evidence = Object.entries(verdict.evidence).map(([k, v]) => {
        const f = /bytes/.test(k) ? fmt.bytes(v) : /ratio|psi|utilization/.test(k) ? fmt.ratio(v) : fmt.num(v);
        return [el("dt", {}, k.replace(/_/g, " ")), el("dd", {}, f)];
      }).flat();
      verdictEl.append(el("div", { class: "verdict", "data-kind": verdict.kind }, [
        badge(verdict.kind),
        el("div", { class: "summary" }, verdict.summary),
        el("dl", { class: "kv" }, evidence),
        verdict.syscalls.some((s) => s.seconds_per_second >= 0.001) ? el("div", { class: "muted" }, "blocking syscalls: " + verdict.syscalls.filter((s) => s.seconds_per_second >= 0.001).slice(0, 5).map((s) => `${s.syscall} ${s.seconds_per_second.toFixed(3)} s/s`).join(", ")) : null,
      ]));
    }
    const rows = calls.map((c) => c.labels.syscall);
    const p50Of = index(p50, "syscall"), p99Of = index(p99, "syscall"), callsOf = index(calls, "syscall"), timeOf = index(time, "syscall");
    syscallTable.innerHTML = "";
    syscallTable.append(table([
      { title: "Syscall", value: (s) => s },
      { title: "Calls/s", num: true, value: (s) => callsOf(s) ?? 0, render: (s) => fmt.num(callsOf(s), 1) },
      { title: "p50", num: true, value: (s) => p50Of(s) ?? -1, render: (s) => fmt.seconds(p50Of(s)) },
      { title: "p99", num: true, value: (s) => p99Of(s) ?? -1, render: (s) => fmt.seconds(p99Of(s)) },
      { title: "Time in it (s/s)", num: true, value: (s) => timeOf(s) ?? 0, render: (s) => fmt.num(timeOf(s), 3) },
    ], rows, { id: "syscalls", sort: 1, descending: true, empty: "no syscall data" }));
    const seen = new Set();
    const all = [...eventList, ...gpuEvents].filter((e) => {
      const key = `${e.time_ms}|${e.kind}|${e.message}`;
      if (seen.has(key)) return false;
      seen.add(key);
      return true;
    });
    events.innerHTML = "";
    events.append(eventTable(all, "server-events"));
  };
  return { refresh };
}

async function alertsView(app) {
  app.append(el("h1", {}, "Alerts"));
  const active = el("section", { id: "active-alerts" });
  const history = el("section", { id: "alert-history" });
  const rulesEl = el("section", { id: "alert-rules" });
  const grid = el("div", { class: "grid", id: "alert-chart" });
  app.append(el("h2", {}, "Firing and pending"), active, el("h2", {}, "History"), history, el("h2", {}, "Rules"), rulesEl, grid);
  let shown = null;
  const showSeries = (rule) => {
    grid.innerHTML = "";
    const index = charts.indexOf(shown);
    if (index >= 0) charts.splice(index, 1);
    shown = new Chart(grid, { id: "alert-expr", title: `${rule.name}: ${rule.query}`, unit: "num", queries: [{ expr: () => rule.query, legend: (l) => Object.entries(l).filter(([k]) => k !== "__name__").map(([k, v]) => `${k}=${v}`).join(",") || rule.name }], metrics: [] });
    shown.load();
    grid.scrollIntoView();
  };
  const refresh = async () => {
    const { start, end } = window_();
    let alerts, past, rules;
    try {
      [alerts, past, rules] = await Promise.all([
        api("/api/v1/alerts"),
        api("/api/v1/alerts/history", { start: Math.floor(Math.min(start, end - 86400)), end: Math.ceil(end) }),
        api("/api/v1/rules", { type: "alert" }),
      ]);
    } catch (error) {
      reportApiError("alerts", error);
      return;
    }
    active.innerHTML = "";
    active.append(alertTable(alerts.alerts, "active"));
    history.innerHTML = "";
    history.append(table([
      { title: "Alert", value: (r) => r.labels.alertname },
      { title: "Labels", value: (r) => Object.entries(r.labels).filter(([k]) => k !== "alertname").map(([k, v]) => `${k}=${v}`).join(", ") },
      { title: "Started", value: (r) => r.startsAt, render: (r) => fmt.time(Date.parse(r.startsAt)) },
      { title: "Ended", value: (r) => r.endsAt || "", render: (r) => (r.endsAt ? fmt.time(Date.parse(r.endsAt)) : badge("firing", "still firing")) },
      { title: "Duration", num: true, value: (r) => ((r.endsAt ? Date.parse(r.endsAt) : Date.now()) - Date.parse(r.startsAt)) / 1000, render: (r) => { const s = ((r.endsAt ? Date.parse(r.endsAt) : Date.now()) - Date.parse(r.startsAt)) / 1000; return s < 120 ? `${s.toFixed(0)} s` : s < 7200 ? `${(s / 60).toFixed(0)} min` : `${(s / 3600).toFixed(1)} h`; } },
      { title: "Peak", num: true, value: (r) => Number(r.peakValue) },
    ], past.alerts, { id: "history", sort: 2, descending: true, filter: true, empty: "no alert fired in the last day" }));
    const ruleRows = [];
    for (const group of rules.groups) for (const rule of group.rules) ruleRows.push({ group: group.name, ...rule });
    rulesEl.innerHTML = "";
    rulesEl.append(table([
      { title: "Group", value: (r) => r.group },
      { title: "Rule", value: (r) => r.name },
      { title: "State", value: (r) => r.state || "", render: (r) => badge(r.state || "inactive") },
      { title: "Expression (click for its series)", value: (r) => r.query, render: (r) => { const a = el("a", { href: "#", "data-keep-range": "no" }, r.query); a.addEventListener("click", (e) => { e.preventDefault(); showSeries(r); }); return a; } },
    ], ruleRows, { id: "rules", filter: true, empty: "no alert rules loaded (alerting.rule_files)" }));
  };
  return { refresh };
}

// ---------------------------------------------------------------- start

async function main() {
  takeTokenFromFragment();
  readControls();
  const app = document.getElementById("app");
  app.innerHTML = "";
  const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
  let view;
  let nav = "fleet";
  if (parts.length === 0) view = await fleetView(app);
  else if (parts[0] === "node" && parts.length === 2) view = await nodeView(app, parts[1]);
  else if (parts[0] === "server" && parts.length === 3) view = await serverView(app, parts[1], parts[2]);
  else if (parts[0] === "alerts") { nav = "alerts"; view = await alertsView(app); }
  else {
    app.append(el("h1", {}, "Not found"), el("p", {}, link("/", "Back to the fleet")));
    view = {};
  }
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === nav);
  V.view = view;
  await reloadAll();
  if (state.live) live.start();
  // Milliseconds from navigation to every chart and table loaded.
  V.loadedMs = Math.round(performance.now());
  V.ready = true;
}

main().catch((error) => console.error("dashboard failed to start:", error));
