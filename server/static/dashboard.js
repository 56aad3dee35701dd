// fedfleet live dashboard: server-sent snapshots from /v1/events drawn with uPlot (vendored).
// Each snapshot carries the server state and the round records the page has not seen yet.
"use strict";

const records = []; // round records (metrics.jsonl rows), ordered by round
const charts = {};
const ROUND_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]; // whole rounds on x

const CHARTS = {
  "chart-quality": {
    title: "Accuracy and loss per round",
    series: [
      { key: "accuracy", label: "accuracy", stroke: "#1b9e77", scale: "acc" },
      { key: "loss", label: "loss", stroke: "#d95f02", scale: "loss" },
    ],
    axes: [{ scale: "acc", label: "accuracy" }, { scale: "loss", label: "loss", side: 1, grid: { show: false } }],
    scales: { acc: { range: [0, 1] } },
  },
  "chart-bytes": {
    title: "Bytes per round",
    series: [
      { key: "bytes_up", label: "up", stroke: "#7570b3" },
      { key: "bytes_down", label: "down", stroke: "#e7298a", dash: [6, 4] },
      { key: "dense_bytes", label: "up, dense float32", stroke: "#999", dash: [2, 3], optional: true },
    ],
    axes: [{ label: "bytes", size: 70 }],
  },
  "chart-latency": {
    title: "Round latency (s)",
    series: [
      { key: "latency_p50_s", label: "p50", stroke: "#1f78b4" },
      { key: "latency_p95_s", label: "p95", stroke: "#e31a1c", dash: [6, 4] },
      { key: "latency_max_s", label: "max", stroke: "#999", dash: [2, 3], optional: true },
    ],
    axes: [{ label: "seconds" }],
  },
  "chart-privacy": {
    title: "Privacy: ε per round",
    series: [
      { key: "epsilon_max", label: "ε max", stroke: "#66a61e" },
      { key: "epsilon_median", label: "ε median", stroke: "#a6761d", dash: [6, 4], optional: true },
    ],
    axes: [{ label: "ε" }],
    requires: "epsilon_max",
    empty: "No privacy accounting in this run (the round records carry no epsilon_max).",
  },
};

function has(key) {
  return records.some((r) => typeof r[key] === "number");
}

function show(id, value, text) {
  const el = document.getElementById(id);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = value === null || value === undefined ? "–" : text;
}

function fixed(v, digits) {
  return typeof v === "number" ? v.toFixed(digits) : null;
}

function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return `${n.toFixed(i ? 2 : 0)} ${units[i]}`;
}

function updateTiles(s) {
  show("version", s.version, String(s.version));
  show("round", s.round, s.done ? "done" : String(s.round));
  show("phones-registered", s.phones_registered, String(s.phones_registered));
  show("phones-online", s.phones_online, String(s.phones_online));
  show("phones-training", s.phones_training, String(s.phones_training));
  show("updates-per-s", s.updates_per_s, fixed(s.updates_per_s, 2));
  show("accuracy", s.accuracy, fixed(s.accuracy, 4));
  show("loss", s.loss, fixed(s.loss, 4));
  show("bytes-up", s.bytes_up, bytes(s.bytes_up));
  show("bytes-down", s.bytes_down, bytes(s.bytes_down));
  show("latency", s.latency_p50_s, `${fixed(s.latency_p50_s, 2)} / ${fixed(s.latency_p95_s, 2)}`);
  show("epsilon-max", s.epsilon_max, fixed(s.epsilon_max, 3));
}

function chartSize(el) {
  return { width: Math.max(300, el.clientWidth - 12), height: 220 };
}

function drawChart(id, spec) {
  const el = document.getElementById(id);
  if (spec.requires && !has(spec.requires)) {
    if (!el.querySelector(".empty")) el.innerHTML = `<div class="empty">${spec.title}: ${spec.empty}</div>`;
    return;
  }
  const series = spec.series.filter((s) => !s.optional || has(s.key));
  const data = [records.map((r) => r.round), ...series.map((s) => records.map((r) => r[s.key] ?? null))];
  const chart = charts[id];
  if (chart && chart.series.length === series.length + 1) {
    chart.setData(data);
    return;
  }
  if (chart) chart.destroy();
  el.innerHTML = "";
  const opts = {
    title: spec.title,
    ...chartSize(el),
    scales: { x: { time: false }, ...(spec.scales || {}) },
    series: [{ label: "round" }, ...series.map((s) => {
      const out = { label: s.label, stroke: s.stroke, width: 2, points: { size: 5 } };
      if (s.dash) out.dash = s.dash; // uPlot fills in defaults only for keys that are absent
      if (s.scale) out.scale = s.scale;
      return out;
    })],
    axes: [{ label: "round", incrs: ROUND_STEPS }, ...spec.axes],
  };
  charts[id] = new uPlot(opts, data, el);
}

function apply(snapshot) {
  if (snapshot.since === 0) records.length = 0; // a full history replaces what we had
  for (const r of snapshot.records) {
    if (!records.length || r.round > records[records.length - 1].round) records.push(r);
  }
  updateTiles(snapshot);
  for (const [id, spec] of Object.entries(CHARTS)) drawChart(id, spec);
  document.body.dataset.rounds = String(records.length);
  document.body.dataset.snapshots = String(Number(document.body.dataset.snapshots || 0) + 1);
}

function connect() {
  const conn = document.getElementById("conn");
  const source = new EventSource("/v1/events");
  source.addEventListener("snapshot", (e) => apply(JSON.parse(e.data)));
  source.onopen = () => { conn.textContent = "live"; conn.className = "live"; };
  source.onerror = () => { conn.textContent = "reconnecting…"; conn.className = "down"; };
}

window.addEventListener("resize", () => {
  for (const [id, chart] of Object.entries(charts)) chart.setSize(chartSize(document.getElementById(id)));
});
connect();
