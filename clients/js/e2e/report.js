// Shared by the end-to-end page and driver: every client event as one JSON-able object.

const EVENTS = ["gap", "chain_break", "epoch_reset", "not_recovered", "error", "close", "token_refresh"];

/** @param {import("../src/index.js").MeshpushClient} client @param {(e: object) => void} report */
export function wire(client, report) {
  client.on("message", (m) => report({ event: "message", ch: m.ch, seq: m.seq, prev: m.prev, id: m.id, data: m.data }));
  client.on("state", (state) => report({ event: "state", state }));
  client.on("welcome", (w) => report({ event: "welcome", node: w.node, epoch: w.epoch }));
  for (const kind of EVENTS) client.on(kind, (value) => report({ event: kind, ...value }));
}
