// The "AI governance" page: audit trail, spend and budgets of governed AI calls.
//
// A plain ES module, no build step and nothing from a CDN. It runs in a same-origin iframe of the
// Airflow UI, so fetch() sends the UI's session cookie; the page never sees or stores the token.
// Audit data can contain model output and error text: it is only ever put into the page as text
// (textContent / createTextNode), never as HTML.

const API = new URL("../api/", import.meta.url);
const FILTER_KEYS = ["dag_id", "run_id", "task_id", "model", "decision", "action", "since", "until"];
const RUNS_PAGE = 50;
const RECORDS_PAGE = 100;
const BUDGET_HISTORY = 14;
const PALETTE = ["#2b6cb0", "#dd6b20", "#2f855a", "#b83280", "#6b46c1", "#c53030", "#2c7a7b", "#975a16",
  "#4a5568", "#d69e2e"];

const state = {
  filters: filtersFromQuery(location.search), runsOffset: 0, recordsOffset: 0, spend: null, metricChosen: false,
};

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// -- helpers ----------------------------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "className") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function filtersFromQuery(search) {
  const params = new URLSearchParams(search);
  const filters = {};
  for (const key of FILTER_KEYS) {
    const value = params.get(key);
    // An unsubstituted UI placeholder such as "{TASK_ID}" means "not in this context".
    if (value && !/^\{[A-Z_]+\}$/.test(value)) filters[key] = value;
  }
  return filters;
}

async function getJSON(path, params = {}) {
  const url = new URL(path, API);
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") url.searchParams.set(key, value);
  }
  const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (!response.ok) {
    let detail = response.statusText;
    try {
      const body = await response.json();
      detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    } catch {
      // not JSON: keep the status text
    }
    throw new ApiError(response.status, detail);
  }
  return response.json();
}

function explain(error) {
  if (error instanceof ApiError) {
    if (error.status === 401) return "You are not signed in to Airflow (or your session expired): sign in and reload.";
    if (error.status === 403) {
      const scope = state.filters.dag_id ? `of DAG "${state.filters.dag_id}"` : "of all DAGs (or filter by a DAG you can read)";
      return `You need permission to read the audit log ${scope}.`;
    }
    return `The server answered ${error.status}: ${error.message}`;
  }
  return `Could not load the data: ${error.message}`;
}

const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });

function formatUsd(value) {
  if (value === null || value === undefined) return "–";
  if (value !== 0 && Math.abs(value) < 0.01) return `$${value.toFixed(6).replace(/0+$/, "")}`;
  return `$${value.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`;
}

function formatTokens(value) {
  return value === null || value === undefined ? "–" : integer.format(value);
}

function formatMs(value) {
  if (value === null || value === undefined) return "–";
  return value >= 1000 ? `${(value / 1000).toFixed(2)} s` : `${Math.round(value)} ms`;
}

function formatTime(iso) {
  if (!iso) return "–";
  return iso.replace("T", " ").replace(/\.\d+/, "").replace(/Z$|\+00:00$/, "");
}

// datetime-local inputs hold "2026-11-25T10:00[:00]" without a zone; the page treats them as UTC.
function toUtcIso(local) {
  if (!local) return "";
  return `${local.length === 16 ? `${local}:00` : local}Z`;
}

function fromUtcIso(iso) {
  return iso ? iso.replace(/Z$|\+00:00$/, "").slice(0, 19) : "";
}

function cell(content, className) {
  return el("td", { className }, content);
}

function emptyRow(table, text) {
  const columns = table.tHead.rows[0].cells.length;
  table.tBodies[0].replaceChildren(el("tr", {}, el("td", { colspan: columns, className: "empty" }, text)));
}

// -- filters ----------------------------------------------------------------------------------------

const form = document.getElementById("filters");

function showFilters() {
  for (const key of FILTER_KEYS) {
    const input = form.elements.namedItem(key);
    const value = state.filters[key] || "";
    input.value = key === "since" || key === "until" ? fromUtcIso(value) : value;
  }
  const parts = [];
  if (state.filters.dag_id) parts.push(`DAG ${state.filters.dag_id}`);
  if (state.filters.run_id) parts.push(`run ${state.filters.run_id}`);
  if (state.filters.task_id) parts.push(`task ${state.filters.task_id}`);
  document.getElementById("scope").textContent = parts.length ? parts.join(" · ") : "All DAGs";
}

function applyFilters(filters) {
  state.filters = filters;
  state.runsOffset = 0;
  state.recordsOffset = 0;
  const query = new URLSearchParams(filters).toString();
  history.replaceState(null, "", query ? `?${query}` : location.pathname);
  showFilters();
  loadAll();
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const filters = {};
  for (const key of FILTER_KEYS) {
    let value = form.elements.namedItem(key).value.trim();
    if (key === "since" || key === "until") value = toUtcIso(value);
    if (value) filters[key] = value;
  }
  applyFilters(filters);
});

document.getElementById("clear-filters").addEventListener("click", () => applyFilters({}));

function fillDatalist(id, values) {
  document.getElementById(id).replaceChildren(...values.map((value) => el("option", { value })));
}

async function loadOptions() {
  const options = await getJSON("options", { dag_id: state.filters.dag_id });
  fillDatalist("dag-options", options.dag_ids);
  fillDatalist("task-options", options.task_ids);
  fillDatalist("model-options", options.models);
  fillDatalist("action-options", options.actions);
}

// -- chain status -----------------------------------------------------------------------------------

async function loadChain() {
  const box = document.getElementById("chain-status");
  const chain = await getJSON("verify");
  // "verified" only when the server could check everything: the keyed hashes and the anchors.
  box.dataset.ok = chain.ok ? "true" : chain.status === "broken" ? "false" : "";
  if (chain.ok) {
    const anchored = chain.newest_anchor_seq == null ? "" : `, anchored up to seq ${integer.format(chain.newest_anchor_seq)}`;
    box.textContent = `Audit chain verified: ${integer.format(chain.records_checked)} records intact${anchored} (checked ${formatTime(chain.checked_at)} UTC)`;
  } else if (chain.status === "broken") {
    box.textContent = `Audit chain BROKEN at seq ${chain.first_bad_seq}: ${chain.problem}`;
  } else {
    box.textContent = `Audit chain not verified: ${chain.problem}`;
  }
}

// -- totals and runs --------------------------------------------------------------------------------

function card(label, value, alert = false) {
  return el("div", { className: alert ? "card alert" : "card" }, el("div", { className: "value" }, value),
    el("div", { className: "label" }, label));
}

function denialText(deniedBy) {
  return deniedBy.map((d) => `${d.rule ?? "no rule grants it"} (${d.action}${d.count > 1 ? ` ×${d.count}` : ""})`).join(", ");
}

async function loadRuns() {
  const page = await getJSON("runs", { ...state.filters, limit: RUNS_PAGE, offset: state.runsOffset });
  const t = page.totals;
  document.getElementById("totals").replaceChildren(
    card("Runs", integer.format(t.runs)),
    card("Model calls", integer.format(t.model_calls)),
    card("Tool calls", integer.format(t.tool_calls)),
    card("Retrievals", integer.format(t.retrievals)),
    card("Denials", integer.format(t.denials), t.denials > 0),
    card("Errors", integer.format(t.errors), t.errors > 0),
    card("Tokens", formatTokens(t.total_tokens)),
    card("Cost", formatUsd(t.cost_usd)),
    card("Model latency avg", formatMs(t.latency_ms_avg)),
  );
  const table = document.getElementById("runs");
  const shownTo = state.runsOffset + page.runs.length;
  document.getElementById("runs-count").textContent = page.runs.length
    ? `${state.runsOffset + 1}–${shownTo} of ${integer.format(t.runs)}` : "";
  document.getElementById("runs-newer").disabled = state.runsOffset === 0;
  document.getElementById("runs-older").disabled = shownTo >= t.runs;
  if (!page.runs.length) {
    emptyRow(table, "No governed activity matches these filters.");
    return;
  }
  table.tBodies[0].replaceChildren(...page.runs.map((run) => el("tr", {
    className: run.denials > 0 ? "clickable denied" : "clickable",
    dataset: { dagId: run.dag_id ?? "", runId: run.run_id ?? "" },
    title: "Show this run only",
    onclick: () => {
      if (run.dag_id === null || run.run_id === null) return;
      applyFilters({ ...state.filters, dag_id: run.dag_id, run_id: run.run_id });
    },
  },
  cell(run.dag_id ?? "(none)", "id"),
  cell(run.run_id ?? "(none)", "id"),
  cell(formatTime(run.last_time)),
  cell(integer.format(run.model_calls), "num"),
  cell(integer.format(run.tool_calls), "num"),
  cell(integer.format(run.retrievals), "num"),
  cell(integer.format(run.denials), "num"),
  cell(denialText(run.denied_by), "reason denied-by"),
  cell(integer.format(run.errors), "num"),
  cell(formatTokens(run.total_tokens), "num"),
  cell(formatUsd(run.cost_usd), "num"),
  cell(`${formatMs(run.latency_ms_p50)} / ${formatMs(run.latency_ms_avg)}`, "num"),
  cell(run.models.join(", ")),
  )));
}

// -- records ----------------------------------------------------------------------------------------

function decisionBadge(decision) {
  const kind = decision === "allow" ? "allow" : decision === "deny" ? "deny" : "na";
  return el("span", { className: `badge ${kind}` }, decision);
}

function recordDetails(record) {
  const reason = record.error ?? "";
  const more = [];
  if (record.content) {
    more.push(el("div", {}, "Content (redacted):"), el("pre", {}, record.content + (record.content_truncated ? " …" : "")));
  }
  if (Object.keys(record.extra).length) more.push(el("div", {}, "Extra:"), el("pre", {}, JSON.stringify(record.extra, null, 2)));
  if (record.prompt_version) more.push(el("div", {}, `Prompt version: ${record.prompt_version}`));
  more.push(el("div", { className: "muted" }, `Try ${record.try_number ?? "–"}, map index ${record.map_index ?? "–"}, hash ${record.hash.slice(0, 16)}…`));
  return [reason, el("details", {}, el("summary", {}, "details"), ...more)];
}

async function loadRecords() {
  const page = await getJSON("records", { ...state.filters, limit: RECORDS_PAGE, offset: state.recordsOffset });
  const table = document.getElementById("records");
  const shownTo = state.recordsOffset + page.records.length;
  document.getElementById("records-count").textContent = page.records.length
    ? `${state.recordsOffset + 1}–${shownTo} of ${integer.format(page.total)}` : "";
  document.getElementById("records-newer").disabled = state.recordsOffset === 0;
  document.getElementById("records-older").disabled = shownTo >= page.total;
  if (!page.records.length) {
    emptyRow(table, "No audit records match these filters.");
    return;
  }
  table.tBodies[0].replaceChildren(...page.records.map((r) => {
    const tokens = r.prompt_tokens === null && r.completion_tokens === null
      ? "–" : formatTokens((r.prompt_tokens ?? 0) + (r.completion_tokens ?? 0));
    return el("tr", {
      className: r.decision === "deny" ? "denied" : undefined,
      dataset: { seq: r.seq, taskId: r.task_id ?? "", action: r.action, decision: r.decision },
    },
    cell(r.seq, "num"),
    cell(formatTime(r.time)),
    cell(r.dag_id ?? "", "id"),
    cell(r.run_id ?? "", "id"),
    cell(r.task_id ?? "", "id"),
    cell(r.action),
    cell(r.resource ?? "", "id"),
    cell(r.model ?? ""),
    cell(decisionBadge(r.decision)),
    cell(r.rule ?? "", "rule"),
    cell(r.outcome),
    cell(tokens, "num"),
    cell(r.cost_usd === null ? "–" : formatUsd(r.cost_usd), "num"),
    cell(formatMs(r.latency_ms), "num"),
    cell(recordDetails(r), "reason"),
    );
  }));
}

// -- spend chart ------------------------------------------------------------------------------------

function spendWindow(bucket) {
  if (state.filters.since || state.filters.until) return { since: state.filters.since, until: state.filters.until, label: "" };
  const days = bucket === "day" ? 30 : 2;
  const since = new Date(Date.now() - days * 86400000);
  since.setUTCMinutes(0, 0, 0);
  if (bucket === "day") since.setUTCHours(0);
  return { since: since.toISOString(), until: undefined, label: `last ${bucket === "day" ? "30 days" : "48 hours"}` };
}

async function loadSpend() {
  const bucket = document.getElementById("spend-bucket").value;
  const span = spendWindow(bucket);
  state.spend = await getJSON("spend", { ...state.filters, since: span.since, until: span.until, bucket });
  document.getElementById("spend-window").textContent = span.label + (state.spend.truncated ? " (oldest points left out)" : "");
  if (!state.metricChosen) {
    // Local and self-hosted models cost nothing: then tokens are the spend worth looking at.
    const cost = state.spend.points.reduce((sum, p) => sum + p.cost_usd, 0);
    document.getElementById("spend-metric").value = cost > 0 ? "cost_usd" : "total_tokens";
  }
  drawSpend();
}

function drawSpend() {
  const box = document.getElementById("spend-chart");
  const series = state.spend;
  const metric = document.getElementById("spend-metric").value;
  if (!series || !series.points.length) {
    box.replaceChildren(el("p", { className: "empty" }, "No model usage in this window."));
    return;
  }
  const buckets = [...new Set(series.points.map((p) => p.bucket))].sort();
  const dags = [...new Set(series.points.map((p) => p.dag_id ?? "(none)"))].sort();
  const color = new Map(dags.map((dag, i) => [dag, PALETTE[i % PALETTE.length]]));
  const stacks = new Map(buckets.map((b) => [b, []]));
  for (const p of series.points) stacks.get(p.bucket).push(p);
  const totalOf = (points) => points.reduce((sum, p) => sum + p[metric], 0);
  const max = Math.max(...[...stacks.values()].map(totalOf));
  if (max <= 0) {
    const what = metric === "cost_usd" ? "cost (the models used may be free: show tokens)" : "tokens";
    box.replaceChildren(el("p", { className: "empty" }, `No ${what} in this window.`));
    return;
  }

  const width = 900, height = 240, left = 70, right = 10, top = 10, bottom = 40;
  const plotW = width - left - right, plotH = height - top - bottom;
  const slot = plotW / buckets.length;
  const barW = Math.max(2, Math.min(48, slot * 0.7));
  const format = metric === "cost_usd" ? formatUsd : formatTokens;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": `Spend per ${series.bucket} and DAG` });
  chart.append(
    svg("line", { class: "axis", x1: left, y1: top + plotH, x2: width - right, y2: top + plotH }),
    svg("line", { class: "axis", x1: left, y1: top, x2: left, y2: top + plotH }),
    svg("text", { x: left - 6, y: top + 10, "text-anchor": "end" }, format(max)),
    svg("text", { x: left - 6, y: top + plotH, "text-anchor": "end" }, format(0)),
  );
  const labelEvery = Math.ceil(buckets.length / 12);
  buckets.forEach((bucket, i) => {
    const x = left + i * slot + (slot - barW) / 2;
    let y = top + plotH;
    for (const p of stacks.get(bucket).sort((a, b) => dags.indexOf(a.dag_id ?? "(none)") - dags.indexOf(b.dag_id ?? "(none)"))) {
      const h = (p[metric] / max) * plotH;
      y -= h;
      chart.append(svg("rect", { x, y, width: barW, height: Math.max(h, p[metric] > 0 ? 1 : 0), fill: color.get(p.dag_id ?? "(none)") },
        svg("title", {}, `${p.dag_id ?? "(none)"} · ${bucket}: ${formatUsd(p.cost_usd)}, ${formatTokens(p.total_tokens)} tokens, ${p.model_calls} model calls`)));
    }
    if (i % labelEvery === 0) {
      chart.append(svg("text", { x: x + barW / 2, y: height - bottom + 16, "text-anchor": "middle" },
        series.bucket === "day" ? bucket.slice(5) : bucket.slice(5).replace("T", " ")));
    }
  });
  const legend = el("div", { className: "legend" }, dags.map((dag) => el("span", {},
    el("span", { className: "swatch", style: `background:${color.get(dag)}` }), dag)));
  box.replaceChildren(chart, legend);
}

document.getElementById("spend-metric").addEventListener("change", () => {
  state.metricChosen = true;
  drawSpend();
});
document.getElementById("spend-bucket").addEventListener("change", () => loadSpend().catch(showError));

// -- budgets ----------------------------------------------------------------------------------------

function meter(used, limit, format) {
  if (limit === null || limit === undefined) return el("span", { className: "muted" }, `${format(used)} (no limit)`);
  const fraction = limit > 0 ? used / limit : 1;
  const level = fraction >= 1 ? "over" : fraction >= 0.8 ? "high" : "";
  return el("span", { className: "meter", title: `${(fraction * 100).toFixed(1)}% used (spent + held)` },
    el("span", { className: "bar" }, el("span", { className: `fill ${level}`, style: `width:${Math.min(100, fraction * 100)}%` })),
    `${format(used)} / ${format(limit)}`);
}

function sparkline(rows) {
  const values = rows.map((r) => Math.max(r.used_tokens_fraction ?? 0, r.used_cost_fraction ?? 0));
  if (values.length < 2) return el("span", { className: "muted" }, "–");
  const width = 120, height = 28, top = Math.max(1, ...values);
  const points = values.map((v, i) => `${(i / (values.length - 1)) * width},${height - (v / top) * (height - 2) - 1}`).join(" ");
  const limitY = height - (1 / top) * (height - 2) - 1;
  return svg("svg", { class: "spark", width, height, viewBox: `0 0 ${width} ${height}` },
    svg("title", {}, rows.map((r, i) => `${r.period}: ${(values[i] * 100).toFixed(0)}%`).join("\n")),
    svg("line", { x1: 0, y1: limitY, x2: width, y2: limitY }),
    svg("polyline", { points }));
}

async function loadBudgets() {
  const table = document.getElementById("budgets");
  let recent, thisRun;
  try {
    [recent, thisRun] = await Promise.all([
      getJSON("budgets", { history: BUDGET_HISTORY }),
      state.filters.run_id ? getJSON("budgets", { period: state.filters.run_id }) : Promise.resolve([]),
    ]);
  } catch (error) {
    // Budgets span DAGs, so they need the audit log of all DAGs: a user who may read only some DAGs
    // still gets the rest of the page.
    if (error instanceof ApiError && error.status === 403) {
      emptyRow(table, "Budgets span DAGs: reading them needs permission to read the audit log of all DAGs.");
      return;
    }
    throw error;
  }
  const byBudget = new Map();
  for (const row of recent) {
    if (!byBudget.has(row.budget)) byBudget.set(row.budget, []);
    byBudget.get(row.budget).push(row);
  }
  const runRows = new Map(thisRun.map((row) => [row.budget, row]));
  if (!byBudget.size && !runRows.size) {
    emptyRow(table, "No budget has been charged yet.");
    return;
  }
  for (const name of runRows.keys()) if (!byBudget.has(name)) byBudget.set(name, []);
  table.tBodies[0].replaceChildren(...[...byBudget.entries()].map(([name, rows]) => {
    // In a run's view, a per-run budget shows that run's period; otherwise the latest period.
    const current = runRows.get(name) ?? rows[rows.length - 1];
    return el("tr", { dataset: { budget: name } },
      cell(name, "id"),
      cell(`${current.period_kind ?? ""} ${current.period}`.trim(), "id"),
      cell(meter(current.spent_tokens + current.reserved_tokens, current.max_tokens, formatTokens)),
      cell(meter(current.spent_cost_usd + current.reserved_cost_usd, current.max_cost_usd, formatUsd)),
      cell(sparkline(rows)),
      cell(current.resets_at ? formatTime(current.resets_at) : "–"),
    );
  }));
}

// -- loading ----------------------------------------------------------------------------------------

function showError(error) {
  const box = document.getElementById("error");
  box.textContent = explain(error);
  box.hidden = false;
  document.body.dataset.state = "error";
}

async function loadAll() {
  document.body.dataset.state = "loading";
  document.getElementById("error").hidden = true;
  const results = await Promise.allSettled([loadRuns(), loadRecords(), loadSpend(), loadBudgets(), loadOptions()]);
  const failed = results.find((r) => r.status === "rejected");
  if (failed) showError(failed.reason);
  else document.body.dataset.state = "ready";
}

function pager(id, key, step, delta) {
  document.getElementById(id).addEventListener("click", () => {
    state[key] = Math.max(0, state[key] + delta * step);
    (key === "runsOffset" ? loadRuns() : loadRecords()).catch(showError);
  });
}

pager("runs-newer", "runsOffset", RUNS_PAGE, -1);
pager("runs-older", "runsOffset", RUNS_PAGE, 1);
pager("records-newer", "recordsOffset", RECORDS_PAGE, -1);
pager("records-older", "recordsOffset", RECORDS_PAGE, 1);

showFilters();
loadAll();
// The chain walk can take a while on a long trail: it reports on its own, without holding up the tables.
loadChain().catch((error) => {
  const box = document.getElementById("chain-status");
  box.dataset.ok = "";
  box.textContent = error instanceof ApiError && error.status === 403
    ? "Audit chain not checked: the chain covers all DAGs, which needs permission to read the audit log of all DAGs."
    : `Audit chain not checked: ${explain(error)}`;
});
