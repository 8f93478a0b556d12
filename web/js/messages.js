// The message list of the chat: draws a Timeline's items, redrawing only the ones
// that changed, and keeps the view pinned to the bottom while the person is there.

import { renderMarkdown } from "./markdown.js";
import { drawState, drawTool, folded, h, replace } from "./page.js";

const ROUTE_LABELS = {
  queue: "Queued: runs after the current run",
  interrupt: "Interrupted the previous run",
};

export class MessageList {
  /**
   * @param {HTMLElement} root  the scrolling list (role="log")
   * @param {{onRetry: (clientMsgId: string) => void}} actions
   */
  constructor(root, { onRetry }) {
    this.root = root;
    this.onRetry = onRetry;
    this.nodes = new Map(); // item key -> element
    this.empty = root.querySelector(".empty-state");
  }

  /** Redraw what changed in the timeline. */
  draw(timeline) {
    const stick = this.atBottom();
    const { cleared, items } = timeline.drain();
    if (cleared) {
      this.nodes.clear();
      replace(this.root, this.empty);
    }
    for (const item of items) this.drawItem(item, timeline);
    if (this.empty) this.empty.hidden = timeline.items.length > 0;
    if (stick || cleared) this.scrollToEnd();
  }

  atBottom() {
    const r = this.root;
    return r.scrollHeight - r.scrollTop - r.clientHeight < 80;
  }

  scrollToEnd() {
    this.root.scrollTop = this.root.scrollHeight;
  }

  drawItem(item, timeline) {
    let node = this.nodes.get(item.key);
    const fresh = !node;
    if (fresh) {
      node = this.create(item);
      this.nodes.set(item.key, node);
      this.root.append(node);
    }
    if (item.kind === "user") this.drawUser(node, item, timeline);
    else if (item.kind === "assistant") this.drawAssistant(node, item);
    else if (item.kind === "tool") drawTool(node, item);
    else if (item.kind === "state") drawState(node, item);
    else if (fresh) node.textContent = item.text;
  }

  create(item) {
    if (item.kind === "user") {
      return h("article", { class: "msg user", "aria-label": "Your message" },
        h("div", { class: "bubble" }, h("p", { class: "text" })),
        h("div", { class: "meta" }));
    }
    if (item.kind === "assistant") {
      // The streaming message is a polite live region; busy until it completes, so a
      // screen reader reads it once rather than word by word.
      return h("article", { class: "msg assistant", "aria-label": "Agent's message", "aria-live": "polite" },
        h("div", { class: "content markdown" }));
    }
    if (item.kind === "tool" || item.kind === "state") return folded(item.kind);
    return h("p", { class: `notice pill status-${item.status}`, role: "note" });
  }

  drawUser(node, item, timeline) {
    node.dataset.state = item.state;
    node.dataset.clientMsgId = item.clientMsgId;
    if (item.messageId) node.dataset.messageId = item.messageId;
    if (item.steering) node.dataset.steering = item.steering;
    else delete node.dataset.steering;
    const text = node.querySelector(".text");
    if (text.textContent !== item.text) text.textContent = item.text;
    replace(node.querySelector(".meta"), ...this.userMeta(item, timeline));
  }

  userMeta(item, timeline) {
    if (item.state === "sending") return [badge("Sending…", "muted")];
    if (item.state === "offline") return [badge("Not sent yet: will send when the connection is back", "warn")];
    if (item.state === "failed") {
      const retry = item.errorCode !== "text_too_long" && !item.errorCode.startsWith("invalid");
      return [
        badge(`Not sent: ${item.error}`, "error"),
        retry ? h("button", { type: "button", class: "link-button", onclick: () => this.onRetry(item.clientMsgId) }, "Retry") : null,
      ];
    }
    if (item.steering === "waiting") return [badge("Steering · waiting for the agent to read it", "waiting")];
    if (item.steering === "absorbed") return [badge("Steering · absorbed by the agent", "ok")];
    if (item.steering === "followup") return [badge("Steering · became a follow-up run", "ok")];
    if (item.steering === "dropped") return [badge(`Steering · dropped: ${item.dropReason}`, "error")];
    const run = item.runId && timeline.runs.get(item.runId);
    if (item.route === "queue" && run && run.status === "queued") return [queuedBadge(run.position)];
    if (item.route === "interrupt") return [badge(ROUTE_LABELS.interrupt, "muted")];
    return [];
  }

  drawAssistant(node, item) {
    node.setAttribute("aria-busy", item.done ? "false" : "true");
    node.dataset.messageId = item.key.slice(2);
    node.classList.toggle("streaming", !item.done);
    replace(node.querySelector(".content"), renderMarkdown(item.text));
  }
}

/** A queued message's place in line: from run.queued, kept current by queue.updated. */
function queuedBadge(position) {
  if (typeof position !== "number") return badge(ROUTE_LABELS.queue, "waiting");
  const when = position === 1 ? "runs next" : `runs after ${position - 1} more queued`;
  const node = badge(`Queued · position ${position} · ${when}`, "waiting");
  node.dataset.queuePosition = String(position);
  return node;
}

function badge(text, tone) {
  return h("span", { class: `badge tone-${tone}` }, text);
}
