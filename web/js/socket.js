// A WebSocket that comes back: reconnects with exponential backoff and jitter, asks
// for its URL again at each attempt (the chat resumes with `after=<last offset>`),
// detects a silent connection with an application ping, and reports its state so
// the page can show an offline banner.

import { withToken } from "./page.js";

const FATAL = new Set([4001, 4003, 1008]); // unauthorized, forbidden, origin refused

export class LiveSocket {
  /**
   * @param {object} options
   * @param {() => string} options.url  path and query, e.g. "/ws/dashboard"
   * @param {(frame: object) => void} options.onFrame  each JSON frame received
   * @param {(status: object) => void} options.onStatus  {state, retryIn, attempt, code}
   */
  constructor({ url, onFrame, onStatus, minDelay = 500, maxDelay = 8000, pingEvery = 25000 }) {
    this.url = url;
    this.onFrame = onFrame;
    this.onStatus = onStatus || (() => {});
    this.minDelay = minDelay;
    this.maxDelay = maxDelay;
    this.pingEvery = pingEvery;
    this.ws = null;
    this.attempt = 0;
    this.timer = null;
    this.pinger = null;
    this.heard = 0;
    this.stopped = true;
    this.onOnline = () => this.retryNow();
  }

  get open() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  start() {
    this.stopped = false;
    window.addEventListener("online", this.onOnline);
    this.connect();
  }

  /** Close for good (switching conversation, leaving the page). */
  stop() {
    this.stopped = true;
    window.removeEventListener("online", this.onOnline);
    clearTimeout(this.timer);
    clearInterval(this.pinger);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000, "bye");
    }
  }

  /** Drop the connection and connect again at once (e.g. to replay from the start). */
  restart() {
    this.attempt = 0;
    this.drop();
  }

  /** Send a frame; false when the socket is not open (the caller keeps it for later). */
  send(frame) {
    if (!this.open) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  retryNow() {
    if (this.stopped || this.ws) return;
    clearTimeout(this.timer);
    this.connect();
  }

  drop() {
    if (this.ws) this.ws.close(4000, "reconnect");
  }

  connect() {
    if (this.stopped) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}${withToken(this.url())}`);
    this.ws = ws;
    this.onStatus({ state: "connecting", attempt: this.attempt });
    let first = true;
    ws.onmessage = (message) => {
      if (ws !== this.ws) return;
      this.heard = Date.now();
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return; // the server only sends JSON; ignore anything else
      }
      if (first) {
        first = false;
        this.attempt = 0;
        this.onStatus({ state: "open" });
      }
      this.onFrame(frame);
    };
    ws.onopen = () => {
      this.heard = Date.now();
      clearInterval(this.pinger);
      this.pinger = setInterval(() => this.keepAlive(ws), this.pingEvery / 5);
    };
    ws.onclose = (event) => {
      if (ws !== this.ws) return;
      this.ws = null;
      clearInterval(this.pinger);
      if (this.stopped) return;
      if (FATAL.has(event.code)) {
        this.stopped = true;
        this.onStatus({ state: "closed", code: event.code });
        return;
      }
      // A slow consumer (4008) or a requested restart reconnects at once, once.
      const now = event.code === 4008 || event.code === 4000 ? 0 : this.backoff();
      this.attempt += 1;
      this.onStatus({ state: "down", retryIn: now, attempt: this.attempt, code: event.code });
      this.timer = setTimeout(() => this.connect(), now);
    };
  }

  backoff() {
    const base = Math.min(this.maxDelay, this.minDelay * 2 ** this.attempt);
    return Math.round(base * (0.75 + Math.random() * 0.5));
  }

  /** Ping when nothing was heard for a while; close a connection that stays silent. */
  keepAlive(ws) {
    if (ws !== this.ws || ws.readyState !== WebSocket.OPEN) return;
    const quiet = Date.now() - this.heard;
    if (quiet > this.pingEvery * 1.5) {
      ws.close(4000, "silent");
    } else if (quiet > this.pingEvery) {
      ws.send(JSON.stringify({ type: "ping", nonce: String(Date.now()) }));
    }
  }
}
