// nbmeter operations console. Plain JavaScript, no dependencies, no build step.
// Security: the API key lives in this tab's sessionStorage and travels only in the
// Authorization header of same-origin fetch calls. Every value is put on the page with
// textContent or an SVG attribute (el() below): nothing from the API is parsed as HTML.
"use strict";

const KEY_SLOT = "nbmeter.apiKey";
const SVG = "http://www.w3.org/2000/svg";

// ---- DOM helpers -------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmtTime(iso) {
  if (!iso) return "—";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? String(iso) : d.toISOString().slice(0, 16).replace("T", " ") + "Z";
}

function fmtNum(x, digits) {
  if (x === null || x === undefined) return "—";
  return typeof x === "number" && digits !== undefined ? x.toFixed(digits) : String(x);
}

function card(title, ...body) {
  return el("div", { class: "card" }, el("h2", {}, title), ...body);
}

function kpi(label, value, sub, testid) {
  return el("div", { class: "kpi", "data-testid": testid },
    el("div", { class: "label" }, label), el("div", { class: "value" }, value),
    sub ? el("div", { class: "sub" }, sub) : null);
}

// A table: columns are [header, row => cell content, className?].
function table(columns, rows, attrs) {
  return el("table", attrs || {},
    el("thead", {}, el("tr", {}, columns.map(([h, , cls]) => el("th", { class: cls }, h)))),
    el("tbody", {}, rows.map((r) =>
      el("tr", {}, columns.map(([, cell, cls]) => el("td", { class: cls }, cell(r)))))));
}

function sev(s) {
  return s ? el("span", { class: `sev sev-${String(s).replace(/[^a-z]/g, "")}` }, s) : "—";
}

// ---- API ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

async function api(path, options) {
  const key = sessionStorage.getItem(KEY_SLOT);
  const headers = { Accept: "application/json" };
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method: "GET", headers, credentials: "omit", cache: "no-store", ...options };
  if (init.body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(init.body);
  }
  const res = await fetch(path, init);
  if (res.status === 401) {
    sessionStorage.removeItem(KEY_SLOT);
    showLogin("The key was refused: sign in again.");
    throw new ApiError(401, "signed out");
  }
  const body = res.status === 204 ? null : await res.json().catch(() => null);
  if (!res.ok) throw new ApiError(res.status, (body && (body.detail || body.title)) || res.statusText);
  return body;
}

// an endpoint another part of the server may not have yet: null when it is absent
async function optional(path) {
  try {
    return await api(path);
  } catch (err) {
    if (err instanceof ApiError && (err.status === 404 || err.status === 405)) return null;
    throw err;
  }
}

// ---- charts (inline SVG) -----------------------------------------------------------

function bars(points, { width = 560, height = 180, label = (p) => p.x, alt = false } = {}) {
  const pad = { l: 40, r: 8, t: 8, b: 30 };
  const max = Math.max(1, ...points.map((p) => p.y));
  const w = (width - pad.l - pad.r) / Math.max(1, points.length);
  const svg = el("svg:svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img" });
  svg.append(el("svg:line", { class: "axis", x1: pad.l, y1: height - pad.b, x2: width - pad.r, y2: height - pad.b }));
  svg.append(el("svg:text", { x: 2, y: pad.t + 8 }, fmtAxis(max)));
  const every = Math.ceil(points.length / 12);
  points.forEach((p, i) => {
    const h = ((height - pad.t - pad.b) * p.y) / max;
    const x = pad.l + i * w;
    svg.append(el("svg:rect", { class: alt ? "bar alt" : "bar", x: x + 1, y: height - pad.b - h,
      width: Math.max(1, w - 2), height: h }, el("svg:title", {}, `${label(p)}: ${p.y}`)));
    if (i % every === 0) svg.append(el("svg:text", { x, y: height - pad.b + 14 }, label(p)));
  });
  return svg;
}

function line(points, { width = 560, height = 180, label = (x) => x, alt = false } = {}) {
  const pad = { l: 56, r: 8, t: 8, b: 30 };
  const svg = el("svg:svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img" });
  if (!points.length) return svg;
  const ys = points.map((p) => p.y);
  let lo = Math.min(...ys);
  let hi = Math.max(...ys);
  if (hi === lo) { hi += 1; lo -= 1; }
  const xs = points.map((p) => p.x);
  const x0 = Math.min(...xs);
  const x1 = Math.max(x0 + 1, ...xs);
  const sx = (x) => pad.l + ((width - pad.l - pad.r) * (x - x0)) / (x1 - x0);
  const sy = (y) => height - pad.b - ((height - pad.t - pad.b) * (y - lo)) / (hi - lo);
  svg.append(el("svg:line", { class: "axis", x1: pad.l, y1: height - pad.b, x2: width - pad.r, y2: height - pad.b }));
  svg.append(el("svg:text", { x: 2, y: pad.t + 8 }, fmtAxis(hi)));
  svg.append(el("svg:text", { x: 2, y: height - pad.b }, fmtAxis(lo)));
  svg.append(el("svg:text", { x: pad.l, y: height - 8 }, label(x0)));
  svg.append(el("svg:text", { x: width - pad.r - 90, y: height - 8 }, label(x1)));
  const d = points.map((p, i) => `${i ? "L" : "M"}${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join("");
  svg.append(el("svg:path", { class: alt ? "line alt" : "line", d }));
  return svg;
}

function fmtAxis(v) {
  return Math.abs(v) >= 1000 ? v.toFixed(0) : String(Math.round(v * 1000) / 1000);
}

const day = (ms) => new Date(ms).toISOString().slice(0, 10);

// ---- views -------------------------------------------------------------------------

async function overviewView() {
  const [today, fleet] = await Promise.all([api("/v1/overview"), api("/v1/health/fleet?days=7")]);
  const rate = today.read_rate === null ? "—" : `${(today.read_rate * 100).toFixed(1)} %`;
  const outcomes = Object.entries(today.uplinks_by_outcome).map(([k, v]) => `${k} ${v}`).join(" · ");
  const openCount = today.open_alarms.filter((a) => a.state === "open").reduce((n, a) => n + a.alarms, 0);
  const ackCount = today.open_alarms.filter((a) => a.state === "acknowledged").reduce((n, a) => n + a.alarms, 0);
  return [
    el("h1", {}, "Fleet overview"),
    el("p", { class: "muted" }, `Today since ${fmtTime(today.since)} (${today.timezone})`),
    el("div", { class: "kpis" },
      kpi("Uplinks today", today.uplinks, outcomes || "none yet", "kpi-uplinks"),
      kpi("Read rate today", rate, `${today.meters_read} of ${today.meters_active} meters`, "kpi-read-rate"),
      kpi("Open alarms", openCount, `${ackCount} acknowledged`, "kpi-open-alarms"),
      kpi("Battery low", fleet.battery_low, `of ${fleet.with_battery} reporting a battery`, "kpi-battery-low"),
      kpi("Meter error", fleet.meter_error, `of ${fleet.meters} with health in 7 days`, "kpi-meter-error")),
    el("div", { class: "grid" },
      card("Alarms not closed, by kind and severity",
        today.open_alarms.length
          ? table([["Kind", (r) => r.kind], ["Severity", (r) => sev(r.severity)],
              ["State", (r) => el("span", { class: `state-${r.state}` }, r.state)],
              ["Alarms", (r) => r.alarms, "num"]], today.open_alarms, { "data-testid": "alarm-counts" })
          : el("p", { class: "muted" }, "No alarm open.")),
      card("Battery (latest per meter, mV)",
        fleet.battery_mv_bands.length
          ? bars(fleet.battery_mv_bands.map((b) => ({ x: b.start, y: b.meters })))
          : el("p", { class: "muted" }, "No battery figures in 7 days.")),
      card("Coverage class (ECL)",
        bars(Object.entries(fleet.ecl).map(([k, v]) => ({ x: `ECL ${k}`, y: v })), { alt: true })),
      card("RSRP (latest per meter, dBm)",
        fleet.rsrp_cdbm_bands.length
          ? bars(fleet.rsrp_cdbm_bands.map((b) => ({ x: b.start / 100, y: b.meters })))
          : el("p", { class: "muted" }, "No radio figures in 7 days.")),
      card("Worst cells by median RSRP",
        table([["Cell", (c) => c.cell_id], ["Meters", (c) => c.meters, "num"],
          ["Median RSRP dBm", (c) => fmtNum(c.median_rsrp_cdbm / 100, 1), "num"],
          ["Median SINR dB", (c) => (c.median_sinr_cdb === null ? "—" : fmtNum(c.median_sinr_cdb / 100, 1)), "num"],
          ["ECL 2", (c) => c.meters_ecl2, "num"]], fleet.worst_cells))),
  ];
}

let flash = null;

async function alarmsView(params) {
  const state = params.get("state") || "active";
  const states = state === "active" ? ["open", "acknowledged"] : [state];
  const query = states.map((s) => `state=${encodeURIComponent(s)}`).join("&");
  const rows = await api(`/v1/alarms?${query}`);
  // the outcome of the last action survives the re-render that shows its effect
  const status = el("p", { class: flash ? "muted" : "error", role: "alert", "data-testid": "alarm-status" },
    flash || "");
  flash = null;
  const select = el("select", { "aria-label": "state", onchange: (e) => { location.hash = `#/alarms?state=${e.target.value}`; } },
    ["active", "open", "acknowledged", "closed"].map((s) => el("option", { value: s, selected: s === state }, s)));

  async function act(alarm, action, button) {
    button.disabled = true;
    try {
      const got = await api(`/v1/alarms/${alarm.alarm_id}/${action}`, { method: "POST", body: {} });
      flash = `Alarm ${got.alarm_id} is ${got.state}.`;
      await route();
    } catch (err) {
      status.className = "error";
      status.textContent = `Alarm ${alarm.alarm_id}: ${err.message}`;
      button.disabled = false;
    }
  }

  const actions = (a) => el("span", {},
    a.state === "open" ? el("button", { type: "button", class: "primary", "data-action": "acknowledge",
      onclick: (e) => act(a, "acknowledge", e.target) }, "Acknowledge") : null,
    " ",
    a.state !== "closed" ? el("button", { type: "button", "data-action": "close",
      onclick: (e) => act(a, "close", e.target) }, "Close") : null);

  return [
    el("h1", {}, "Alarms"),
    el("div", { class: "toolbar" }, el("label", {}, "State "), select,
      el("span", { class: "muted" }, `${rows.length} alarm${rows.length === 1 ? "" : "s"}`)),
    status,
    el("div", { class: "card" }, rows.length
      ? table([
        ["Id", (a) => a.alarm_id, "num"],
        ["Meter", (a) => el("a", { href: `#/meters/${Number(a.meter_id)}` }, a.meter_id)],
        ["Kind", (a) => a.kind],
        ["Severity", (a) => sev(a.severity)],
        ["State", (a) => el("span", { class: `state-${a.state}` }, a.state)],
        ["Last seen", (a) => fmtTime(a.occurred_at)],
        ["Acknowledged", (a) => (a.acked_at ? `${fmtTime(a.acked_at)} by ${a.acked_by}` : "—")],
        ["", actions],
      ], rows, { "data-testid": "alarm-table" })
      : el("p", { class: "muted" }, "No alarm in this state.")),
  ];
}

async function metersView() {
  const page = await api("/v1/meters?limit=200");
  return [
    el("h1", {}, "Meters"),
    el("div", { class: "card" }, table([
      ["Id", (m) => el("a", { href: `#/meters/${Number(m.meter_id)}` }, m.meter_id), "num"],
      ["Address", (m) => m.address, "mono"],
      ["Service point", (m) => m.service_point || "—"],
      ["Kind", (m) => m.kind], ["Format", (m) => m.format || "—"],
      ["Removed", (m) => (m.removed_at ? fmtTime(m.removed_at) : "")],
    ], page.items, { "data-testid": "meter-table" })),
    page.next_cursor ? el("p", { class: "muted" }, "First 200 meters shown.") : null,
  ];
}

async function meterView(meterId, params) {
  const days = Math.min(366, Math.max(1, Number(params.get("days")) || 30));
  const now = Date.now();
  const from = new Date(Math.floor((now - days * 86400e3) / 86400e3) * 86400e3).toISOString();
  const to = new Date(Math.ceil(now / 86400e3) * 86400e3).toISOString();
  const step = days <= 3 ? "1h" : "1d";
  const base = `/v1/meters/${meterId}`;
  const [meter, health, reads, history, uplinks, commands] = await Promise.all([
    api(base), api(`${base}/health`),
    api(`${base}/readings?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}&step=${step}`),
    api(`${base}/health/history?limit=500&since=${encodeURIComponent(from)}`),
    optional(`${base}/uplinks?limit=20`), optional(`${base}/commands?limit=20`),
  ]);
  const known = reads.intervals.filter((i) => i.end_register_m3 !== null);
  const registerPts = known.map((i) => ({ x: Date.parse(i.end), y: Number(i.end_register_m3) }));
  const usePts = reads.intervals.map((i) => ({ x: i.start.slice(step === "1h" ? 11 : 5, step === "1h" ? 16 : 10),
    y: i.consumption_m3 === null ? 0 : Number(i.consumption_m3) }));
  const battery = history.filter((h) => h.battery_mv !== null).reverse()
    .map((h) => ({ x: Date.parse(h.measured_at), y: h.battery_mv }));
  const rsrp = history.filter((h) => h.rsrp_cdbm !== null).reverse()
    .map((h) => ({ x: Date.parse(h.measured_at), y: h.rsrp_cdbm / 100 }));
  const range = el("select", { "aria-label": "days", onchange: (e) => { location.hash = `#/meters/${meterId}?days=${e.target.value}`; } },
    [2, 7, 30, 90].map((d) => el("option", { value: d, selected: d === days }, `${d} days`)));
  return [
    el("h1", { "data-testid": "meter-title" }, `Meter ${meter.meter_id} · ${meter.address}`),
    el("div", { class: "toolbar" }, el("span", { class: "muted" },
      `${meter.kind}, ${meter.format || "no format"}, ${meter.service_point || "no service point"}`), range),
    el("div", { class: "kpis" },
      kpi("Register", health.last_register_m3 === null ? "—" : `${health.last_register_m3} m³`, `read ${fmtTime(health.last_read_at)}`, "kpi-register"),
      kpi("Last uplink", fmtTime(health.last_uplink_at), (health.last_flags || []).join(", ") || "no flags", "kpi-last-uplink"),
      kpi("Battery", health.battery_mv === null ? "—" : `${health.battery_mv} mV`,
        health.battery_low ? "LOW" : (health.battery_pct === null ? "" : `${health.battery_pct} %`), "kpi-battery"),
      kpi("Radio", health.rsrp_cdbm === null ? "—" : `${(health.rsrp_cdbm / 100).toFixed(1)} dBm`,
        `ECL ${fmtNum(health.ecl)} · cell ${fmtNum(health.cell_id)}`, "kpi-radio")),
    el("div", { class: "grid" },
      card(`Register (m³, ${reads.timezone})`, registerPts.length > 1
        ? line(registerPts, { label: (x) => day(x) }) : el("p", { class: "muted" }, "Not enough reads in this range.")),
      card(`Consumption per ${step === "1h" ? "hour" : "day"} (m³)`, bars(usePts, { label: (p) => p.x })),
      card("Battery (mV)", battery.length ? line(battery, { label: (x) => day(x), alt: true })
        : el("p", { class: "muted" }, "No battery history.")),
      card("RSRP (dBm)", rsrp.length ? line(rsrp, { label: (x) => day(x) })
        : el("p", { class: "muted" }, "No radio history."))),
    card("Health history", history.length ? table([
      ["Measured", (h) => fmtTime(h.measured_at)], ["Battery mV", (h) => fmtNum(h.battery_mv), "num"],
      ["Battery %", (h) => fmtNum(h.battery_pct), "num"], ["Low", (h) => fmtNum(h.battery_low)],
      ["Error", (h) => fmtNum(h.meter_error)],
      ["RSRP dBm", (h) => (h.rsrp_cdbm === null ? "—" : (h.rsrp_cdbm / 100).toFixed(1)), "num"],
      ["SINR dB", (h) => (h.sinr_cdb === null ? "—" : (h.sinr_cdb / 100).toFixed(1)), "num"],
      ["ECL", (h) => fmtNum(h.ecl), "num"], ["Cell", (h) => fmtNum(h.cell_id), "num"],
    ], history.slice(0, 20), { "data-testid": "health-table" }) : el("p", { class: "muted" }, "No health rows.")),
    card("Last raw frames", uplinks === null
      ? el("p", { class: "placeholder" }, "This server does not list raw uplinks yet.")
      : uplinks.length ? table([
        ["Received", (u) => fmtTime(u.received_at)], ["Transport", (u) => u.transport],
        ["Format", (u) => u.format || "—"], ["Outcome", (u) => u.outcome],
        ["Readings", (u) => `${u.n_new}/${u.n_readings} new`, "num"],
        ["Decode", (u) => (u.error_code !== null ? el("span", { class: "error" }, `error ${u.error_code}: ${u.error_message || ""}`)
          : (u.decode_flags && u.decode_flags.length ? u.decode_flags.map((f) => el("span", { class: "flag" }, f))
            : (u.format ? "decoded" : "—")))],
        ["Bytes", (u) => u.payload_hex, "mono"],
      ], uplinks, { "data-testid": "uplink-table" }) : el("p", { class: "muted" }, "No uplink archived.")),
    commands === null ? null : card("Commands", commandTable(commands.items || [])),
  ];
}

function commandTable(items) {
  if (!items.length) return el("p", { class: "muted" }, "No command for this meter.");
  return table([
    ["Id", (c) => c.command_id, "num"], ["Kind", (c) => c.kind],
    ["Args", (c) => JSON.stringify(c.args), "mono"],
    ["State", (c) => el("span", { class: `cmd-${String(c.state).replace(/[^a-z]/g, "")}` }, c.state)],
    ["Reason", (c) => c.reason || "—"], ["Attempts", (c) => c.attempts, "num"],
    ["Created", (c) => `${fmtTime(c.created_at)} by ${c.created_by}`],
    ["Finished", (c) => fmtTime(c.finished_at)],
  ], items.slice().reverse(), { "data-testid": "command-table" });
}

const m3 = (ml) => (ml === null || ml === undefined ? null : Number(ml) / 1e6);
const fmtM3 = (ml) => (ml === null || ml === undefined ? "—" : (Number(ml) / 1e6).toFixed(3));

// The daily water balance of a district: per day the bulk meter's volume beside the sum of
// the covered customer meters' (bars), non-revenue water = bulk - customers (line and
// dots), and the day's coverage (covered customers / customers) under each day; a day
// not fully covered is drawn faded, a day without figures is left empty.
function balanceChart(days, { width = 760, height = 260 } = {}) {
  const pad = { l: 56, r: 8, t: 22, b: 48 };
  const vals = days.flatMap((d) => [m3(d.bulk_ml), m3(d.customers_ml), m3(d.nrw_ml)])
    .filter((v) => v !== null);
  const hi = Math.max(0.001, ...vals);
  const lo = Math.min(0, ...vals);
  const plotH = height - pad.t - pad.b;
  const sy = (v) => pad.t + (plotH * (hi - v)) / (hi - lo);
  const w = (width - pad.l - pad.r) / Math.max(1, days.length);
  const svg = el("svg:svg", { class: "chart balance", viewBox: `0 0 ${width} ${height}`, role: "img",
    "data-testid": "balance-chart", "aria-label": "daily water balance" });
  svg.append(el("svg:line", { class: "axis", x1: pad.l, y1: sy(0), x2: width - pad.r, y2: sy(0) }));
  svg.append(el("svg:text", { x: 2, y: pad.t + 8 }, `${fmtAxis(hi)} m³`));
  svg.append(el("svg:text", { x: 2, y: sy(0) }, "0"));
  if (lo < 0) svg.append(el("svg:text", { x: 2, y: height - pad.b }, fmtAxis(lo)));
  const legend = [["bar", "bulk"], ["bar alt", "customers"], ["nrw", "non-revenue water"]];
  legend.forEach(([cls, text], i) => {
    const x = pad.l + i * 130;
    svg.append(el("svg:rect", { class: cls === "nrw" ? "nrw-key" : cls, x, y: 4, width: 10, height: 10 }));
    svg.append(el("svg:text", { x: x + 14, y: 13 }, text));
  });
  const every = Math.ceil(days.length / 16);
  const nrwPts = [];
  days.forEach((d, i) => {
    const x = pad.l + i * w;
    const bw = Math.max(1, (w - 4) / 2);
    const faded = d.complete ? "" : " partial";
    const coverage = `${d.n_covered}/${d.n_customers}`;
    const g = el("svg:g", { "data-day": d.day, class: d.complete ? "day" : "day incomplete" });
    const tip = `${d.day}: bulk ${fmtM3(d.bulk_ml)} m³, customers ${fmtM3(d.customers_ml)} m³,`
      + ` NRW ${fmtM3(d.nrw_ml)} m³, ${coverage} customers covered`
      + (d.computed_at ? "" : " (not rolled up)");
    g.append(el("svg:title", {}, tip));
    for (const [ml, cls, dx] of [[d.bulk_ml, "bar", 1], [d.customers_ml, "bar alt", 1 + bw]]) {
      const v = m3(ml);
      if (v === null || !d.computed_at) continue;
      g.append(el("svg:rect", { class: cls + faded, x: x + dx, y: sy(Math.max(v, 0)), width: bw,
        height: Math.abs(sy(v) - sy(0)) }));
    }
    if (d.computed_at) {
      g.append(el("svg:text", { class: d.complete ? "coverage" : "coverage short", x: x + w / 2,
        y: height - pad.b + 26, "text-anchor": "middle" }, coverage));
    }
    svg.append(g);
    if (i % every === 0) {
      svg.append(el("svg:text", { x: x + w / 2, y: height - pad.b + 13, "text-anchor": "middle" },
        String(d.day).slice(5)));
    }
    const nrw = m3(d.nrw_ml);
    if (nrw !== null && d.computed_at) nrwPts.push([x + w / 2, sy(nrw), d]);
  });
  svg.append(el("svg:text", { x: 2, y: height - pad.b + 26 }, "covered"));
  if (nrwPts.length) {
    const path = nrwPts.map(([x, y], i) => `${i ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`).join("");
    svg.append(el("svg:path", { class: "line nrw", d: path }));
    for (const [x, y, d] of nrwPts) {
      svg.append(el("svg:circle", { class: d.complete ? "dot nrw" : "dot nrw partial", cx: x, cy: y, r: 3 },
        el("svg:title", {}, `${d.day}: NRW ${fmtM3(d.nrw_ml)} m³`)));
    }
  }
  return svg;
}

async function districtsView() {
  const list = await optional("/v1/districts");
  if (list === null) {
    return [el("h1", {}, "Districts"), el("p", { class: "placeholder", "data-testid": "districts-placeholder" },
      "District metered areas and their water balance are not available on this server yet.")];
  }
  return [
    el("h1", {}, "Districts"),
    el("div", { class: "card" }, list.length ? table([
      ["Id", (d) => d.district_id, "num"],
      ["Name", (d) => el("a", { href: `#/districts/${Number(d.district_id)}` }, d.name)],
      ["Bulk meter", (d) => el("a", { href: `#/meters/${Number(d.bulk_meter_id)}` }, d.bulk_meter_id)],
      ["Customer meters", (d) => d.meter_ids.length, "num"],
      ["Defined", (d) => fmtTime(d.created_at)],
    ], list, { "data-testid": "district-table" })
      : el("p", { class: "muted" }, "No district defined (POST /v1/districts).")),
  ];
}

async function districtView(districtId, params) {
  const days = Math.min(366, Math.max(2, Number(params.get("days")) || 30));
  // the tenant's days end at its midnight; the last finished day is yesterday in UTC or
  // later, so ask up to today and let the days not rolled up show as empty
  const to = new Date();
  const from = new Date(to.getTime() - (days - 1) * 86400e3);
  const [district, rows] = await Promise.all([
    api(`/v1/districts/${districtId}`),
    api(`/v1/districts/${districtId}/balances?from=${day(from.getTime())}&to=${day(to.getTime())}`),
  ]);
  const done = rows.filter((r) => r.computed_at);
  const full = done.filter((r) => r.complete);
  const sum = (key) => full.reduce((n, r) => n + Number(r[key]), 0);
  const ratio = full.length && sum("bulk_ml") > 0
    ? `${((100 * sum("nrw_ml")) / sum("bulk_ml")).toFixed(1)} %` : "—";
  const last = done.length ? done[done.length - 1] : null;
  const range = el("select", { "aria-label": "days", onchange: (e) => { location.hash = `#/districts/${districtId}?days=${e.target.value}`; } },
    [7, 14, 30, 90].map((d) => el("option", { value: d, selected: d === days }, `${d} days`)));
  return [
    el("h1", { "data-testid": "district-title" }, `District ${district.name}`),
    el("div", { class: "toolbar" }, el("span", { class: "muted" }, "bulk meter "),
      el("a", { href: `#/meters/${Number(district.bulk_meter_id)}` }, district.bulk_meter_id),
      el("span", { class: "muted" }, `· ${district.meter_ids.length} customer meters`), range),
    el("div", { class: "kpis" },
      kpi("NRW, complete days", ratio, `${full.length} of ${done.length} rolled-up days fully covered`, "kpi-nrw"),
      kpi("Last day", last ? `${fmtM3(last.nrw_ml)} m³` : "—",
        last ? `${last.day}: NRW of ${fmtM3(last.bulk_ml)} m³ bulk` : "no day rolled up", "kpi-last-day"),
      kpi("Coverage, last day", last ? `${last.n_covered}/${last.n_customers}` : "—",
        last ? (last.bulk_ml === null ? "bulk meter not covered" : "customer meters covered") : "", "kpi-coverage")),
    card(`Daily water balance (m³), last ${days} days`, done.length ? balanceChart(rows)
      : el("p", { class: "muted" }, "No day of this range rolled up yet (nbmeter analytics run).")),
    card("Days", table([
      ["Day", (r) => r.day], ["Bulk m³", (r) => fmtM3(r.bulk_ml), "num"],
      ["Customers m³", (r) => fmtM3(r.customers_ml), "num"],
      ["NRW m³", (r) => fmtM3(r.nrw_ml), "num"],
      ["NRW %", (r) => (r.nrw_ratio === null ? "—" : (Number(r.nrw_ratio) * 100).toFixed(1)), "num"],
      ["Coverage", (r) => el("span", { class: r.complete ? "" : "short" }, `${r.n_covered}/${r.n_customers}`
        + (r.bulk_ml === null ? ", bulk missing" : "")), "num"],
      ["Rolled up", (r) => fmtTime(r.computed_at)],
    ], done.slice().reverse(), { "data-testid": "balance-table" })),
  ];
}

// ---- routing -----------------------------------------------------------------------

function showLogin(message) {
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("view").replaceChildren();
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
  document.getElementById("key").focus();
}

let routing = 0;

async function route() {
  if (!sessionStorage.getItem(KEY_SLOT)) { showLogin(); return; }
  document.getElementById("login").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  const [path, query] = (location.hash.slice(1) || "/overview").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  const name = parts[0] || "overview";
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.view === name);
  const view = document.getElementById("view");
  const mine = ++routing;
  view.setAttribute("aria-busy", "true");
  let content;
  try {
    if (name === "alarms") content = await alarmsView(params);
    else if (name === "meters" && /^\d{1,18}$/.test(parts[1] || "")) content = await meterView(parts[1], params);
    else if (name === "meters") content = await metersView();
    else if (name === "districts" && /^\d{1,18}$/.test(parts[1] || "")) content = await districtView(parts[1], params);
    else if (name === "districts") content = await districtsView();
    else content = await overviewView();
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) return;
    content = [el("p", { class: "error", role: "alert" }, `Could not load this page: ${err.message}`)];
  }
  if (mine !== routing) return; // a newer navigation won
  view.replaceChildren(...content.filter(Boolean));
  view.setAttribute("aria-busy", "false");
  view.dataset.view = name;
}

async function signIn(event) {
  event.preventDefault();
  const input = document.getElementById("key");
  const key = input.value.trim();
  input.value = "";
  sessionStorage.setItem(KEY_SLOT, key);
  try {
    await api("/v1/alarm-rules");
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) {
      sessionStorage.removeItem(KEY_SLOT);
      showLogin(`Sign-in failed: ${err.message}`);
    }
    return;
  }
  if (!location.hash) location.hash = "#/overview";
  await route();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", signIn);
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_SLOT);
    showLogin("Signed out.");
  });
  window.addEventListener("hashchange", route);
  route();
});
