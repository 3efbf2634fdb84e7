// ganomalyd console: plain JavaScript, no libraries, nothing loaded from elsewhere.
// Each page calls one init function below; data comes from /api/* on this host.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...kids) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
};

async function api(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(path + ": " + r.status);
  return r.json();
}

const fmtTime = (ms) => ms ? new Date(ms).toLocaleString() : "";
const fmt = (v, d = 3) => (v === null || v === undefined) ? "–" : Number(v).toFixed(d);
const stateOf = (c) => !c.online ? "offline" : (c.alarm ? "alarm" : "ok");

function nav(here) {
  const h = $("header");
  h.innerHTML = "";
  h.append(el("b", {}, "ganomalyd"));
  for (const [href, name] of [["/", "Overview"], ["/history", "History"], ["/model", "Model"]]) {
    h.append(el("a", { href, class: here === name ? "here" : "" }, name));
  }
}

// A live view: long-polls the camera's latest JPEG (the server answers when a
// newer frame than `after` exists), so frames come at the console's live rate.
function livePoll(img, camera) {
  let after = 0, stopped = false;
  (async function loop() {
    while (!stopped) {
      try {
        const r = await fetch(`/api/live/${encodeURIComponent(camera)}/frame.jpg?after=${after}`, { cache: "no-store" });
        if (r.ok) {
          after = Number(r.headers.get("x-frame-n")) || after;
          const url = URL.createObjectURL(await r.blob());
          const old = img.src;
          img.src = url;
          img.dataset.frame = String(after);
          if (old.startsWith("blob:")) URL.revokeObjectURL(old);
        } else {
          await new Promise((ok) => setTimeout(ok, 1000));
        }
      } catch (e) {
        await new Promise((ok) => setTimeout(ok, 1000));
      }
    }
  })();
  return () => { stopped = true; };
}

// Sparkline of samples [ts, max, last, raw] against the alarm threshold.
function sparkline(svg, samples, threshold) {
  const W = 300, H = 46;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.innerHTML = "";
  const ns = "http://www.w3.org/2000/svg";
  const y = (v) => H - 2 - Math.max(0, Math.min(1, v)) * (H - 4);
  const t = document.createElementNS(ns, "line");
  Object.entries({ x1: 0, x2: W, y1: y(threshold), y2: y(threshold), stroke: "#f5a524", "stroke-dasharray": "4 3",
    "stroke-width": 1 }).forEach(([k, v]) => t.setAttribute(k, v));
  svg.append(t);
  if (samples.length < 2) return;
  const t0 = samples[0][0], t1 = samples[samples.length - 1][0], span = Math.max(1, t1 - t0);
  const pts = samples.map((s) => `${((s[0] - t0) / span * W).toFixed(1)},${y(s[1]).toFixed(1)}`).join(" ");
  const p = document.createElementNS(ns, "polyline");
  Object.entries({ points: pts, fill: "none", stroke: "#7cb7ff", "stroke-width": 1.5 }).forEach(([k, v]) => p.setAttribute(k, v));
  svg.append(p);
}

function canvasCtx(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 600, h = canvas.clientHeight || 220;
  if (canvas.width !== Math.round(w * dpr)) { canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr); }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

function hline(ctx, x0, x1, yv, color, dash) {
  ctx.strokeStyle = color; ctx.setLineDash(dash); ctx.beginPath(); ctx.moveTo(x0, yv); ctx.lineTo(x1, yv); ctx.stroke();
  ctx.setLineDash([]);
}

// Score chart: peak score per sample over time, with threshold and clear threshold.
function scoreChart(canvas, samples, thr, clear) {
  const { ctx, w, h } = canvasCtx(canvas);
  const L = 34, B = 18, T = 6;
  const y = (v) => T + (1 - Math.max(0, Math.min(1, v))) * (h - T - B);
  ctx.fillStyle = "#8a96a3"; ctx.font = "11px sans-serif";
  for (const v of [0, 0.25, 0.5, 0.75, 1]) { ctx.fillText(v.toFixed(2), 2, y(v) + 4); hline(ctx, L, w, y(v), "#2e3540", []); }
  hline(ctx, L, w, y(thr), "#f5a524", [6, 4]);
  hline(ctx, L, w, y(clear), "#5aa9e6", [3, 3]);
  if (samples.length < 2) return;
  const t0 = samples[0][0], t1 = samples[samples.length - 1][0], span = Math.max(1, t1 - t0);
  const x = (t) => L + (t - t0) / span * (w - L - 4);
  ctx.fillText(`${Math.round(span / 1000)} s`, w - 40, h - 4);
  ctx.strokeStyle = "#7cb7ff"; ctx.lineWidth = 1.5; ctx.beginPath();
  samples.forEach((s, i) => (i ? ctx.lineTo(x(s[0]), y(s[1])) : ctx.moveTo(x(s[0]), y(s[1]))));
  ctx.stroke(); ctx.lineWidth = 1;
}

// Histogram of recent scores (each sample's last frame), calibrated threshold (0.5) and alarm threshold marked.
function histogram(canvas, samples, thr) {
  const { ctx, w, h } = canvasCtx(canvas);
  const bins = new Array(50).fill(0);
  for (const s of samples) bins[Math.min(49, Math.max(0, Math.floor(s[2] * 50)))] += 1;
  const max = Math.max(1, ...bins), B = 18, bw = w / 50;
  ctx.fillStyle = "#4b6a8f";
  bins.forEach((n, i) => { const bh = n / max * (h - B - 6); ctx.fillRect(i * bw + 1, h - B - bh, bw - 2, bh); });
  const vline = (v, color, dash) => {
    ctx.strokeStyle = color; ctx.setLineDash(dash); ctx.beginPath();
    ctx.moveTo(v * w, 0); ctx.lineTo(v * w, h - B); ctx.stroke(); ctx.setLineDash([]);
  };
  vline(0.5, "#e5484d", []);
  vline(thr, "#f5a524", [6, 4]);
  ctx.fillStyle = "#8a96a3"; ctx.font = "11px sans-serif";
  ctx.fillText("0", 2, h - 4); ctx.fillText("1", w - 8, h - 4); ctx.fillText(`n=${samples.length}`, w / 2 - 14, h - 4);
}

// Sends a command through the console's port and shows the intake's answer.
async function sendCommand(camera, name, body, out) {
  const request_id = `console-${Date.now()}-${Math.floor(Math.random() * 1e6)}`;
  out.className = "answer"; out.textContent = `${name}: sent…`;
  try {
    const r = await fetch(`/api/cmd/${encodeURIComponent(camera)}/${name}`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(Object.assign({ request_id }, body)),
    });
    const a = await r.json();
    out.className = "answer " + (a.status || "");
    out.dataset.status = a.status || ""; out.dataset.requestId = request_id;
    out.textContent = `${name}: ${a.status}${a.reason ? " — " + a.reason : ""}` +
      (a.detail && Object.keys(a.detail).length ? "\n" + JSON.stringify(a.detail) : "");
  } catch (e) {
    out.className = "answer failed"; out.textContent = `${name}: ${e}`;
  }
}

// ---- Overview ----
function initOverview() {
  nav("Overview");
  const grid = $("#tiles"), tiles = new Map();
  async function refresh() {
    let data;
    try { data = await api("/api/overview"); } catch (e) { return; }
    for (const c of data.cameras) {
      let t = tiles.get(c.name);
      if (!t) {
        const img = el("img", { alt: c.name });
        t = { root: el("div", { class: "tile", "data-camera": c.name }), img, badge: el("span", { class: "badge" }),
              figs: el("div", { class: "figs" }), spark: document.createElementNS("http://www.w3.org/2000/svg", "svg") };
        t.spark.setAttribute("class", "spark");
        const link = el("a", { href: `/camera/${encodeURIComponent(c.name)}` },
          el("div", { class: "row" }, el("b", {}, c.name), t.badge), img);
        t.root.append(link, t.figs, t.spark);
        grid.append(t.root);
        livePoll(img, c.name);
        tiles.set(c.name, t);
      }
      const st = stateOf(c);
      t.badge.className = "badge " + st; t.badge.textContent = st; t.root.dataset.state = st;
      t.figs.innerHTML = "";
      t.figs.append(el("span", {}, `${fmt(c.fps, 1)} fps`), el("span", {}, `drops ${c.dropped}`),
        el("span", {}, `score ${fmt(c.score)}`), el("span", {}, `alarms ${c.alarms_raised}`));
      sparkline(t.spark, c.samples, c.threshold);
    }
    $("#console-figs").textContent =
      `console: ${data.console.dropped} history items dropped, ${data.console.live_skipped} live frames skipped`;
  }
  refresh();
  setInterval(refresh, 1000);
}

// ---- Camera ----
function initCamera() {
  nav("");
  const name = decodeURIComponent(location.pathname.split("/").pop());
  $("#name").textContent = name;
  document.title = `${name} · ganomalyd`;
  livePoll($("#live"), name);
  const answer = $("#answer");
  $("#calibrate").addEventListener("click", () => sendCommand(name, "calibrate", { frames: 500 }, answer));
  $("#record").addEventListener("click", () => sendCommand(name, "record", { count: 100 }, answer));
  // One row per alarm, rebuilt only when the alarm changes; its answer box is kept.
  const rows = new Map();
  function alarmRow(a) {
    const key = JSON.stringify([a.end_ts, a.frames, a.has_snapshot, a.peak]);
    let r = rows.get(a.id);
    if (!r) {
      r = { tr: el("tr", { id: "alarm-" + a.id, "data-alarm": a.id }), out: el("div", { class: "answer" }), key: "" };
      rows.set(a.id, r);
    }
    if (r.key === key) return r.tr;
    r.key = key;
    r.tr.innerHTML = "";
    const snap = a.has_snapshot ? el("img", { class: "thumb", src: `/api/snapshot/${encodeURIComponent(a.id)}`, alt: "snapshot" }) : "–";
    r.tr.append(el("td", {}, snap), el("td", {}, fmtTime(a.start_ts)), el("td", {}, a.end_ts ? fmtTime(a.end_ts) : "active"),
      el("td", {}, fmt(a.peak)), el("td", {}, a.frames),
      el("td", {},
        el("button", { class: "good false-alarm", onclick: () => sendCommand(name, "feedback", { alarm_id: a.id, verdict: "ok" }, r.out) }, "false alarm"),
        " ",
        el("button", { class: "bad defect", onclick: () => sendCommand(name, "feedback", { alarm_id: a.id, verdict: "defect" }, r.out) }, "defect"),
        r.out));
    return r.tr;
  }
  async function refresh() {
    let c;
    try { c = await api(`/api/camera/${encodeURIComponent(name)}`); } catch (e) { return; }
    const st = stateOf(c);
    const badge = $("#state"); badge.className = "badge " + st; badge.textContent = st;
    $("#figs").innerHTML = "";
    $("#figs").append(el("span", {}, `${fmt(c.fps, 1)} fps`), el("span", {}, `decided ${c.decided}`),
      el("span", {}, `drops ${c.dropped}`), el("span", {}, `broken ${c.broken}`), el("span", {}, `score ${fmt(c.score)}`),
      el("span", {}, `threshold ${fmt(c.threshold, 2)} / clear ${fmt(c.clear_threshold, 2)} (calibrated raw ${fmt(c.threshold_raw)} = 0.5)`));
    scoreChart($("#chart"), c.samples, c.threshold, c.clear_threshold);
    histogram($("#hist"), c.samples, c.threshold);
    const body = $("#alarms tbody");
    c.alarms.forEach((a, i) => {
      const tr = alarmRow(a);
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
  }
  refresh();
  setInterval(refresh, 1000);
}

// ---- History ----
function initHistory() {
  nav("History");
  const form = $("#filters");
  const params = () => {
    const q = new URLSearchParams();
    const cam = $("#f-camera").value; if (cam) q.set("camera", cam);
    const since = $("#f-since").value; if (since) q.set("since", String(new Date(since).getTime()));
    const until = $("#f-until").value; if (until) q.set("until", String(new Date(until).getTime()));
    const v = $("#f-verdict").value; if (v) q.set("verdict", v);
    return q.toString();
  };
  api("/api/overview").then((d) => {
    for (const c of d.cameras) $("#f-camera").append(el("option", { value: c.name }, c.name));
  }).catch(() => {});
  async function load() {
    const q = params();
    $("#alarms-csv").href = "/api/alarms.csv?" + q;
    $("#verdicts-csv").href = "/api/verdicts.csv?" + q;
    const [alarms, verdicts] = await Promise.all([api("/api/alarms?" + q), api("/api/verdicts?" + q)]);
    const ab = $("#alarms tbody"); ab.innerHTML = "";
    for (const a of alarms) {
      const snap = a.has_snapshot ? el("a", { href: `/api/snapshot/${encodeURIComponent(a.id)}` },
        el("img", { class: "thumb", src: `/api/snapshot/${encodeURIComponent(a.id)}`, alt: "snapshot" })) : "–";
      ab.append(el("tr", { "data-alarm": a.id }, el("td", {}, snap), el("td", {}, a.camera), el("td", {}, a.id),
        el("td", {}, fmtTime(a.start_ts)), el("td", {}, a.end_ts ? fmtTime(a.end_ts) : "active"),
        el("td", {}, fmt(a.peak)), el("td", {}, a.frames), el("td", {}, a.reason || "")));
    }
    const vb = $("#verdicts tbody"); vb.innerHTML = "";
    for (const v of verdicts) {
      vb.append(el("tr", {}, el("td", {}, v.camera), el("td", {}, v.part_id), el("td", {}, v.verdict),
        el("td", {}, fmtTime(v.ts)), el("td", {}, fmt(v.score)), el("td", {}, fmt(v.latency_ms, 1)), el("td", {}, v.reason || "")));
    }
    $("#counts").textContent = `${alarms.length} alarms, ${verdicts.length} verdicts`;
  }
  form.addEventListener("submit", (e) => { e.preventDefault(); load(); });
  load();
  setInterval(load, 5000);
}

// ---- Model ----
function initModel() {
  nav("Model");
  const kv = (obj) => {
    const t = el("table", { class: "kv" });
    for (const [k, v] of Object.entries(obj || {})) {
      t.append(el("tr", {}, el("td", {}, k), el("td", {}, typeof v === "object" ? JSON.stringify(v) : String(v))));
    }
    return t;
  };
  api("/api/model").then((models) => {
    const root = $("#models");
    for (const m of models) {
      const p = el("div", { class: "panel" }, el("h2", {}, m.path), el("div", { class: "figs" }, "cameras: " + m.cameras.join(", ")));
      if (m.error) { p.append(el("div", { class: "answer failed" }, m.error)); root.append(p); continue; }
      p.append(el("h3", {}, "Scores and calibration (default: " + m.default_score + ")"));
      const st = el("table", {}, el("tr", {}, ...["score", "threshold", "min", "max", "method", "target FAR", "val AUROC", "val F1"].map((h) => el("th", {}, h))));
      for (const s of m.scores) {
        const c = s.calibration;
        st.append(el("tr", {}, el("td", {}, s.kind), el("td", {}, fmt(c.threshold, 4)), el("td", {}, fmt(c.min, 4)),
          el("td", {}, fmt(c.max, 4)), el("td", {}, c.method), el("td", {}, c.target_false_alarm_rate ?? "–"),
          el("td", {}, fmt(c.val_auroc)), el("td", {}, fmt(c.val_f1))));
      }
      p.append(st, el("h3", {}, "Architecture"), kv(m.arch), el("h3", {}, "Preprocessing"), kv(m.preprocess),
        el("h3", {}, "Provenance"), kv(m.provenance));
      if (m.plots.length) {
        const plots = el("div", { class: "plots" }, el("h3", {}, "Training report"));
        for (const f of m.plots) plots.append(el("img", { src: `/api/model/${m.index}/plot/${encodeURIComponent(f)}`, alt: f, title: f }));
        p.append(plots);
      }
      root.append(p);
    }
  });
}

window.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  ({ overview: initOverview, camera: initCamera, history: initHistory, model: initModel })[page]();
});
