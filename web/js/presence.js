// Who else is in a conversation (docs/protocol.md, "Presence"): the `presence` frames
// of the other clients, folded per session. Never stored: after a reconnect the
// server sends everyone present again, so `reset` forgets what was known.

export class PresenceList {
  constructor() {
    this.self = null; // our session id, from `ready`
    this.sessions = new Map(); // session_id -> the last presence frame
  }

  reset(sessionId) {
    this.self = sessionId;
    this.sessions.clear();
  }

  apply(frame) {
    if (frame.state === "gone") {
      this.sessions.delete(frame.session_id);
      return;
    }
    if (frame.steering) {
      // one client steers at a time: the server sends nothing for the one it replaces
      for (const other of this.sessions.values()) other.steering = false;
    }
    this.sessions.set(frame.session_id, { ...frame });
  }

  /** The other clients, one line per user (a user may have several tabs). */
  others() {
    const users = new Map();
    for (const s of this.sessions.values()) {
      if (s.session_id === this.self) continue;
      const u = users.get(s.user) || { user: s.user, typing: false, steering: false };
      u.typing ||= s.state === "typing";
      u.steering ||= s.steering;
      users.set(s.user, u);
    }
    return [...users.values()];
  }

  /** "Here: alice, bob", or "" when nobody else is; `running` marks who steers. */
  hereText(running) {
    const people = this.others();
    if (!people.length) return "";
    const names = people.map((p) => (running && p.steering ? `${p.user} (steering)` : p.user));
    return `Here: ${names.join(", ")}`;
  }

  typingText() {
    const typing = this.others().filter((p) => p.typing).map((p) => p.user);
    if (!typing.length) return "";
    return `${typing.join(", ")} ${typing.length > 1 ? "are" : "is"} typing…`;
  }
}
