// What both pages share: DOM helpers, folded tool calls and state, REST calls, every
// error in plain words, the offline banner and the alert line.
//
// Text always goes into the page as text nodes (never as HTML), so nothing a
// message or a run document holds can become markup. The gateway's error codes
// (PROTOCOL.md sections 3 and 8) and the ways a request can fail are turned into
// sentences a person can act on; nothing is left as a console-only error.

// --------------------------------------------------------------------------- DOM

/**
 * Create an element: h("button", {class: "x", onclick: f, "aria-label": "Stop"}, "Stop").
 * Attributes whose value is null, undefined or false are left out; `on*` functions
 * become event listeners; children may be strings, nodes, arrays or null.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

/** Append children (strings become text nodes; arrays are flattened; null skipped). */
export function append(parent, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    parent.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return parent;
}

/** Replace an element's children. */
export function replace(parent, ...children) {
  parent.replaceChildren();
  return append(parent, children);
}

/** The element of an id; throws at start-up when the page lacks it, not later. */
export function byId(id) {
  const el = document.getElementById(id);
  if (!el) throw new Error(`the page has no #${id}`);
  return el;
}

// A run's tool calls and state values are folded entries on both pages (the chat's
// message list, the dashboard's run detail): closed until opened, so a long result does
// not push the conversation away.

/** An empty folded entry of `kind` ("tool" or "state"): a summary and its JSON. */
export function folded(kind) {
  return h("details", { class: `${kind} folded` }, h("summary"), h("pre", { class: "tool-io" }));
}

/** A tool call {name, args, done, result, error}: `Tool <name>: running… | done | failed`. */
export function drawTool(node, item) {
  const failed = item.error !== undefined && item.error !== null;
  node.querySelector("summary").textContent = `Tool ${item.name}: ${item.done ? (failed ? "failed" : "done") : "running…"}`;
  const io = { arguments: item.args };
  if (item.done) io[failed ? "error" : "result"] = failed ? item.error : item.result;
  node.querySelector(".tool-io").textContent = JSON.stringify(io, null, 2);
}

/** The latest value {name, value} of one state key (`scope.key`). */
export function drawState(node, item) {
  node.querySelector("summary").textContent = `State ${item.name}`;
  node.querySelector(".tool-io").textContent = JSON.stringify(item.value, null, 2);
}

/** "3 s", "4 min 05 s", "2 h 10 min": a duration in milliseconds, for people. */
export function duration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(s % 60).padStart(2, "0")} s`;
  const hours = Math.floor(m / 60);
  if (hours < 48) return `${hours} h ${String(m % 60).padStart(2, "0")} min`;
  return `${Math.floor(hours / 24)} d`;
}

/** Run a function at most once per animation frame, however often it is asked for. */
export function perFrame(fn) {
  let pending = false;
  return () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      fn();
    });
  };
}

// --------------------------------------------------------------------------- errors and REST

export const MAX_TEXT_CHARS = 32768;

const PLAIN = {
  rate_limited: "You're sending messages too fast. Wait a moment: it will be sent again by itself.",
  text_too_long: `That message is too long. The limit is ${MAX_TEXT_CHARS.toLocaleString("en")} characters.`,
  internal: "The server can't save messages right now. Nothing was saved; try again in a moment.",
  queue_full: "Too many messages are already waiting for this run. Wait for it to catch up, then send again.",
  runner_unavailable: "This agent can't take that message now (it may not accept steering). Try Queue or Interrupt instead.",
  no_active_run: "That run has already ended.",
  unknown_run: "That run doesn't exist in this conversation.",
  invalid_frame: "The server did not accept that message.",
  invalid_json: "The server did not accept that message.",
  not_found: "That was not found on the server.",
  unauthorized: "You're not signed in, or your session has expired. Reload the page to sign in again.",
  forbidden: "You don't have access to this.",
  unavailable: "The server is unavailable. It may be restarting; try again in a moment.",
  unreachable: "Can't reach the server. Check your connection; we'll keep trying.",
};

/** A sentence for an error code of the protocol (or of this module). */
export function plain(code, fallback) {
  return PLAIN[code] || fallback || "Something went wrong. Try again in a moment.";
}

/** Why a WebSocket closed, in plain words, for the codes that end reconnecting. */
export function closeReason(code) {
  if (code === 4001) return PLAIN.unauthorized;
  if (code === 4003 || code === 1008) return PLAIN.forbidden;
  return PLAIN.unreachable;
}

/** An error from a REST call; `message` is already in plain words. */
export class ApiError extends Error {
  constructor(message, { status = 0, code = "" } = {}) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function statusCode(status) {
  if (status === 401) return "unauthorized";
  if (status === 403) return "forbidden";
  if (status === 404) return "not_found";
  if (status === 429) return "rate_limited";
  return "unavailable";
}

const TOKEN_KEY = "steerway.token";

/**
 * The access token of a gateway that has a secret (PROTOCOL.md section 7): given
 * once in the page's address as `?token=…`, then kept for this tab only
 * (sessionStorage) and taken out of the address bar, so it is not bookmarked,
 * shared or sent as a referrer. Null on an open gateway.
 */
export function accessToken() {
  const url = new URL(location.href);
  const given = url.searchParams.get("token");
  if (given) {
    sessionStorage.setItem(TOKEN_KEY, given);
    url.searchParams.delete("token");
    history.replaceState(history.state, "", url);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

/** `path` with the access token added to its query, for WebSocket URLs. */
export function withToken(path) {
  const token = accessToken();
  if (!token) return path;
  return `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
}

/** Fetch JSON; throw an ApiError whose message a person can read. */
export async function api(path, { method = "GET", body } = {}) {
  let response;
  const headers = body === undefined ? {} : { "content-type": "application/json" };
  const token = accessToken();
  if (token) headers.authorization = `Bearer ${token}`;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(PLAIN.unreachable, { code: "unreachable" });
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null; // a proxy's HTML error page, an empty body
  }
  if (!response.ok) {
    const code = (data && data.error && data.error.code) || statusCode(response.status);
    throw new ApiError(plain(code), { status: response.status, code });
  }
  return data;
}

// --------------------------------------------------------------------------- banner and alert

/** The banner over a page while its live connection is down. */
export class ConnectionBanner {
  /**
   * @param {string} note  said after the countdown, e.g. what happens to messages
   * @param {() => void} onRetry  "Retry now"
   */
  constructor({ note = "", onRetry }) {
    this.root = byId("offline-banner");
    this.text = byId("offline-text");
    this.button = byId("retry-now");
    this.note = note;
    this.ticker = null;
    this.button.addEventListener("click", onRetry);
  }

  /** Follow a LiveSocket status: {state, retryIn, code}. */
  update(status) {
    document.body.dataset.connection = status.state;
    this.root.dataset.attempt = status.attempt || 0; // reconnect attempts so far
    clearInterval(this.ticker);
    if (status.state === "open") {
      this.root.hidden = true;
    } else if (status.state === "closed") {
      this.show(closeReason(status.code), false);
    } else if (status.state === "connecting") {
      if (!this.root.hidden) this.show("Reconnecting…", false);
    } else {
      const at = Date.now() + status.retryIn;
      const tell = () => {
        const left = Math.max(0, Math.ceil((at - Date.now()) / 1000));
        const why = navigator.onLine ? "Can't reach the server." : "You're offline.";
        this.show(`${why} Reconnecting${left ? ` in ${left} s` : ""}…${this.note ? ` ${this.note}` : ""}`, true);
      };
      tell();
      this.ticker = setInterval(tell, 1000);
    }
  }

  show(text, canRetry) {
    this.text.textContent = text;
    this.button.hidden = !canRetry;
    this.root.hidden = false;
  }
}

/** The alert line: one error at a time, in plain words, until dismissed or replaced. */
export class Alert {
  constructor() {
    this.root = byId("alert");
    this.text = byId("alert-text");
    byId("alert-close").addEventListener("click", () => this.hide());
  }

  show(text) {
    this.text.textContent = text;
    this.root.hidden = false;
  }

  hide() {
    this.root.hidden = true;
  }
}
