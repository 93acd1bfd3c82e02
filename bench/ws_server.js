// Reference for the meshpush benchmarks: Node.js `ws` 8 (see bench/_servers.py).
// Listens on 127.0.0.1:PORT, greets each connection, prints "ready PORT"; a stdin line
// "broadcast K SIZE" sends K messages (one pre-made Buffer each, ws frames it per client
// with client.send) to every client, yielding to the event loop between messages, then "done".
"use strict";
const { WebSocketServer } = require("ws");
const readline = require("readline");

const port = Number(process.argv[2]);
const wss = new WebSocketServer({ host: "127.0.0.1", port, perMessageDeflate: false });
wss.on("connection", (ws) => ws.send('{"type":"welcome"}'));
wss.on("listening", () => console.log(`ready ${wss.address().port}`));

function message(seq, size) {
  const body = { type: "msg", ch: "broadcast", seq, id: `b${seq}`, data: "x".repeat(size) };
  return Buffer.from(JSON.stringify(body));
}

function broadcast(seq, count, size) {
  if (seq > count) {
    console.log("done");
    return;
  }
  const data = message(seq, size);
  for (const client of wss.clients) client.send(data, { binary: false });
  setImmediate(broadcast, seq + 1, count, size);
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const [, count, size] = line.trim().split(/\s+/);
  broadcast(1, Number(count), Number(size));
});
rl.on("close", () => process.exit(0));
