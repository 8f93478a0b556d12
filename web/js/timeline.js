// One conversation as the chat shows it, built from the gateway's frames: events
// (PROTOCOL.md section 4), acks and errors (section 3). No DOM here: the view reads
// `items` and redraws the ones in `changed`.
//
// Items, in the order they first appeared:
//   user       a message: pending (sending, offline, failed) until its `user.message`
//              event; `steering` is waiting | absorbed | followup | dropped
//   assistant  streamed text of one assistant message (`done` once completed)
//   tool       a tool call
//   state      one state key (`scope.key`): its latest value, updated in place
//   notice     how a run ended when it did not complete (failed, stopped, timed out)

import { plain } from "./page.js";

const DROP_REASONS = {
  cancelled: "the run was stopped before the agent read it",
  run_ended: "the run ended before the agent read it",
};

/** What a conversation's title is made of: the start of its first message, as
 * Markdown (chat.js shows it through `plainTitle`); cut to keep localStorage small. */
export function titleSource(text) {
  return text.trim().slice(0, 500);
}

export class Timeline {
  constructor(conversationId) {
    this.conversationId = conversationId;
    this.reset();
  }

  /** Forget everything (a store reset, a new conversation): replay from offset 0. */
  reset() {
    this.lastOffset = 0;
    this.items = [];
    this.byKey = new Map();
    this.byMessage = new Map(); // message_id -> user item
    this.runs = new Map(); // run_id -> {runId, status, runner, reason, error, position}
    this.activeRunId = null;
    this.outgoing = new Map(); // client_msg_id -> frame: sent or to send, not yet answered
    this.changed = new Set();
    this.cleared = true;
    this.title = null; // the titleSource of the first user message
  }

  // ------------------------------------------------------------------ sending

  /** A new message from this person: its frame, and its pending item. */
  compose(text, mode) {
    const clientMsgId = newClientMsgId();
    const frame = { type: "message", client_msg_id: clientMsgId, text, mode };
    this.outgoing.set(clientMsgId, frame);
    const item = this.add({ kind: "user", key: `u:${clientMsgId}`, clientMsgId, text, mode, state: "offline" });
    item.frame = frame;
    return frame;
  }

  /** The frame went out on an open socket (or is waiting for one). */
  sending(clientMsgId, sent) {
    const item = this.byKey.get(`u:${clientMsgId}`);
    if (item && item.state !== "stored") this.set(item, { state: sent ? "sending" : "offline" });
  }

  /** Frames to send again after a reconnect or a rate limit, oldest first. */
  pending() {
    return [...this.outgoing.values()];
  }

  /** Send a refused message again, with its original client_msg_id. */
  retry(clientMsgId) {
    const item = this.byKey.get(`u:${clientMsgId}`);
    if (!item || item.state !== "failed") return null;
    this.outgoing.set(clientMsgId, item.frame);
    this.set(item, { state: "offline", error: null, errorCode: null });
    return item.frame;
  }

  // ------------------------------------------------------------------ frames

  /** `ready`: false when the server is behind our cursor (a store reset): start over. */
  ready(frame) {
    if (frame.head < this.lastOffset) return false;
    const active = frame.active_run;
    if (active) {
      this.run(active.run_id, { status: active.status, runner: active.runner });
      this.activeRunId = active.run_id;
    } else {
      this.activeRunId = null;
    }
    return true;
  }

  ack(frame) {
    this.outgoing.delete(frame.client_msg_id);
    const item = this.byKey.get(`u:${frame.client_msg_id}`);
    if (!item) return;
    const update = { state: "stored", route: frame.route, runId: frame.run_id, messageId: frame.message_id };
    if (frame.route === "steer" && !item.steering) update.steering = "waiting";
    this.set(item, update);
    this.byMessage.set(frame.message_id, item);
  }

  /** An `error` about one of our messages marks it failed; true when it was ours. */
  refuse(frame) {
    const item = frame.client_msg_id && this.byKey.get(`u:${frame.client_msg_id}`);
    if (!item || item.state === "stored") return false;
    this.outgoing.delete(frame.client_msg_id);
    this.set(item, { state: "failed", errorCode: frame.code, error: plain(frame.code, frame.message) });
    return true;
  }

  /** A conversation event; offsets at or below the last one applied are skipped. */
  event(e) {
    if (typeof e.offset !== "number" || e.offset <= this.lastOffset) return;
    this.lastOffset = e.offset;
    const handler = HANDLERS[e.type];
    if (handler) handler.call(this, e);
  }

  // ------------------------------------------------------------------ reading

  /** What the composer and the status line show. */
  status() {
    const runs = [...this.runs.values()];
    return {
      active: this.activeRunId ? this.runs.get(this.activeRunId) : null,
      queued: runs.filter((r) => r.status === "queued").length,
      last: runs.length ? runs[runs.length - 1] : null,
    };
  }

  /** The items to redraw since the last call, and whether to redraw from scratch. */
  drain() {
    const out = { cleared: this.cleared, items: this.cleared ? this.items : [...this.changed] };
    this.cleared = false;
    this.changed.clear();
    return out;
  }

  // ------------------------------------------------------------------ internals

  add(item) {
    this.items.push(item);
    this.byKey.set(item.key, item);
    this.changed.add(item);
    return item;
  }

  set(item, fields) {
    Object.assign(item, fields);
    this.changed.add(item);
  }

  run(runId, fields) {
    const run = this.runs.get(runId) || { runId };
    this.runs.delete(runId); // re-inserted: the most recently changed run is the last one
    this.runs.set(runId, Object.assign(run, fields));
    return run;
  }

  assistant(e) {
    return this.byKey.get(`a:${e.message_id}`) ||
      this.add({ kind: "assistant", key: `a:${e.message_id}`, runId: e.run_id, text: "", done: false });
  }

  steering(ids, fields) {
    for (const id of ids || []) {
      const item = this.byMessage.get(id);
      if (item) this.set(item, fields);
    }
  }
}

const HANDLERS = {
  "user.message"(e) {
    const key = `u:${e.client_msg_id}`;
    const item = this.byKey.get(key) || this.add({ kind: "user", key, clientMsgId: e.client_msg_id });
    this.outgoing.delete(e.client_msg_id);
    this.set(item, {
      state: "stored",
      text: e.text,
      route: e.route,
      runId: e.run_id,
      messageId: e.message_id,
      author: e.author,
      error: null,
      steering: e.route === "steer" ? item.steering || "waiting" : null,
    });
    this.byMessage.set(e.message_id, item);
    if (!this.title) this.title = titleSource(e.text);
  },
  "run.queued"(e) {
    this.run(e.run_id, { status: "queued", runner: e.runner, position: e.position });
  },
  "queue.updated"(e) {
    // Every run still queued, in order: the positions replace what run.queued said.
    const moved = new Set();
    for (const { run_id: runId, position } of e.runs || []) {
      const run = this.runs.get(runId);
      if (run) run.position = position; // not re-inserted: it did not become the latest run
      else this.run(runId, { status: "queued", position });
      moved.add(runId);
    }
    for (const item of this.items) {
      if (item.kind === "user" && moved.has(item.runId)) this.changed.add(item);
    }
  },
  "run.started"(e) {
    this.run(e.run_id, { status: "running", runner: e.runner });
    this.activeRunId = e.run_id;
    for (const id of e.trigger_message_ids || []) {
      const item = this.byMessage.get(id);
      if (item && item.route === "steer" && item.runId !== e.run_id) {
        this.set(item, { steering: "followup", followRunId: e.run_id });
      } else if (item) {
        this.changed.add(item); // a queued message is queued no more
      }
    }
  },
  "message.delta"(e) {
    const item = this.assistant(e);
    this.set(item, { text: item.text + e.delta });
  },
  "message.completed"(e) {
    this.set(this.assistant(e), { text: e.message.content, done: true });
  },
  "tool.call.started"(e) {
    this.add({ kind: "tool", key: `t:${e.run_id}:${e.tool_call_id}`, runId: e.run_id, name: e.name, args: e.arguments, done: false });
  },
  "tool.call.completed"(e) {
    const key = `t:${e.run_id}:${e.tool_call_id}`;
    const item = this.byKey.get(key) || this.add({ kind: "tool", key, runId: e.run_id, name: e.name });
    this.set(item, { done: true, result: e.result, error: e.error });
  },
  "state.updated"(e) {
    const key = `s:${e.scope}.${e.key}`;
    const item = this.byKey.get(key) || this.add({ kind: "state", key, name: `${e.scope}.${e.key}` });
    this.set(item, { value: e.value, runId: e.run_id });
  },
  "steering.absorbed"(e) {
    this.steering(e.message_ids, { steering: "absorbed" });
  },
  "steering.dropped"(e) {
    this.steering(e.message_ids, { steering: "dropped", dropReason: DROP_REASONS[e.reason] || e.reason });
  },
  "run.ended"(e) {
    this.run(e.run_id, { status: e.status, reason: e.reason, error: e.error || null, usage: e.usage });
    if (this.activeRunId === e.run_id) this.activeRunId = null;
    for (const item of this.items) {
      if (item.kind === "assistant" && item.runId === e.run_id && !item.done) this.set(item, { done: true });
    }
    const text = endNotice(e);
    if (text) this.add({ kind: "notice", key: `n:${e.run_id}`, runId: e.run_id, status: e.status, text });
  },
};

/** How a run that did not complete ended, in plain words (none when it completed). */
export function endNotice(e) {
  if (e.status === "cancelled") {
    return e.reason === "interrupted" ? "Interrupted by a new message." : "Stopped.";
  }
  if (e.status === "failed") {
    const why = e.error && e.error.message ? e.error.message : e.reason;
    const again = e.error && e.error.retryable ? " You can send your message again." : "";
    return `The run failed: ${why}.${again}`;
  }
  if (e.status === "timeout") {
    return e.reason === "idle"
      ? "The agent stopped responding, so the run was ended."
      : "The run took too long and was stopped.";
  }
  return null;
}

/** A client_msg_id: 1-64 chars of [A-Za-z0-9._:-], unique enough to never collide. */
export function newClientMsgId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return `m-${Date.now().toString(36)}-${[...bytes].map((b) => b.toString(16).padStart(2, "0")).join("")}`;
}
