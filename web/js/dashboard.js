// The runs dashboard: `GET /ws/dashboard` (PROTOCOL.md section 9) drawn as live
// tables and charts. A snapshot sets everything; `run.updated`,
// `conversation.updated` and `clients.updated` change it, `nodes.updated` gives every
// node's figures (a cluster's nodes, or this one); a reconnect starts again from a new
// snapshot. Events per second are the growth of conversation heads (each
// event is one offset); active runs are the runs whose status is running, and its
// chart shows, for each second, the most that were running at once in it.

import { PeakPerSecond, Sparkline } from "./charts.js";
import { Alert, ConnectionBanner, api, byId, drawState, drawTool, duration, folded, h, perFrame, plain, replace } from "./page.js";
import { LiveSocket } from "./socket.js";

const MAX_ROWS = 500;
const EVENT_PAGE = 5000;
const MAX_DETAIL_EVENTS = 2000;
const LIVE = new Set(["queued", "running"]);

const ui = {
  node: byId("node"),
  live: byId("live"),
  statusFilter: byId("status-filter"),
  conversationFilter: byId("conversation-filter"),
  runsBody: byId("runs-body"),
  runsEmpty: byId("runs-empty"),
  conversationsBody: byId("conversations-body"),
  nodesBody: byId("nodes-body"),
  activeValue: byId("active-value"),
  rateValue: byId("rate-value"),
  clientsValue: byId("clients-value"),
  waitingValue: byId("waiting-value"),
  detail: byId("run-detail"),
  detailHeading: byId("detail-heading"),
  detailFields: byId("detail-fields"),
  detailEvents: byId("detail-events"),
  detailCount: byId("detail-count"),
  detailFolded: byId("detail-folded"),
  detailTools: byId("detail-tools"),
};

const state = {
  runs: new Map(),
  conversations: new Map(),
  clients: new Map(),
  people: new Map(), // conversation_id -> its people (presence), as the node last said
  node: null,
  nodes: [], // every node's figures, by name
  nodeRows: new Map(), // name -> <tr>
  events: 0, // events appended since the last chart tick
  running: 0, // runs whose status is running
  peaks: new PeakPerSecond(Date.now()), // of `running`, per second
  rows: new Map(), // run_id -> <tr>
  conversationRows: new Map(),
  detail: null, // {runId, after, count, folded, loading, again}
};

const alertLine = new Alert();
const banner = new ConnectionBanner({ onRetry: () => socket.retryNow() });
const activeChart = new Sparkline(byId("active-chart"), { label: "Active runs" });
const rateChart = new Sparkline(byId("rate-chart"), { label: "Events per second" });
const draw = perFrame(render);

const socket = new LiveSocket({
  url: () => "/ws/dashboard",
  onFrame,
  onStatus: (status) => {
    banner.update(status);
    ui.live.textContent = status.state === "open" ? "Live" : status.state === "closed" ? "Stopped" : "Reconnecting…";
    ui.live.dataset.state = status.state;
  },
});

// --------------------------------------------------------------------------- frames

function onFrame(frame) {
  switch (frame.type) {
    case "snapshot":
      state.runs = new Map(frame.runs.map((run) => [run.run_id, run]));
      state.conversations = new Map(frame.conversations.map((c) => [c.conversation_id, c]));
      state.clients = new Map(Object.entries(frame.clients));
      state.people = new Map(Object.entries(frame.presence || {}));
      state.node = frame.node;
      state.nodes = frame.nodes || [frame.node];
      state.running = countRunning();
      state.peaks.set(state.running, Date.now());
      break;
    case "run.updated":
      runUpdated(frame.run);
      if (state.detail && state.detail.runId === frame.run.run_id) showDetail(frame.run.run_id);
      break;
    case "conversation.updated": {
      const c = frame.conversation;
      const before = state.conversations.get(c.conversation_id);
      state.events += Math.max(0, c.head - (before ? before.head : 0));
      state.conversations.set(c.conversation_id, c);
      const open = state.detail && state.runs.get(state.detail.runId);
      if (open && open.conversation_id === c.conversation_id) loadEvents();
      break;
    }
    case "nodes.updated":
      state.nodes = frame.nodes;
      break;
    case "clients.updated":
      if (frame.count > 0) state.clients.set(frame.conversation_id, frame.count);
      else state.clients.delete(frame.conversation_id);
      break;
    case "presence.updated":
      if (frame.people.length) state.people.set(frame.conversation_id, frame.people);
      else state.people.delete(frame.conversation_id);
      break;
    case "error":
      alertLine.show(plain(frame.code, frame.message));
      break;
    default:
      return; // pong, or a frame type this page does not know
  }
  draw();
}

/** Keep the running count, and each second's peak of it, at every change of a run. */
function runUpdated(run) {
  const before = state.runs.get(run.run_id);
  state.runs.set(run.run_id, run);
  const was = Boolean(before) && before.status === "running";
  const is = run.status === "running";
  if (was !== is) {
    state.running += is ? 1 : -1;
    state.peaks.set(state.running, Date.now());
  } else if (!is && run.started_at && !LIVE.has(run.status) && (!before || LIVE.has(before.status))) {
    // It started and ended within one stored batch: running for a moment unseen.
    state.peaks.blip(state.running + 1, Date.now());
  }
}

// --------------------------------------------------------------------------- runs table

function visibleRuns() {
  const status = ui.statusFilter.value;
  const needle = ui.conversationFilter.value.trim().toLowerCase();
  const out = [];
  for (const run of [...state.runs.values()].sort((a, b) => (a.run_id < b.run_id ? 1 : -1))) {
    if (status === "active" ? !LIVE.has(run.status) : status && run.status !== status) continue;
    if (needle && !run.conversation_id.toLowerCase().includes(needle)) continue;
    out.push(run);
    if (out.length >= MAX_ROWS) break;
  }
  return out;
}

function runRow(run) {
  let row = state.rows.get(run.run_id);
  if (!row) {
    row = h("tr", { dataset: { runId: run.run_id } });
    for (let i = 0; i < 10; i += 1) row.append(h("td"));
    const [, id, , conversation, , , , , node] = row.children;
    node.className = "mono";
    id.append(h("button", { type: "button", class: "link-button mono", "aria-label": `Open run ${run.run_id}`, title: run.run_id, onclick: () => showDetail(run.run_id) }, shortId(run.run_id)));
    conversation.append(h("a", { href: `/#${encodeURIComponent(run.conversation_id)}`, class: "mono" }, run.conversation_id));
    state.rows.set(run.run_id, row);
  }
  const now = Date.now();
  const cells = row.children;
  row.dataset.status = run.status;
  setText(cells[0], run.reason && !LIVE.has(run.status) ? `${run.status} · ${run.reason}` : run.status);
  cells[0].className = `status status-${run.status}`;
  setText(cells[2], run.runner);
  setText(cells[4], duration(now - run.created_at));
  setText(cells[5], run.started_at ? duration((run.ended_at || now) - run.started_at) : run.status === "queued" ? "waiting" : "—");
  const s = run.steering || { queued: 0, absorbed: 0, dropped: 0 };
  setText(cells[6], `${s.queued} / ${s.absorbed} / ${s.dropped}`);
  cells[6].setAttribute("aria-label", `${s.queued} waiting, ${s.absorbed} absorbed, ${s.dropped} dropped`);
  setText(cells[7], usage(run.usage));
  setText(cells[8], run.node || "—");
  const action = cells[9];
  if (LIVE.has(run.status) && !action.firstChild) {
    action.append(h("button", { type: "button", class: "button small danger", "aria-label": `Cancel run ${run.run_id}`, onclick: (event) => cancel(run.run_id, event.currentTarget) }, "Cancel"));
  } else if (!LIVE.has(run.status) && action.firstChild) {
    action.replaceChildren();
  }
  return row;
}

/** Put `rows` in `body` in order, moving only the rows out of place (focus stays). */
function order(body, rows) {
  let cursor = body.firstChild;
  for (const row of rows) {
    if (row === cursor) {
      cursor = cursor.nextSibling;
    } else {
      body.insertBefore(row, cursor);
    }
  }
  while (cursor) {
    const next = cursor.nextSibling;
    cursor.remove();
    cursor = next;
  }
}

async function cancel(runId, button) {
  button.disabled = true;
  button.textContent = "Cancelling…";
  try {
    await api(`/api/runs/${encodeURIComponent(runId)}/cancel`, { method: "POST" });
  } catch (error) {
    alertLine.show(`Couldn't cancel run ${shortId(runId)}: ${error.message}`);
    button.disabled = false;
    button.textContent = "Cancel";
  }
}

// --------------------------------------------------------------------------- conversations

function conversationRow(c) {
  let row = state.conversationRows.get(c.conversation_id);
  if (!row) {
    row = h("tr", { dataset: { cid: c.conversation_id } },
      h("td", {}, h("a", { href: `/#${encodeURIComponent(c.conversation_id)}`, class: "mono" }, c.conversation_id)),
      h("td", { class: "clients" }), h("td", { class: "people" }), h("td"), h("td"), h("td"));
    state.conversationRows.set(c.conversation_id, row);
  }
  const cells = row.children;
  setText(cells[1], String(state.clients.get(c.conversation_id) || 0));
  setText(cells[2], peopleText(state.people.get(c.conversation_id) || [], Boolean(c.active_run)));
  setText(cells[3], c.active_run ? `${c.active_run.status} · ${c.active_run.runner}` : "—");
  setText(cells[4], String(c.head));
  setText(cells[5], c.last_activity ? `${duration(Date.now() - c.last_activity)} ago` : "—");
  return row;
}

/** "alice (typing), bob (steering)": one entry per user, however many tabs. */
function peopleText(people, running) {
  const users = new Map();
  for (const p of people) {
    const u = users.get(p.user) || new Set();
    if (p.state === "typing") u.add("typing");
    if (running && p.steering) u.add("steering");
    users.set(p.user, u);
  }
  if (!users.size) return "—";
  return [...users].map(([user, marks]) => (marks.size ? `${user} (${[...marks].join(", ")})` : user)).join(", ");
}

function visibleConversations() {
  for (const cid of [...state.clients.keys(), ...state.people.keys()]) {
    if (!state.conversations.has(cid)) {
      state.conversations.set(cid, { conversation_id: cid, head: 0, last_activity: null, active_run: null });
    }
  }
  return [...state.conversations.values()]
    .sort((a, b) => (b.last_activity || 0) - (a.last_activity || 0))
    .slice(0, MAX_ROWS);
}

// --------------------------------------------------------------------------- nodes

function nodeRow(n) {
  let row = state.nodeRows.get(n.name);
  if (!row) {
    row = h("tr", { dataset: { node: n.name } }, h("th", { scope: "row", class: "mono" }, n.name), h("td"), h("td"), h("td"), h("td"), h("td"));
    state.nodeRows.set(n.name, row);
  }
  const cells = row.children;
  setText(cells[1], String(n.runs));
  setText(cells[2], String(n.clients));
  setText(cells[3], String(Math.round(n.events_per_s)));
  setText(cells[4], String(n.conversations));
  setText(cells[5], duration(Date.now() - n.started_at));
  return row;
}

function visibleNodes() {
  const names = new Set(state.nodes.map((n) => n.name));
  for (const name of state.nodeRows.keys()) if (!names.has(name)) state.nodeRows.delete(name);
  return state.nodes.map(nodeRow);
}

// --------------------------------------------------------------------------- run detail

function showDetail(runId) {
  const run = state.runs.get(runId);
  if (!run) return;
  if (!state.detail || state.detail.runId !== runId) {
    state.detail = { runId, after: 0, count: 0, folded: new Map(), loading: false, again: false };
    replace(ui.detailEvents);
    replace(ui.detailTools);
    ui.detailFolded.hidden = true;
    ui.detailCount.textContent = "";
  }
  ui.detailHeading.textContent = `Run ${run.run_id}`;
  const s = run.steering || {};
  const fields = [
    ["Status", run.reason ? `${run.status} (${run.reason})` : run.status],
    ["Runner", run.runner],
    ["Conversation", run.conversation_id],
    ["Node", run.node || "unknown"],
    ["Created", new Date(run.created_at).toLocaleString()],
    ["Started", run.started_at ? new Date(run.started_at).toLocaleString() : "not yet"],
    ["Ended", run.ended_at ? new Date(run.ended_at).toLocaleString() : "not yet"],
    ["Steering", `${s.queued || 0} waiting, ${s.absorbed || 0} absorbed, ${s.dropped || 0} dropped`],
    ["Usage", usage(run.usage)],
    ["Error", run.error ? `${run.error.code}: ${run.error.message}` : "none"],
  ];
  replace(ui.detailFields, fields.map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]));
  if (!ui.detail.open) ui.detail.showModal();
  loadEvents();
}

/** Read the run's events page by page from where the last read stopped. */
async function loadEvents() {
  const detail = state.detail;
  if (!detail) return;
  if (detail.loading) {
    detail.again = true;
    return;
  }
  const run = state.runs.get(detail.runId);
  detail.loading = true;
  try {
    for (let page = 0; page < 50; page += 1) {
      const data = await api(`/api/conversations/${encodeURIComponent(run.conversation_id)}/events?after=${detail.after}&limit=${EVENT_PAGE}`);
      if (state.detail !== detail) return;
      for (const e of data.events) {
        detail.after = e.offset;
        if (!concerns(e, detail.runId)) continue;
        if (FOLDED.has(e.type)) fold(detail, e);
        if (detail.count >= MAX_DETAIL_EVENTS) continue;
        detail.count += 1;
        ui.detailEvents.append(h("li", { dataset: { type: e.type } },
          h("span", { class: "offset mono" }, `#${e.offset}`), " ",
          h("span", { class: "type" }, e.type), " ",
          h("span", { class: "summary" }, summary(e, detail.runId))));
      }
      ui.detailCount.textContent = `(${detail.count})`;
      if (data.events.length < EVENT_PAGE) break;
    }
  } catch (error) {
    alertLine.show(`Couldn't load the run's events: ${error.message}`);
  } finally {
    detail.loading = false;
  }
  if (detail.again && state.detail === detail) {
    detail.again = false;
    loadEvents();
  }
}

const FOLDED = new Set(["tool.call.started", "tool.call.completed", "state.updated"]);

/** The run's tool calls and the latest value of each state key, as folded entries
 * drawn as the chat draws them (one per call, one per key, updated in place). */
function fold(detail, e) {
  const isState = e.type === "state.updated";
  const key = isState ? `s:${e.scope}.${e.key}` : `t:${e.tool_call_id}`;
  let entry = detail.folded.get(key);
  if (!entry) {
    if (detail.folded.size >= MAX_DETAIL_EVENTS) return;
    entry = { item: { name: isState ? `${e.scope}.${e.key}` : e.name, done: false }, node: folded(isState ? "state" : "tool") };
    detail.folded.set(key, entry);
    ui.detailTools.append(entry.node);
    ui.detailFolded.hidden = false;
  }
  const { item, node } = entry;
  if (isState) {
    item.value = e.value;
    drawState(node, item);
  } else {
    if (e.type === "tool.call.started") item.args = e.arguments;
    else Object.assign(item, { done: true, result: e.result, error: e.error });
    drawTool(node, item);
  }
}

/** An event of this run, or a queue.updated that moved it (it has no run_id). */
function concerns(e, runId) {
  if (e.type === "queue.updated") return (e.runs || []).some((r) => r.run_id === runId);
  return e.run_id === runId;
}

function summary(e, runId) {
  switch (e.type) {
    case "queue.updated": {
      const mine = (e.runs || []).find((r) => r.run_id === runId);
      return mine ? `now position ${mine.position} of ${e.runs.length} queued` : `${e.runs.length} queued`;
    }
    case "user.message": return `${e.route}: ${clip(e.text)}`;
    case "message.delta": return JSON.stringify(e.delta);
    case "message.completed": return clip(e.message.content);
    case "run.started": case "run.queued": return `runner ${e.runner}, triggers ${e.trigger_message_ids.length}`;
    case "run.ended": return e.error ? `${e.status} (${e.reason}): ${e.error.message}` : `${e.status} (${e.reason})`;
    case "steering.absorbed": return `${e.message_ids.length} message(s)`;
    case "steering.dropped": return `${e.message_ids.length} message(s), ${e.reason}`;
    case "tool.call.started": return `${e.name}(${clip(JSON.stringify(e.arguments ?? null))})`;
    case "tool.call.completed":
      return "error" in e ? `${e.name} failed: ${clip(JSON.stringify(e.error))}` : `${e.name} → ${clip(JSON.stringify(e.result ?? null))}`;
    case "state.updated": return `${e.scope}.${e.key} = ${clip(JSON.stringify(e.value))}`;
    default: return "";
  }
}

// --------------------------------------------------------------------------- drawing

function render() {
  const runs = visibleRuns();
  order(ui.runsBody, runs.map(runRow));
  ui.runsEmpty.hidden = runs.length > 0;
  ui.runsEmpty.textContent = state.runs.size ? "No runs match these filters." : "No runs yet.";
  order(ui.conversationsBody, visibleConversations().map(conversationRow));
  order(ui.nodesBody, visibleNodes());
  let waiting = 0;
  for (const run of state.runs.values()) if (LIVE.has(run.status)) waiting += (run.steering && run.steering.queued) || 0;
  ui.activeValue.textContent = String(state.running);
  ui.clientsValue.textContent = String([...state.clients.values()].reduce((a, b) => a + b, 0));
  ui.waitingValue.textContent = String(waiting);
  if (state.node) ui.node.textContent = `${state.node.name} · up ${duration(Date.now() - state.node.started_at)}`;
}

function countRunning() {
  let n = 0;
  for (const run of state.runs.values()) if (run.status === "running") n += 1;
  return n;
}

/** Once a second, just after the second turns, so each tick closes one whole second. */
function tick() {
  setTimeout(tick, 1000 - (Date.now() % 1000) + 20);
  rateChart.push([state.events]);
  ui.rateValue.textContent = String(state.events);
  state.events = 0;
  activeChart.push(state.peaks.take(Date.now()), state.running);
  render(); // ages and durations move on
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function shortId(id) {
  return id.length > 14 ? `${id.slice(0, 4)}…${id.slice(-8)}` : id;
}

function clip(text) {
  return text.length > 120 ? `${text.slice(0, 120)}…` : text;
}

function usage(value) {
  if (!value) return "—";
  const parts = Object.entries(value).filter(([, v]) => typeof v === "number").map(([k, v]) => `${k.replace(/_tokens$/, "")} ${v}`);
  return parts.length ? parts.join(" · ") : JSON.stringify(value).slice(0, 60);
}

// --------------------------------------------------------------------------- webhooks

const WEBHOOKS_EVERY_MS = 5000;

/** Each endpoint's last deliveries and those given up (`GET /api/webhooks`, admin). */
async function loadWebhooks() {
  let data;
  try {
    data = await api("/api/webhooks");
  } catch (error) {
    if (error.status !== 401 && error.status !== 403) alertLine.show(`Couldn't load the webhooks: ${error.message}`);
    return;
  }
  const box = byId("webhooks");
  byId("webhooks-empty").hidden = data.endpoints.length > 0;
  replace(box, ...data.endpoints.map((endpoint) => h("div", { class: "webhook", dataset: { endpoint: endpoint.name } },
    h("h3", {}, endpoint.name, " ", h("span", { class: "mono count" }, endpoint.url)),
    h("p", { class: "count" }, `Events: ${endpoint.events.join(", ")}`),
    deliveriesTable(`Last deliveries to ${endpoint.name}`, endpoint.deliveries, "deliveries"),
    endpoint.failures.length
      ? deliveriesTable(`Deliveries to ${endpoint.name} given up`, endpoint.failures, "failures")
      : h("p", { class: "empty failures" }, "No delivery given up."))));
}

function deliveriesTable(caption, deliveries, kind) {
  if (!deliveries.length) return h("p", { class: `empty ${kind}` }, "No deliveries yet.");
  return h("div", { class: "table-wrap" }, h("table", { class: kind },
    h("caption", { class: "visually-hidden" }, caption),
    h("thead", {}, h("tr", {}, ...["Status", "Event", "Conversation", "Offset", "Tries", "Last error", "Created", ""]
      .map((name) => h("th", { scope: "col" }, name)))),
    h("tbody", {}, ...deliveries.map((d) => h("tr", { dataset: { deliveryId: d.delivery_id } },
      h("td", { class: `status status-${d.status}` }, d.status),
      h("td", {}, d.type),
      h("td", { class: "mono" }, d.conversation_id),
      h("td", {}, String(d.offset)),
      h("td", {}, String(d.attempts)),
      h("td", {}, d.last_error || "—"),
      h("td", {}, `${duration(Date.now() - d.created)} ago`),
      h("td", {}, d.status === "pending" ? "" : h("button", {
        type: "button",
        class: "link-button",
        "aria-label": `Replay ${d.type} of ${d.conversation_id} at ${d.offset}`,
        onclick: (event) => replay(d.delivery_id, event.currentTarget),
      }, "Replay")))))));
}

async function replay(deliveryId, button) {
  button.disabled = true;
  button.textContent = "Replaying…";
  try {
    await api(`/api/webhooks/deliveries/${encodeURIComponent(deliveryId)}/replay`, { method: "POST" });
  } catch (error) {
    alertLine.show(`Couldn't replay delivery ${deliveryId}: ${error.message}`);
  }
  await loadWebhooks();
}

function pollWebhooks() {
  setTimeout(pollWebhooks, WEBHOOKS_EVERY_MS);
  if (document.visibilityState !== "hidden") loadWebhooks();
}

// --------------------------------------------------------------------------- start

ui.statusFilter.addEventListener("change", draw);
ui.conversationFilter.addEventListener("input", draw);
byId("filters").addEventListener("submit", (event) => event.preventDefault());
byId("detail-close").addEventListener("click", () => ui.detail.close());
ui.detail.addEventListener("close", () => {
  state.detail = null;
});
window.addEventListener("error", (event) => alertLine.show(`Something went wrong on this page: ${event.message}. Reload to continue.`));

byId("webhooks-refresh").addEventListener("click", loadWebhooks);
socket.start();
pollWebhooks();
setTimeout(tick, 1000 - (Date.now() % 1000) + 20);
