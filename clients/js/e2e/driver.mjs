// End-to-end driver: runs the SDK in headless Chromium (playwright-core) or in Node.js (ws)
// and prints every client event as one JSON line on stdout until stdin closes; then it closes
// the client and prints {"event": "done", "stats": ...}.
//
//   node e2e/driver.mjs '{"mode": "browser", "page": "http://127.0.0.1:PORT/e2e/page.html",
//                         "chromium": "/usr/bin/chromium", "urls": [...], "token": "...",
//                         "device": "d1"}'
//   node e2e/driver.mjs '{"mode": "node", "urls": [...], "token": "...", "device": "d1"}'
//   (node mode: "secret", "user", "ttl" and "refreshBefore" sign short-lived tokens instead)

import { once } from "node:events";
import process from "node:process";

import { wire } from "./report.js";

const config = JSON.parse(process.argv[2]);
const out = (event) => process.stdout.write(JSON.stringify(event) + "\n");
const stdinClosed = once(process.stdin.resume(), "end");

async function inBrowser() {
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({
    executablePath: config.chromium,
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
    headless: true,
    timeout: 60_000,
  });
  try {
    const page = await browser.newPage();
    await page.exposeFunction("meshpushReport", (line) => process.stdout.write(line + "\n"));
    page.on("pageerror", (err) => out({ event: "pageerror", detail: String(err) }));
    page.on("console", (msg) => out({ event: "console", level: msg.type(), text: msg.text() }));
    await page.goto(`${config.page}#${encodeURIComponent(JSON.stringify(config))}`);
    out({ event: "loaded", userAgent: await page.evaluate(() => navigator.userAgent) });
    await stdinClosed;
    const stats = await page.evaluate(() => {
      window.meshpushClient.close();
      return window.meshpushClient.stats;
    });
    out({ event: "done", stats });
  } finally {
    await browser.close();
  }
}

/** An HS256 client JWT, as the application's backend would sign it (token refresh tests). */
async function signToken(secret, user, ttl) {
  const { createHmac } = await import("node:crypto");
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: user, iat: now, exp: now + ttl })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

async function inNode() {
  const { default: WebSocket } = await import("ws");
  const { MeshpushClient } = await import("../src/index.js");
  const { secret, user, ttl } = config;
  const client = new MeshpushClient({
    urls: config.urls,
    token: secret ? () => signToken(secret, user, ttl) : async () => config.token,
    refreshBefore: config.refreshBefore ?? 30,
    device: config.device,
    auth: config.auth ?? "frame",
    WebSocket,
  });
  wire(client, out);
  out({ event: "loaded", userAgent: `node ${process.version}` });
  client.start();
  await stdinClosed;
  client.close();
  out({ event: "done", stats: client.stats });
}

try {
  await (config.mode === "browser" ? inBrowser() : inNode());
  process.exit(0);
} catch (err) {
  out({ event: "fatal", detail: String(err?.stack ?? err) });
  process.exit(1);
}
