// The official AG-UI client (@ag-ui/client's HttpAgent) against a live Steerway gateway.
// Usage: node script.mjs <base url> <thread prefix>. Prints one JSON line of what it saw;
// tests/test_agui_client.py checks it. Exits non-zero on any error.
import { HttpAgent } from "@ag-ui/client";

const [base, prefix] = process.argv.slice(2);
const url = `${base}/api/agui`;
const words = Array.from({ length: 30 }, (_, i) => `w${i}`);
const long = words.join(" ");

function assistantText(agent) {
  return agent.messages
    .filter((m) => m.role === "assistant")
    .map((m) => m.content ?? "")
    .join("");
}

function agentFor(threadId, messages, options = {}) {
  const agent = new HttpAgent({ url, threadId, ...options });
  agent.setMessages(messages);
  return agent;
}

// 1. A run: the streamed text arrives and ends up in the agent's messages.
const plain = agentFor(`${prefix}-plain`, [{ id: "p1", role: "user", content: "hello  world" }]);
let deltas = 0;
await plain.runAgent({}, { onTextMessageContentEvent: () => void deltas++ });
const run = { text: assistantText(plain), deltas };

// 2. Steering: a second agent on the same thread sends a message while the first runs.
const first = agentFor(`${prefix}-steer`, [{ id: "s1", role: "user", content: long }]);
let steering;
let acked;
const firstDone = first.runAgent(
  {},
  {
    onTextMessageContentEvent: () => {
      if (steering) return;
      const second = agentFor(`${prefix}-steer`, [{ id: "s2", role: "user", content: "turn left" }]);
      steering = second.runAgent(
        {},
        {
          onCustomEvent: ({ event }) => {
            if (event.name === "steerway.ack") acked = event.value;
          },
        },
      );
    },
  },
);
await firstDone;
await steering;
const steer = { text: assistantText(first), route: acked?.route };

// 3. Resume: the connection is cut after a few deltas (a fetch that drops the stream,
// remembering the last SSE id it passed on); a new agent sends the same input with
// Last-Event-ID and gets the rest.
let lastId = null;
let seen = 0;
function cuttingFetch(input, init) {
  return fetch(input, init).then((response) => {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    const body = new ReadableStream({
      async pull(controller) {
        const { done, value } = await reader.read();
        if (done) return controller.close();
        // The cut comes before the chunk holding the 5th delta: every chunk passed on was
        // read by the client (pull runs once the queue is empty), so `lastId` is the id of
        // the last event it got whole.
        const text = buffer + decoder.decode(value, { stream: true });
        const blocks = text.split("\n\n");
        const rest = blocks.pop();
        let ids = lastId;
        for (const block of blocks) {
          for (const line of block.split("\n")) {
            if (line.startsWith("id:")) ids = line.slice(3).trim();
            if (line.includes('"TEXT_MESSAGE_CONTENT"')) seen++;
          }
        }
        if (seen >= 5) {
          await reader.cancel();
          return controller.error(new Error("connection cut by the test"));
        }
        buffer = rest;
        lastId = ids;
        controller.enqueue(value);
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  });
}
// The cut also rejects a promise inside the client that nobody awaits: only that error is
// expected; any other stops the script.
process.on("unhandledRejection", (error) => {
  if (String(error?.message) !== "connection cut by the test") throw error;
});
const resumeInput = [{ id: "r1", role: "user", content: long }];
const cut = agentFor(`${prefix}-resume`, resumeInput, { fetch: cuttingFetch });
let cutError = null;
try {
  await cut.runAgent();
} catch (error) {
  cutError = String(error?.message ?? error);
}
const before = assistantText(cut);
const again = agentFor(`${prefix}-resume`, resumeInput, { headers: { "Last-Event-ID": lastId } });
await again.runAgent();
const resume = { before, after: assistantText(again), lastId, cutError };

console.log(JSON.stringify({ run, steer, resume }));
