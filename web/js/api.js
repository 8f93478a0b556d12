// REST calls and every error in plain words. The gateway's error codes (PROTOCOL.md
// sections 3 and 8) and the ways a request can fail are turned into sentences a
// person can act on; nothing is left as a console-only error.

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

/** Fetch JSON; throw an ApiError whose message a person can read. */
export async function api(path, { method = "GET", body } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: body === undefined ? {} : { "content-type": "application/json" },
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
