// What the chat and the dashboard tell people: the offline banner (with its
// reconnect countdown) and the alert line for errors in plain words.

import { closeReason } from "./api.js";
import { byId } from "./dom.js";

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
