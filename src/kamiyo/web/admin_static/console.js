// The operator console: a few views over the JSON admin API, no framework, no external asset.
// Every value from the server is put in the page as text (textContent), never as HTML.
"use strict";

const API = "/admin/api";
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const SVG_NS = "http://www.w3.org/2000/svg";
const MARK_SYMBOL = { applied: "✓", failed: "✕", pending: "…", ignored: "–", duplicate: "↻", rejected: "⊘" };
// Stripe's own timestamps are Unix seconds; these keys hold them in the reports.
const UNIX_KEYS = /^(created|current_period_end|cancel_at|ended_at|trial_end|canceled_at)$/;
const $ = (selector) => document.querySelector(selector);

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
  for (const child of children) el.append(child instanceof Node ? child : String(child));
  return el;
}

function pill(mark, label) {
  return h("span", { class: `pill mark-${mark}`, "data-mark": mark }, `${MARK_SYMBOL[mark] || ""} ${label || mark}`);
}

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
    `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function notice(message) {
  const box = $("#notice");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, options = {}) {
  const init = { credentials: "same-origin", headers: { Accept: "application/json" }, ...options };
  if (init.body !== undefined) {
    init.method = init.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.headers["X-CSRF-Token"] = CSRF;
    init.body = JSON.stringify(init.body);
  }
  const response = await fetch(API + path, init);
  if (response.status === 401) {
    window.location.reload(); // the session expired: the page answers with the sign-in form
    throw new Error("signed out");
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function query(params) {
  const pairs = Object.entries(params).filter(([, v]) => v !== "" && v !== null && v !== undefined);
  return pairs.length ? "?" + new URLSearchParams(pairs).toString() : "";
}

// -- generic rendering of report objects --------------------------------------------------------

function isPlainObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

function scalar(value, key) {
  if (value === null || value === undefined || value === "") return h("span", { class: "muted" }, "–");
  if (typeof value === "number" && UNIX_KEYS.test(key || "") && value > 1e9) return when(new Date(value * 1000));
  if (typeof value === "string" && /^\d{4}-\d\d-\d\dT\d\d:\d\d/.test(value)) return when(value);
  if (typeof value === "boolean") return value ? "yes" : "no";
  if (key === "changes" && Array.isArray(value)) {  // a user's recent event: how it moved their tier and status
    return value.map((c) => `${state(c.tier_from, c.status_from)} → ${state(c.tier_to, c.status_to)} (${c.why})`)
      .join("; ") || "none";
  }
  if (Array.isArray(value) && value.every((v) => typeof v !== "object")) return value.join(", ") || "–";
  if (typeof value === "object") return h("code", {}, JSON.stringify(value));
  return String(value);
}

function label(key) {
  return key.replace(/_/g, " ");
}

function table(rows, columns) {
  if (!rows.length) return h("p", { class: "empty" }, "none");
  columns = columns || [...new Set(rows.flatMap((row) => Object.keys(row)))];
  return h("div", { class: "scroll" }, h("table", {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, label(c))))),
    h("tbody", {}, rows.map((row) => h("tr", {}, columns.map((c) => h("td", {}, scalar(row[c], c))))))));
}

function report(value, title) {
  const parts = [];
  if (title) parts.push(h("h2", {}, title));
  const facts = h("dl");
  const nested = [];
  for (const [key, item] of Object.entries(value)) {
    if (Array.isArray(item) && item.length && isPlainObject(item[0])) nested.push(h("h3", {}, label(key)), table(item));
    else if (Array.isArray(item) && !item.length) nested.push(h("h3", {}, label(key)), h("p", { class: "empty" }, "none"));
    else if (isPlainObject(item)) nested.push(h("h3", {}, label(key)), report(item));
    else facts.append(h("dt", {}, label(key)), h("dd", {}, Array.isArray(item) ? item.join(", ") : scalar(item, key)));
  }
  return h("div", { class: "report" }, parts, facts, nested);
}

// -- overview ---------------------------------------------------------------------------------

async function showOverview() {
  const [health, chart, parked, overrides] = await Promise.all([
    api("/health"), api("/chart"), api("/parked"), api("/overrides"),
  ]);
  const status = $("#health-status");
  status.className = `pill status-${health.status}`;
  status.textContent = health.status;
  $("#health-checks").replaceChildren(...health.checks.map((check) => h("tr", { "data-check": check.name },
    h("td", {}, check.name),
    h("td", {}, h("span", { class: `pill status-${check.status}` }, check.status)),
    h("td", {}, check.detail))));
  drawChart(chart);
  $("#parked").replaceChildren(parked.reasons.length ? h("div", {},
    table(parked.reasons, ["reason", "count", "example"]),
    h("p", {}, h("a", { href: "#/deliveries?status=failed" }, `show the ${parked.total} parked event(s)`))) :
    h("p", { class: "empty" }, "no parked failures"));
  $("#overrides").replaceChildren(table(overrides.overrides));
}

function drawChart(chart) {
  const { ok, failed, duplicate, rejected } = chartSeries(chart);
  const n = chart.buckets.length;
  const totals = ok.map((_, i) => ok[i] + failed[i] + duplicate[i] + rejected[i]);
  const top = Math.max(4, ...totals);
  const W = 960, H = 220, left = 40, bottom = 24, plotH = H - bottom - 10, step = (W - left - 8) / n;
  const y = (v) => 10 + plotH - (v / top) * plotH;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "deliveries per 15 minutes" });
  for (const fraction of [0, 0.5, 1]) {
    const value = Math.round(top * fraction);
    root.append(svg("line", { class: "grid-line", x1: left, x2: W - 8, y1: y(value), y2: y(value) }));
    root.append(svg("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end" }, String(value)));
  }
  chart.buckets.forEach((iso, i) => {
    const x = left + i * step + 1;
    let base = 0;
    const group = svg("g", {}, svg("title", {},
      `${when(iso)}: ${ok[i] + failed[i]} stored (${failed[i]} failed), ${duplicate[i]} duplicate, ${rejected[i]} rejected`));
    for (const [cls, value] of [["bar-ok", ok[i]], ["bar-failed", failed[i]], ["bar-duplicate", duplicate[i]],
      ["bar-rejected", rejected[i]]]) {
      if (!value) continue;
      group.append(svg("rect", { class: cls, x, width: Math.max(1, step - 2), y: y(base + value), height: y(base) - y(base + value) }));
      base += value;
    }
    root.append(group);
    if (new Date(iso).getMinutes() === 0 && new Date(iso).getHours() % 3 === 0) {
      const d = new Date(iso);
      root.append(svg("text", { x, y: H - 6 }, `${String(d.getHours()).padStart(2, "0")}:00`));
    }
  });
  root.append(svg("line", { class: "axis", x1: left, x2: W - 8, y1: y(0), y2: y(0) }));
  $("#chart").replaceChildren(root);
  const t = chart.totals;
  $("#chart-legend").replaceChildren(
    h("li", { class: "ok" }, `applied, pending or ignored ${t.received - t.failed}`),
    h("li", { class: "failed" }, `failed (parked) ${t.failed}`),
    h("li", { class: "duplicate" }, `duplicate ${t.duplicate}`),
    h("li", { class: "rejected" }, `rejected (4xx/5xx) ${t.rejected}`));
}

function chartSeries(chart) {
  const s = chart.series;
  return {
    ok: s.received.map((v, i) => v - s.failed[i]),
    failed: s.failed,
    duplicate: s.duplicate,
    rejected: s.rejected,
  };
}

// -- deliveries -------------------------------------------------------------------------------

async function showDeliveries(params) {
  const form = $("#filters");
  for (const name of ["status", "type", "customer"]) form.elements[name].value = params.get(name) || "";
  const data = await api("/deliveries" + query({
    status: params.get("status"), type: params.get("type"), customer: params.get("customer"),
  }));
  $("#event-types").replaceChildren(...data.types.map((t) => h("option", { value: t })));
  $("#delivery-counts").replaceChildren(...Object.entries(data.counts).filter(([, n]) => n)
    .map(([mark, n]) => pill(mark, `${mark} ${n}`)));
  const rows = data.deliveries.map((d) => d.kind === "event" ?
    h("tr", { class: "event", "data-event-id": d.event_id, "data-mark": d.mark,
      onclick: () => { window.location.hash = `#/deliveries/${encodeURIComponent(d.event_id)}`; } },
      h("td", { class: "mark" }, pill(d.mark)),
      h("td", { class: "when" }, when(d.received_at)),
      h("td", {}, d.type),
      h("td", {}, h("a", { href: `#/deliveries/${encodeURIComponent(d.event_id)}` }, h("code", {}, d.event_id))),
      h("td", {}, d.customer ? h("code", {}, d.customer) : "–"),
      h("td", {}, String(d.attempts)),
      h("td", { class: "error" }, d.error || "")) :
    h("tr", { class: "count", "data-mark": d.mark },
      h("td", { class: "mark" }, pill(d.mark, `${d.mark} ×${d.count}`)),
      h("td", { class: "when", title: "counted per minute" }, when(d.minute).slice(0, 16)),
      h("td", {}, d.type || "–"),
      h("td", { colspan: 3 }, d.mark === "duplicate" ?
        "already-stored event delivered again: answered 200, not stored twice" :
        `refused before storing (${d.reason || "unknown"}): Stripe retries`),
      h("td", {}, "")));
  $("#deliveries tbody").replaceChildren(...(rows.length ? rows :
    [h("tr", {}, h("td", { colspan: 7, class: "empty" }, "no delivery matches"))]));
}

// -- one delivery -----------------------------------------------------------------------------

let current = null;

async function showDelivery(eventId) {
  current = eventId;
  $("#replay-result").replaceChildren();
  $("#replay").reset();
  await renderDelivery(eventId);
}

async function renderDelivery(eventId) {
  const d = await api(`/deliveries/${encodeURIComponent(eventId)}`);
  $("#delivery-mark").replaceWith(Object.assign(pill(d.mark), { id: "delivery-mark" }));
  $("#delivery-id").textContent = d.event_id;
  const facts = [["type", d.type], ["outcome", d.mark], ["attempts", d.attempts], ["customer", d.customer],
    ["object", d.object_id], ["created (Stripe)", when(d.created)], ["received", when(d.received_at)],
    ["processed", when(d.processed_at)], ["replayed", when(d.replayed_at)], ["API version", d.api_version],
    ["livemode", d.livemode ? "yes" : "no"], ["source", d.source]];
  $("#delivery-facts").replaceChildren(...facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v ?? "–")]));
  const error = $("#delivery-error");
  error.hidden = !d.error;
  error.textContent = d.error ? `Error: ${d.error}` : "";
  // What applying it did: the recorded outcome's fields, else (applied before outcomes were recorded) its sentence.
  const detail = $("#delivery-detail");
  detail.hidden = !d.outcome && !d.detail;
  if (d.outcome) detail.replaceChildren(h("strong", {}, "Outcome"), outcomeFacts(d.outcome));
  else detail.textContent = d.detail ? `Outcome: ${d.detail}` : "";
  $("#delivery-payload").textContent = d.payload;
  return d;
}

function state(tier, status) {
  return `${tier}/${status ?? "none"}`;
}

function outcomeFacts(outcome) {
  const facts = [];
  const sub = outcome.subscription;
  if (sub) {
    facts.push(["subscription", sub.stored ? `${sub.id}: ${sub.status}, tier ${sub.tier}`
      : `${sub.id}: older than the stored snapshot, left as is`]);
  }
  const invoice = outcome.invoice;
  if (invoice) {
    facts.push(["invoice", `${invoice.id ?? "–"}: ${invoice.status ?? "–"} (${invoice.billing_reason ?? "–"}, ` +
      `attempt ${invoice.attempt_count ?? "–"}), subscription ${invoice.subscription ?? "none"}`]);
  }
  const customer = outcome.customer;
  if (customer) {
    const link = customer.link === "linked" ? `linked to user ${customer.user_id} by ${customer.linked_by}`
      : customer.link === "already_linked" ? `already linked to user ${customer.user_id ?? "–"}`
      : "not linked to a user yet";
    facts.push(["customer", `${customer.id}: ${link}`]);
  }
  for (const user of outcome.users || []) {
    facts.push(["user", `${user.email}: ${state(user.tier_from, user.status_from)} → ` +
      `${state(user.tier_to, user.status_to)} (${user.why})`]);
  }
  if (outcome.note) facts.push(["note", outcome.note]);
  if (!facts.length) facts.push(["", "nothing to apply"]);
  return h("dl", { id: "delivery-outcome", class: "facts" },
    facts.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

async function replay(dryRun) {
  const form = $("#replay");
  const reason = form.elements.reason.value.trim();
  if (!dryRun && !form.reportValidity()) return;
  const out = $("#replay-result");
  out.replaceChildren(h("p", { class: "muted" }, dryRun ? "previewing…" : "replaying…"));
  try {
    const data = await api("/replay", { body: { event_id: current, reason: reason || null, dry_run: dryRun } });
    out.replaceChildren(h("p", {}, dryRun ? "Dry run: nothing was changed." : "Queued again:"), table(data.results));
    if (!dryRun) await waitForOutcome(current);
  } catch (err) {
    out.replaceChildren(h("p", { class: "error" }, `Replay failed: ${err.message}`));
  }
}

async function waitForOutcome(eventId) {
  for (let i = 0; i < 60 && current === eventId; i++) {
    const d = await renderDelivery(eventId);
    if (d.mark !== "pending") return;
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

// -- users and audit --------------------------------------------------------------------------

async function showUsers(params) {
  const email = params.get("email");
  const out = $("#user-report");
  $("#user-search").elements.email.value = email || "";
  if (!email) { out.replaceChildren(); return; }
  try {
    out.replaceChildren(report(await api("/users" + query({ email })), email));
  } catch (err) {
    out.replaceChildren(h("p", { class: "empty" }, err.message));
  }
}

async function showAudit() {
  const data = await api("/audit");
  $("#audit").replaceChildren(table(data.entries, ["at", "action", "actor", "claimed_by", "target", "reason", "before", "after"]));
}

// -- routing ----------------------------------------------------------------------------------

const VIEWS = {
  overview: showOverview,
  deliveries: showDeliveries,
  delivery: showDelivery,
  users: showUsers,
  audit: showAudit,
};

async function route() {
  const hash = window.location.hash;
  const [path, search] = (hash.slice(1) || "/overview").split("?");
  const parts = path.split("/").filter(Boolean);
  let view = parts[0] in VIEWS ? parts[0] : "overview";
  let arg = new URLSearchParams(search || "");
  if (view === "deliveries" && parts[1]) { view = "delivery"; arg = decodeURIComponent(parts[1]); }
  if (view !== "delivery") current = null;
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  const tab = view === "delivery" ? "deliveries" : view;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === tab);
  notice("");
  try {
    await VIEWS[view](arg);
    document.body.dataset.loaded = view;
    document.body.dataset.loadedHash = hash;  // which filters the page shows (tests wait on it)
  } catch (err) {
    notice(`Could not load: ${err.message}`);
  }
}

$("#filters").addEventListener("submit", (event) => {
  event.preventDefault();
  const form = event.target;
  window.location.hash = "#/deliveries" + query({
    status: form.elements.status.value, type: form.elements.type.value.trim(), customer: form.elements.customer.value.trim(),
  });
});
$("#filters-clear").addEventListener("click", () => { window.location.hash = "#/deliveries"; });
$("#user-search").addEventListener("submit", (event) => {
  event.preventDefault();
  window.location.hash = "#/users" + query({ email: event.target.elements.email.value.trim() });
});
$("#replay").addEventListener("submit", (event) => { event.preventDefault(); replay(false); });
$("#replay-preview").addEventListener("click", () => replay(true));
window.addEventListener("hashchange", route);
route();
