// Portico admin dashboard. Plain JavaScript, no build step, no dependencies.
//
// Live data comes from GET /api/stream (Server-Sent Events), read with fetch() so that the
// bearer token can be sent when reads need one. Each "tick" holds cumulative counters; rates
// and windowed percentiles are computed here from ticks WINDOW seconds apart.
"use strict";

const WINDOW = 5; // seconds of history behind req/s, error rate and p50/p99
const SPARK_POINTS = 60;
const history = []; // recent ticks, oldest first
const sparks = {}; // upstream -> recent req/s values
let token = sessionStorage.getItem("portico-admin-token") || "";
let last = null;

const $ = (sel) => document.querySelector(sel);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g, (c) => ({
  "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

function authHeaders() {
  return token ? { Authorization: "Bearer " + token } : {};
}

function toast(text, bad) {
  const el = $("#toast");
  el.textContent = text;
  el.className = "show" + (bad ? " bad" : "");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.className = ""; }, 4000);
}

// --- numbers --------------------------------------------------------------------------------

function baseline(now) {
  // The oldest kept tick at least WINDOW seconds old (or the oldest there is).
  let found = history[0];
  for (const t of history) if (now.time - t.time >= WINDOW) found = t;
  return found && found !== now ? found : null;
}

function byKey(list, key) {
  const out = {};
  for (const item of list || []) out[item[key]] = item;
  return out;
}

function quantile(q, bounds, counts) {
  // counts: per-bucket (not cumulative) observations, bounds: bucket upper bounds (seconds).
  const total = counts.reduce((a, b) => a + b, 0);
  if (!total) return null;
  const rank = q * total;
  let seen = 0, lower = 0;
  for (let i = 0; i < bounds.length; i++) {
    const n = counts[i];
    if (n > 0 && seen + n >= rank) return lower + (bounds[i] - lower) * (rank - seen) / n;
    seen += n;
    lower = bounds[i];
  }
  return bounds[bounds.length - 1];
}

function windowed(cur, old, seconds) {
  // req/s, error share and p50/p99 of what happened between two cumulative summaries, `seconds`
  // apart (0: no earlier tick yet). No `old` summary then means nothing was counted yet.
  if (!cur) return { rps: seconds > 0 ? 0 : null, err: null, p50: null, p99: null, requests: 0 };
  const requests = cur.requests - (old ? old.requests : 0);
  const errors = cur.errors - (old ? old.errors : 0);
  let p50 = cur.p50, p99 = cur.p99;
  if (seconds > 0 && cur.latency && requests > 0) {
    const per = (cum) => cum.map((v, i) => v - (i ? cum[i - 1] : 0));
    const a = per(cur.latency.counts), b = old && old.latency ? per(old.latency.counts) : [];
    const diff = a.map((v, i) => v - (b[i] || 0));
    p50 = quantile(0.5, cur.latency.buckets, diff);
    p99 = quantile(0.99, cur.latency.buckets, diff);
  }
  return {
    rps: seconds > 0 ? requests / seconds : null,
    err: requests > 0 ? errors / requests : null,
    p50, p99, requests: cur.requests,
  };
}

const fmtRate = (v) => v == null ? "–" : v >= 100 ? v.toFixed(0) : v.toFixed(1);
const fmtPct = (v) => v == null ? "–" : (100 * v).toFixed(1) + "%";
const fmtMs = (v) => v == null ? "–" : (1000 * v).toFixed(v < 0.01 ? 2 : 0) + " ms";
const fmtTime = (t) => new Date(t * 1000).toLocaleTimeString();
const fmtAge = (s) => s < 120 ? s.toFixed(0) + "s" : s < 7200 ? (s / 60).toFixed(0) + "m" : (s / 3600).toFixed(1) + "h";

function spark(values) {
  if (!values || values.length < 2) return "";
  const max = Math.max(1, ...values);
  const pts = values.map((v, i) => `${(i * 100 / (SPARK_POINTS - 1)).toFixed(1)},${(20 - 18 * v / max).toFixed(1)}`);
  return `<svg class="spark" width="100" height="20" viewBox="0 0 100 20"><polyline fill="none" stroke="#58a6ff" points="${pts.join(" ")}"/></svg>`;
}

// --- rendering ------------------------------------------------------------------------------

function render(tick) {
  history.push(tick);
  while (history.length > 2 && tick.time - history[1].time >= WINDOW) history.shift();
  const old = baseline(tick);
  const seconds = old ? tick.time - old.time : 0;
  const s = tick.status;
  $("#summary").textContent =
    `v${s.version} · pid ${s.pid} · ${s.workers} worker(s) · up ${fmtAge(s.uptime)}` +
    (s.config_file ? ` · ${s.config_file}` : "");

  const m = tick.metrics, om = old && old.metrics;
  const routeRows = (m ? m.routes : []).map((r) => {
    const w = windowed(r, om && byKey(om.routes, "route")[r.route], seconds);
    return `<tr data-route="${esc(r.route)}"><td>${esc(r.route)}</td><td class="rps">${fmtRate(w.rps)}</td>` +
      `<td class="${w.err ? "bad" : ""}">${fmtPct(w.err)}</td><td>${fmtMs(w.p50)}</td><td>${fmtMs(w.p99)}</td>` +
      `<td class="requests">${r.requests}</td></tr>`;
  });
  $("#routes tbody").innerHTML = routeRows.join("") ||
    `<tr><td colspan="6" class="muted">${m ? "no requests yet" : "metrics are off"}</td></tr>`;

  const mUp = m ? byKey(m.upstreams, "upstream") : {};
  const oUp = om ? byKey(om.upstreams, "upstream") : {};
  const oldUps = old ? byKey(old.upstreams, "name") : {};
  $("#upstreams").innerHTML = tick.upstreams.map((u) => {
    let w = windowed(mUp[u.name], oUp[u.name], seconds);
    if (!m) { // metrics off: req/s from the endpoints' request counts
      const sum = (up) => up ? up.endpoints.reduce((a, e) => a + e.requests, 0) : 0;
      w = { rps: old && seconds ? (sum(u) - sum(oldUps[u.name])) / seconds : null, err: null, p50: null, p99: null };
    }
    const values = (sparks[u.name] = sparks[u.name] || []);
    if (w.rps != null) { values.push(w.rps); if (values.length > SPARK_POINTS) values.shift(); }
    const eps = u.endpoints.map((e) => `
      <tr data-endpoint="${esc(u.name)}/${esc(e.endpoint)}">
        <td>${esc(e.endpoint)}</td><td class="state state-${e.state}">${e.state}</td>
        <td class="weight">${e.weight}${e.backup ? " (backup)" : ""}</td>
        <td class="in-flight">${e.in_flight}</td><td class="requests">${e.requests}</td>
        <td>${e.draining
          ? `<button data-act="undrain" data-up="${esc(u.name)}" data-ep="${esc(e.endpoint)}">Undrain</button>`
          : `<button data-act="drain" data-up="${esc(u.name)}" data-ep="${esc(e.endpoint)}">Drain</button>`}
          <button data-act="weight" data-up="${esc(u.name)}" data-ep="${esc(e.endpoint)}" data-weight="${e.weight}">Weight</button></td>
      </tr>`).join("");
    return `<h3 data-upstream="${esc(u.name)}">${esc(u.name)} <span class="muted">${esc(u.kind)}, ${esc(u.balancer)}</span>
        · <span class="rps">${fmtRate(w.rps)}</span> req/s · errors ${fmtPct(w.err)} · p50 ${fmtMs(w.p50)} · p99 ${fmtMs(w.p99)}
        ${spark(values)} ${u.unavailable ? `<span class="bad">${esc(u.unavailable)}</span>` : ""}</h3>
      <table><thead><tr><th>endpoint</th><th>state</th><th>weight</th><th>in flight</th><th>requests</th><th></th></tr></thead>
      <tbody>${eps || `<tr><td colspan="6" class="muted">no endpoints</td></tr>`}</tbody></table>`;
  }).join("");

  $("#apps").innerHTML = tick.apps.map((a) => {
    const rows = a.instances.map((i) => `
      <tr data-instance="${esc(i.id)}"><td>${esc(i.id)}</td><td>${i.pid ?? esc(i.container) ?? ""}</td><td>${i.port}</td>
      <td class="state state-${i.state}">${i.state}</td><td>${fmtAge(i.age)}</td><td>${i.cpu.toFixed(1)}%</td>
      <td>${i.in_flight}</td></tr>`).join("");
    const scale = a.autoscale ? ` · autoscale ${esc(a.autoscale.metric)} target ${a.autoscale.target}` +
      (a.autoscale.hold_until ? ` · held until ${fmtTime(a.autoscale.hold_until)}` : "") : "";
    return `<h3 data-app="${esc(a.name)}">${esc(a.name)} <span class="muted">desired <b class="desired">${a.desired}</b>,
        actual <b class="actual">${a.actual}</b> (${a.ready} ready, ${a.starting} starting, ${a.draining} draining),
        min ${a.min} max ${a.max}${scale}</span>
        ${a.crash_loop ? '<span class="bad">crash loop</span>' : ""}
        <button data-act="scale" data-app="${esc(a.name)}" data-desired="${a.desired}" data-min="${a.min}" data-max="${a.max}">Scale</button>
        <button data-act="restart" data-app="${esc(a.name)}">Restart</button></h3>
      <table><thead><tr><th>instance</th><th>pid / container</th><th>port</th><th>state</th><th>age</th><th>CPU</th><th>in flight</th></tr></thead>
      <tbody>${rows || `<tr><td colspan="7" class="muted">no instances</td></tr>`}</tbody></table>`;
  }).join("") || '<p class="muted">no apps</p>';

  const item = (e) => `<li><time>${fmtTime(e.at)}</time><b>${esc(e.source)}</b> ${esc(e.message)}</li>`;
  const scaling = tick.events.filter((e) => ["scale", "start", "ready", "stop", "drain", "restart", "admin"].includes(e.kind));
  $("#timeline").innerHTML = scaling.reverse().map(item).join("") || '<li class="muted">nothing yet</li>';
  const bad = tick.events.filter((e) => ["crash", "crash_loop"].includes(e.kind) ||
    (e.kind === "health" && /DOWN/i.test(e.message)) ||
    (e.kind === "ejection" && / ejected/.test(e.message)));
  $("#errors").innerHTML = bad.reverse().map(item).join("") || '<li class="muted">none</li>';

  const providers = s.providers || {};
  $("#providers-section").hidden = !Object.keys(providers).length;
  $("#providers").textContent = JSON.stringify(providers, null, 2);
  last = tick;
}

// --- actions --------------------------------------------------------------------------------

function ask(text, field) {
  // A confirmation dialog; with `field` ({label, value}) it also asks for a number.
  return new Promise((resolve) => {
    const dlg = $("#confirm");
    $("#confirm-text").textContent = text;
    $("#confirm-error").textContent = "";
    $("#confirm-field").hidden = !field;
    if (field) { $("#confirm-label").textContent = field.label; $("#confirm-input").value = field.value; }
    dlg.onclose = () => resolve(dlg.returnValue === "ok" ? (field ? $("#confirm-input").value : true) : null);
    dlg.returnValue = "";
    dlg.showModal();
  });
}

async function act(path, body, what) {
  const res = await fetch(path, {
    method: "POST",
    headers: { ...authHeaders(), "Content-Type": "application/json" },
    body: body ? JSON.stringify(body) : "",
  });
  const data = await res.json().catch(() => ({}));
  if (res.ok) toast(what + ": done");
  else toast(`${what}: ${res.status} ${data.error || ""}`, true);
  return res.ok;
}

document.addEventListener("click", async (ev) => {
  const b = ev.target.closest("button[data-act]");
  if (!b) return;
  const d = b.dataset;
  const ep = d.up && `/api/upstreams/${encodeURIComponent(d.up)}/endpoints/${encodeURIComponent(d.ep)}`;
  if (d.act === "drain" || d.act === "undrain") {
    if (await ask(`${d.act === "drain" ? "Drain" : "Undrain"} ${d.ep} of ${d.up}?`)) {
      await act(`${ep}/${d.act}`, null, `${d.act} ${d.ep}`);
    }
  } else if (d.act === "weight") {
    const v = await ask(`Set the weight of ${d.ep} in ${d.up} (1-1000, until the next reload)`, { label: "weight", value: d.weight });
    if (v != null) await act(`${ep}/weight`, { weight: Number(v) }, `weight of ${d.ep}`);
  } else if (d.act === "scale") {
    const v = await ask(`Run how many instances of ${d.app}? (${d.min}-${d.max}; an autoscaler waits 5 minutes)`, { label: "instances", value: d.desired });
    if (v != null) await act(`/api/apps/${encodeURIComponent(d.app)}/scale`, { count: Number(v) }, `scale ${d.app}`);
  } else if (d.act === "restart") {
    if (await ask(`Rolling restart of every instance of ${d.app}?`)) {
      await act(`/api/apps/${encodeURIComponent(d.app)}/restart`, null, `restart ${d.app}`);
    }
  }
});

$("#token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("#token").value.trim();
  sessionStorage.setItem("portico-admin-token", token);
  $("#token").value = "";
  toast(token ? "token set for this tab" : "token cleared");
  restart();
});

// --- the live stream ------------------------------------------------------------------------

let controller = null;

async function stream() {
  controller = new AbortController();
  const res = await fetch("/api/stream", { headers: authHeaders(), signal: controller.signal });
  if (res.status === 401) { $("#summary").textContent = "reads need a token: enter it above"; return; }
  if (!res.ok || !res.body) throw new Error("stream: " + res.status);
  $("#live").classList.add("on");
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (event === "tick" && data) render(JSON.parse(data));
    }
  }
}

function restart() {
  if (controller) controller.abort();
  run();
}

async function run() {
  try {
    await stream();
  } catch (err) {
    if (err.name === "AbortError") return;
  }
  $("#live").classList.remove("on");
  setTimeout(run, 2000); // the server restarted or the network blinked: reconnect
}

run();
