// Compiled by `tsc --noEmit` (tests/test_js_sdk.py): the .d.ts is valid and fits real use.
import {
  Close,
  type ClientState,
  type Message,
  MeshpushClient,
  State,
  backoffDelay,
  tokenExpiry,
} from "../src/index.js";

declare const SomeWebSocket: new (url: string) => {
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
};

const client = new MeshpushClient({
  urls: ["ws://127.0.0.1:8800/ws"],
  token: async () => "jwt",
  device: "browser",
  auth: "frame",
  WebSocket: SomeWebSocket,
  autoAck: false,
});
const off: () => void = client.on("message", (msg: Message) => {
  const seq: number = msg.seq;
  const ch: "user" | "broadcast" = msg.ch;
  client.ack(msg);
  return [seq, ch];
});
client.on("state", (state: ClientState) => state === State.ONLINE);
client.on("gap", ({ ch, from, to }) => [ch, from + to]);
client.on("chain_break", ({ expected, prev, seq }) => expected + prev + seq);
client.on("close", ({ code, reason }) => code === Close.REDIRECT && reason);
client.start().close();
off();
const ready: Promise<void> = client.waitOnline();
const exp: number | null = tokenExpiry("a.b.c");
const delay: number = backoffDelay(1, 50, 5000);
// @ts-expect-error: an unknown event name is a type error
client.on("messages", () => {});
// @ts-expect-error: the token must be a string or a function
new MeshpushClient({ urls: "ws://x/ws", token: 5 });
export { ready, exp, delay };
