// The chat page: a list of conversations, one conversation's live stream, and a
// composer that starts runs or steers, queues or interrupts the active one.
//
// One WebSocket per open conversation (PROTOCOL.md section 2). It asks for
// `after=<last offset applied>`, so a first load or a reload replays the whole
// conversation and a reconnect resumes exactly where it stopped. Messages typed
// while offline wait in the timeline's outgoing list and go out on reconnect with
// their original client_msg_id; the server's idempotency makes a resend appear once.

import { plainTitle } from "./markdown.js";
import { MessageList } from "./messages.js";
import { Alert, ConnectionBanner, MAX_TEXT_CHARS, api, byId, duration, h, perFrame, plain, replace } from "./page.js";
import { PresenceList } from "./presence.js";
import { LiveSocket } from "./socket.js";
import { Timeline, titleSource } from "./timeline.js";

const CONVERSATION_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;
const TITLES_KEY = "steerway.titles";
const LIST_EVERY_MS = 15000;

const ui = {
  body: document.body,
  list: byId("conversation-list"),
  listError: byId("conversation-list-error"),
  newButton: byId("new-conversation"),
  toggle: byId("sidebar-toggle"),
  scrim: byId("scrim"),
  title: byId("conversation-title"),
  status: byId("run-status"),
  messages: byId("messages"),
  form: byId("composer"),
  input: byId("composer-input"),
  modeGroup: byId("mode-group"),
  send: byId("send"),
  stop: byId("stop"),
  hint: byId("composer-hint"),
  presence: byId("presence"),
  typing: byId("typing"),
};

const TYPING_EVERY_MS = 2000; // typing is said again this often (the server lapses it after 6 s)

const state = {
  cid: null,
  timeline: null,
  socket: null,
  known: [], // the server's conversation listing
  resendTimer: null,
  resendDelay: 1000,
  wasActive: false,
  titleSource: null, // the open conversation's timeline.title, last drawn
  title: "", // and its plainTitle
  presence: new PresenceList(),
  typingSent: 0, // when we last said we are typing; 0: we are watching
};

const view = new MessageList(ui.messages, { onRetry: retry });
const alertLine = new Alert();
const banner = new ConnectionBanner({
  note: "Messages you send now go out when the connection is back.",
  onRetry: () => state.socket.retryNow(),
});
const draw = perFrame(render);

// --------------------------------------------------------------------------- conversations

function newConversationId() {
  const rand = crypto.getRandomValues(new Uint32Array(1))[0].toString(36);
  return `c-${Date.now().toString(36)}-${rand}`;
}

function hashId() {
  return decodeURIComponent(location.hash.slice(1));
}

function titles() {
  try {
    return JSON.parse(localStorage.getItem(TITLES_KEY) || "{}");
  } catch {
    return {};
  }
}

function remember(cid, title) {
  const all = titles();
  if (all[cid] === title) return;
  all[cid] = title;
  try {
    localStorage.setItem(TITLES_KEY, JSON.stringify(all));
  } catch {
    // storage full or disabled: titles are a convenience
  }
}

function open(cid) {
  if (!CONVERSATION_ID.test(cid)) {
    if (cid) alertLine.show("That address doesn't name a valid conversation, so a new one was started.");
    cid = newConversationId();
  }
  if (location.hash.slice(1) !== cid) history.replaceState(null, "", `#${cid}`);
  if (state.cid === cid) return;
  if (state.socket) state.socket.stop();
  clearTimeout(state.resendTimer);
  state.cid = cid;
  state.timeline = new Timeline(cid);
  state.titleSource = null;
  state.title = "";
  state.resendDelay = 1000;
  state.presence.reset(null);
  state.typingSent = 0;
  const timeline = state.timeline;
  state.socket = new LiveSocket({
    url: () => `/ws/conversations/${encodeURIComponent(cid)}?after=${timeline.lastOffset}&client=web&presence=1`,
    onFrame: (frame) => onFrame(timeline, frame),
    onStatus: (status) => banner.update(status),
  });
  state.socket.start();
  closeSidebar();
  renderList();
  draw();
}

async function loadConversations() {
  try {
    const data = await api("/api/conversations?limit=50");
    state.known = data.conversations;
    ui.listError.hidden = true;
  } catch (error) {
    replace(ui.listError, `Couldn't load your conversations. ${error.message} `,
      h("button", { type: "button", class: "link-button", onclick: loadConversations }, "Retry"));
    ui.listError.hidden = false;
  }
  renderList();
}

const refreshList = debounce(loadConversations, 400);

function renderList() {
  const names = titles();
  const items = state.known.filter((c) => c.conversation_id !== state.cid);
  const current = state.known.find((c) => c.conversation_id === state.cid) ||
    { conversation_id: state.cid, active_run: null, last_activity: null };
  const rows = [current, ...items].map((c) => {
    const cid = c.conversation_id;
    // Titles kept by earlier versions are a raw first line: shown the same way.
    const source = names[cid] || (cid === state.cid && state.timeline.title);
    const title = (source && plainTitle(source)) || (c.head ? cid : "New conversation");
    const active = cid === state.cid ? Boolean(state.timeline.activeRunId) : Boolean(c.active_run);
    const when = c.last_activity ? `${duration(Date.now() - c.last_activity)} ago` : "not started";
    return h("li", {},
      h("a", { href: `#${cid}`, class: "conversation", "aria-current": cid === state.cid ? "page" : null, dataset: { cid } },
        h("span", { class: "conversation-title" }, title),
        h("span", { class: "conversation-sub" }, active ? "● running" : when)));
  });
  replace(ui.list, rows);
}

// --------------------------------------------------------------------------- frames

function onFrame(timeline, frame) {
  if (timeline !== state.timeline) return;
  switch (frame.type) {
    case "ready":
      state.presence.reset(frame.session_id);
      state.typingSent = 0;
      if (!timeline.ready(frame)) {
        timeline.reset(); // the server is behind our cursor (its store was reset)
        state.socket.restart();
        break;
      }
      flush();
      break;
    case "ack":
      timeline.ack(frame);
      state.resendDelay = 1000;
      break;
    case "error":
      onError(timeline, frame);
      break;
    case "pong":
      break;
    case "presence":
      state.presence.apply(frame);
      break;
    default:
      if (typeof frame.offset === "number") {
        const wasActive = timeline.activeRunId;
        timeline.event(frame);
        if (frame.type === "run.started" || frame.type === "run.ended") refreshList();
        if (!wasActive && timeline.activeRunId) resetMode();
      }
  }
  draw();
}

function onError(timeline, frame) {
  if (frame.code === "rate_limited") {
    // The refused frame is not named; every unanswered message is sent again later,
    // and the server's idempotency keys make the ones it did take appear once.
    alertLine.show(plain("rate_limited"));
    clearTimeout(state.resendTimer);
    state.resendTimer = setTimeout(flush, state.resendDelay);
    state.resendDelay = Math.min(state.resendDelay * 2, 16000);
    return;
  }
  timeline.refuse(frame);
  alertLine.show(plain(frame.code, frame.message));
}

/** Send every message not yet answered, in order, with its original client_msg_id. */
function flush() {
  const { timeline, socket } = state;
  for (const frame of timeline.pending()) {
    timeline.sending(frame.client_msg_id, socket.send(frame));
  }
  draw();
}

function retry(clientMsgId) {
  const frame = state.timeline.retry(clientMsgId);
  if (frame) state.timeline.sending(frame.client_msg_id, state.socket.send(frame));
  alertLine.hide();
  draw();
}

// --------------------------------------------------------------------------- rendering

function render() {
  const { timeline } = state;
  view.draw(timeline);
  if (timeline.title !== state.titleSource) {
    state.titleSource = timeline.title;
    state.title = timeline.title ? plainTitle(timeline.title) : "";
    if (timeline.title) remember(state.cid, timeline.title);
  }
  ui.title.textContent = state.title || "New conversation";
  document.title = state.title ? `${state.title} · Steerway` : "Steerway";
  const { active, queued, last } = timeline.status();
  ui.status.dataset.status = active ? active.status : last ? last.status : "idle";
  ui.status.textContent = statusText(active, queued, last);
  const running = Boolean(active);
  ui.modeGroup.hidden = !running;
  ui.stop.hidden = !running;
  const mode = running ? selectedMode() : "auto";
  ui.send.textContent = { auto: "Send", steer: "Steer", queue: "Queue", interrupt: "Interrupt" }[mode];
  ui.input.placeholder = running ? PLACEHOLDERS[mode] : "Message the agent";
  ui.hint.textContent = running ? `${HINTS[mode]} · Shift+Enter for a new line` : "Enter to send · Shift+Enter for a new line";
  ui.presence.textContent = state.presence.hereText(running);
  ui.typing.textContent = state.presence.typingText();
  if (running !== state.wasActive) {
    state.wasActive = running;
    renderList();
  }
}

const PLACEHOLDERS = {
  steer: "The agent is writing. Steer it…",
  queue: "The agent is writing. Queue a message for after this run…",
  interrupt: "The agent is writing. Interrupt it with…",
};

const HINTS = {
  steer: "A run is active: Enter steers it (the agent reads your message at its next step)",
  queue: "A run is active: Enter queues your message to run after it",
  interrupt: "A run is active: Enter stops it and starts a new run",
};

function statusText(active, queued, last) {
  const more = queued ? ` · ${queued} queued` : "";
  if (active) return `${active.status === "running" ? "Running" : "Queued"} · ${active.runner || "agent"}${more}`;
  if (!last) return "Idle";
  const words = { completed: "Completed", failed: "Failed", cancelled: "Stopped", timeout: "Timed out" };
  return `${words[last.status] || last.status}${more}`;
}

function selectedMode() {
  const checked = ui.form.querySelector('input[name="mode"]:checked');
  return checked ? checked.value : "steer";
}

function resetMode() {
  ui.form.querySelector('input[name="mode"][value="steer"]').checked = true;
}

// --------------------------------------------------------------------------- composer

function submit() {
  const text = ui.input.value;
  if (!text.trim()) return;
  const chars = [...text].length;
  if (chars > MAX_TEXT_CHARS) {
    alertLine.show(`${plain("text_too_long")} Yours has ${chars.toLocaleString("en")}.`);
    return;
  }
  alertLine.hide();
  const { timeline, socket } = state;
  const frame = timeline.compose(text, timeline.activeRunId ? selectedMode() : "auto");
  if (!timeline.title) remember(state.cid, titleSource(text));
  timeline.sending(frame.client_msg_id, socket.send(frame));
  state.typingSent = 0; // the server ends our typing when the message arrives
  ui.input.value = "";
  autosize();
  view.scrollToEnd();
  draw();
}

/** Tell the others we are typing (again every TYPING_EVERY_MS), or that we stopped. */
function sayTyping() {
  const typing = ui.input.value.trim() !== "";
  const now = Date.now();
  if (typing && now - state.typingSent >= TYPING_EVERY_MS) {
    if (state.socket.send({ type: "presence", state: "typing" })) state.typingSent = now;
  } else if (!typing && state.typingSent) {
    state.socket.send({ type: "presence", state: "watching" });
    state.typingSent = 0;
  }
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
}

function stopRun() {
  const runId = state.timeline.activeRunId;
  if (!runId) return;
  if (!state.socket.send({ type: "cancel", run_id: runId })) {
    alertLine.show("You're offline, so the run can't be stopped yet. Try again when the connection is back.");
  }
}

// --------------------------------------------------------------------------- sidebar

function openSidebar() {
  ui.body.classList.add("sidebar-open");
  ui.toggle.setAttribute("aria-expanded", "true");
  ui.scrim.hidden = false;
  const first = ui.list.querySelector("a") || ui.newButton;
  first.focus();
}

function closeSidebar() {
  if (!ui.body.classList.contains("sidebar-open")) return;
  ui.body.classList.remove("sidebar-open");
  ui.toggle.setAttribute("aria-expanded", "false");
  ui.scrim.hidden = true;
}

function debounce(fn, ms) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}

// --------------------------------------------------------------------------- start

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    submit();
  }
});
ui.input.addEventListener("input", () => {
  autosize();
  sayTyping();
});
ui.modeGroup.addEventListener("change", draw);
ui.stop.addEventListener("click", stopRun);
ui.newButton.addEventListener("click", () => {
  location.hash = newConversationId(); // a history entry: Back returns to the last one
  ui.input.focus();
});
ui.toggle.addEventListener("click", () => {
  if (ui.body.classList.contains("sidebar-open")) closeSidebar();
  else openSidebar();
});
ui.scrim.addEventListener("click", closeSidebar);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape") closeSidebar();
});
window.addEventListener("hashchange", () => open(hashId()));
window.addEventListener("error", (event) => alertLine.show(`Something went wrong on this page: ${event.message}. Reload to continue.`));

open(hashId());
loadConversations();
setInterval(() => {
  if (document.visibilityState === "visible") loadConversations();
}, LIST_EVERY_MS);
ui.input.focus();
