import assert from "node:assert/strict";
import { afterEach, beforeEach, describe, it, mock } from "node:test";

import { Close, MAX_RETRY_AFTER, MeshpushClient, backoffDelay, tokenExpiry } from "../src/index.js";
import { FakeSocket } from "./fake-socket.js";

const URLS = ["ws://a.test/ws", "ws://b.test/ws", "ws://c.test/ws"];

function jwt(payload) {
  const b64 = (obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  return `${b64({ alg: "HS256", typ: "JWT" })}.${b64(payload)}.sig`;
}

let clients = [];

function client(options = {}) {
  const c = new MeshpushClient({
    urls: URLS,
    token: "t0",
    device: "d",
    WebSocket: FakeSocket,
    random: () => 0, // no backoff wait unless a test says otherwise
    auth: "query", // most tests read the token from the URL; the default is "frame"
    ...options,
  });
  const seen = { messages: [], states: [], events: [] };
  c.on("message", (m) => seen.messages.push(m));
  c.on("state", (s) => seen.states.push(s));
  const kinds = ["gap", "chain_break", "epoch_reset", "not_recovered", "error", "close"];
  for (const kind of [...kinds, "resume_reset"]) {
    c.on(kind, (value) => seen.events.push({ kind, ...value }));
  }
  clients.push(c);
  return { c, seen };
}

/** Let pending promise callbacks and timers run (token functions are awaited). */
async function settle(ms = 0) {
  // in steps: the mock moves Date to the end of a tick before it runs the timers inside it
  for (let left = ms; ; left -= 1000) {
    mock.timers.tick(Math.min(left, 1000));
    for (let i = 0; i < 5; i += 1) await Promise.resolve();
    if (left <= 1000) return;
  }
}

beforeEach(() => {
  FakeSocket.reset();
  mock.timers.enable({ apis: ["setTimeout", "Date"], now: 1_000_000 });
});

afterEach(() => {
  for (const c of clients) c.close();
  clients = [];
  mock.timers.reset();
});

describe("helpers", () => {
  it("reads a JWT's exp, and null for anything else", () => {
    assert.equal(tokenExpiry(jwt({ sub: "a", exp: 1234 })), 1234);
    assert.equal(tokenExpiry(jwt({ sub: "a" })), null);
    assert.equal(tokenExpiry("not-a-jwt"), null);
    assert.equal(tokenExpiry("a.%%%.c"), null);
  });

  it("backs off with full jitter under a cap", () => {
    assert.equal(backoffDelay(3, 50, 5000, () => 1), 400);
    assert.equal(backoffDelay(30, 50, 5000, () => 1), 5000);
    assert.equal(backoffDelay(3, 50, 5000, () => 0), 0);
    assert.equal(backoffDelay(3, 50, 5000, () => 0.5), 200);
  });

  it("refuses bad options with a clear message", () => {
    assert.throws(() => new MeshpushClient({ urls: [], token: "t", WebSocket: FakeSocket }), /bootstrap/);
    assert.throws(() => new MeshpushClient({ urls: URLS, token: 5, WebSocket: FakeSocket }), /token/);
    assert.throws(
      () => new MeshpushClient({ urls: URLS, token: "t", auth: "cookie", WebSocket: FakeSocket }),
      /auth/,
    );
    const saved = globalThis.WebSocket;
    globalThis.WebSocket = undefined;
    try {
      assert.throws(() => new MeshpushClient({ urls: URLS, token: "t" }), /ws/);
    } finally {
      globalThis.WebSocket = saved;
    }
  });
});

describe("connect and resume", () => {
  it("sends token, device and resume seqs in the query", async () => {
    const { c, seen } = client();
    c.start();
    await settle();
    const ws = FakeSocket.last;
    assert.equal(ws.url.origin + ws.url.pathname, "ws://a.test/ws");
    assert.deepEqual(ws.params, { token: "t0", device: "d", last: "0", blast: "0" });
    ws.welcome();
    assert.equal(c.state, "online");
    assert.deepEqual(seen.states, ["online"]);
    ws.msg(5, 0);
    ws.msg(9, 5, { ch: "broadcast" });
    ws.serverClose(Close.GOING_AWAY);
    await settle();
    assert.deepEqual(FakeSocket.last.params, {
      token: "t0",
      device: "d",
      last: "5",
      blast: "9",
      epoch: "e1",
      avoid: "n1", // 1001 from the welcomed node: it went away
    });
  });

  it("sends the token in an auth frame by default, never in the URL", async () => {
    const c = new MeshpushClient({ urls: URLS, token: "t0", WebSocket: FakeSocket });
    clients.push(c);
    c.start();
    await settle();
    const ws = FakeSocket.last;
    assert.equal(ws.params.token, undefined);
    ws.open();
    assert.deepEqual(ws.frames[0], { type: "auth", token: "t0" });
  });

  it("starts a channel over after bad_resume instead of retrying the same last", async () => {
    const { c, seen } = client();
    c.start();
    await settle();
    FakeSocket.last.welcome();
    FakeSocket.last.msg(50, 0);
    FakeSocket.last.msg(7, 0, { ch: "broadcast" });
    FakeSocket.last.serverClose(Close.SLOW_CONSUMER);
    await settle();
    assert.equal(FakeSocket.last.params.last, "50");
    FakeSocket.last.open();
    FakeSocket.last.frame({ type: "error", code: "bad_resume", detail: "user ...", ch: "user" });
    FakeSocket.last.serverClose(4400, "bad_resume");
    await settle();
    assert.equal(FakeSocket.last.params.last, "0");
    assert.equal(FakeSocket.last.params.blast, "7"); // the other channel keeps its position
    const reset = seen.events.filter((e) => e.kind === "resume_reset");
    assert.deepEqual(reset, [{ kind: "resume_reset", ch: "user", refused: 50, detail: "user ..." }]);
    FakeSocket.last.welcome();
    FakeSocket.last.msg(3, 0);
    assert.equal(seen.messages.at(-1).seq, 3); // a lower seq is delivered, not dropped
  });

  it("asks a token function before every connect", async () => {
    let n = 0;
    const { c } = client({ token: async () => `tok${++n}` });
    c.start();
    await settle();
    assert.equal(FakeSocket.last.params.token, "tok1");
    FakeSocket.last.serverClose(Close.SLOW_CONSUMER);
    await settle();
    assert.equal(FakeSocket.last.params.token, "tok2");
  });

  it("drops seqs already seen, across reconnects too", async () => {
    const { c, seen } = client();
    c.start();
    await settle();
    let ws = FakeSocket.last;
    ws.welcome();
    ws.msg(3, 0);
    ws.msg(3, 0);
    ws.msg(7, 3);
    ws.serverClose(Close.SLOW_CONSUMER);
    await settle();
    ws = FakeSocket.last;
    ws.welcome({ node: "n2" });
    ws.msg(7, 3); // a replay overlapping what we have
    ws.msg(8, 7);
    assert.deepEqual(
      seen.messages.map((m) => m.seq),
      [3, 7, 8],
    );
    assert.equal(c.stats.duplicates, 2);
    assert.deepEqual(seen.messages[0], { ch: "user", seq: 3, prev: 0, id: "m3", data: { n: 3 } });
  });

  it("resets seqs on a new epoch and says so", async () => {
    const { c, seen } = client();
    c.start();
    await settle();
    FakeSocket.last.welcome();
    FakeSocket.last.msg(50, 0);
    FakeSocket.last.serverClose(Close.SLOW_CONSUMER);
    await settle();
    assert.equal(FakeSocket.last.params.epoch, "e1");
    FakeSocket.last.welcome({ epoch: "e2" });
    FakeSocket.last.msg(1, 0);
    assert.deepEqual(
      seen.messages.map((m) => m.seq),
      [50, 1],
    );
    assert.deepEqual(
      seen.events.filter((e) => e.kind === "epoch_reset"),
      [{ kind: "epoch_reset", old: "e1", new: "e2" }],
    );
  });
});

describe("waiting and failing tokens", () => {
  it("waitOnline resolves on a welcome and rejects on a final close", async () => {
    const { c } = client();
    c.start();
    await settle();
    const online = c.waitOnline();
    FakeSocket.last.welcome();
    await online;
    await c.waitOnline(); // online now: at once
    FakeSocket.last.serverClose(Close.SLOW_CONSUMER);
    const next = c.waitOnline();
    await settle(1);
    FakeSocket.last.serverClose(Close.FORBIDDEN);
    await assert.rejects(next, /closed/);
  });

  it("a token function that fails is an error event, then a retry", async () => {
    let calls = 0;
    const { c, seen } = client({
      token: async () => {
        calls += 1;
        if (calls === 1) throw new Error("backend down");
        return "tok";
      },
    });
    c.start();
    await settle();
    assert.equal(FakeSocket.instances.length, 0);
    assert.deepEqual(seen.events[0], {
      kind: "error",
      code: "token_unavailable",
      detail: "Error: backend down",
    });
    await settle(1);
    assert.equal(FakeSocket.last.params.token, "tok");
  });
});

describe("redirects and failover", () => {
  it("follows a redirect frame at once, to the frame's url", async () => {
    const { c, seen } = client();
    c.start();
    await settle();
    const first = FakeSocket.last;
    first.open();
    first.frame({ type: "redirect", node: "n3", url: "ws://c.test/ws", reason: "owner" });
    assert.deepEqual(first.closedWith, { code: 1000, reason: "redirected" });
    await settle();
    assert.equal(FakeSocket.last.url.host, "c.test");
    assert.equal(c.state, "redirecting");
    first.serverClose(Close.REDIRECT); // the late close of the old socket changes nothing
    assert.equal(FakeSocket.instances.length, 2);
    FakeSocket.last.welcome({ node: "n3" });
    assert.equal(c.node, "n3");
    assert.equal(c.stats.redirects, 1);
    assert.deepEqual(seen.states, ["redirecting", "online"]);
  });

  it("4302 without a redirect frame goes to the next bootstrap at once", async () => {
    const { c } = client({ random: () => 1 });
    c.start();
    await settle();
    FakeSocket.last.open();
    FakeSocket.last.serverClose(Close.REDIRECT);
    await settle();
    assert.equal(FakeSocket.instances.length, 2);
    assert.equal(FakeSocket.last.url.host, "b.test");
    assert.equal(c.state, "redirecting");
  });

  it("stops following redirects after maxHops and backs off", async () => {
    const { c } = client({ maxHops: 2, random: () => 1 });
    c.start();
    await settle();
    for (let i = 0; i < 3; i += 1) {
      FakeSocket.last.open();
      FakeSocket.last.frame({ type: "redirect", node: "n2", url: "ws://b.test/ws", reason: "owner" });
      await settle();
    }
    assert.equal(c.state, "backing_off");
    await settle(100);
    assert.equal(FakeSocket.instances.length, 4);
    assert.equal(FakeSocket.last.url.host, "b.test"); // the next bootstrap
  });

  it("avoids an unreachable redirect target and goes to another node", async () => {
    const { c } = client();
    c.start();
    await settle();
    FakeSocket.last.open();
    FakeSocket.last.frame({ type: "redirect", node: "n1", url: "ws://a.test/ws", reason: "owner" });
    await settle();
    FakeSocket.last.serverClose(Close.ABNORMAL); // connection refused
    await settle();
    const ws = FakeSocket.last;
    assert.equal(ws.url.host, "b.test");
    assert.equal(ws.params.avoid, "n1");
    assert.equal(FakeSocket.instances.length, 3); // no backoff in between
    ws.welcome({ node: "n2" });
    ws.serverClose(Close.SLOW_CONSUMER);
    await settle();
    assert.equal(FakeSocket.last.params.avoid, undefined); // a welcome clears it
  });

  it("goes straight to another node with avoid= when the owner dies", async () => {
    const { c } = client({ random: () => 1 });
    c.start();
    await settle();
    FakeSocket.last.welcome({ node: "n1" });
    FakeSocket.last.serverClose(Close.ABNORMAL);
    await settle();
    assert.equal(FakeSocket.last.url.host, "b.test");
    assert.equal(FakeSocket.last.params.avoid, "n1");
    // the avoided node failing again does not loop: back off instead
    FakeSocket.last.serverClose(Close.ABNORMAL);
    await settle();
    assert.equal(c.state, "backing_off");
  });

  it("reconnects with growing full-jitter backoff over the bootstrap URLs", async () => {
    const { c } = client({ random: () => 1, backoffBase: 100, backoffCap: 1000 });
    c.start();
    await settle();
    const hosts = [FakeSocket.last.url.host];
    for (const wait of [200, 400, 800, 1000]) {
      FakeSocket.last.serverClose(Close.UNAVAILABLE);
      await settle(wait - 1);
      assert.equal(c.state, "backing_off");
      await settle(1);
      hosts.push(FakeSocket.last.url.host);
    }
    assert.deepEqual(hosts, ["a.test", "b.test", "c.test", "a.test", "b.test"]);
    // a welcome resets the attempt counter
    FakeSocket.last.welcome();
    FakeSocket.last.serverClose(Close.SLOW_CONSUMER);
    await settle(199);
    assert.equal(c.state, "backing_off");
    await settle(1);
    assert.equal(c.state, "connecting");
  });

  /** Refuse the current connection the way a node does after the upgrade. */
  function refuse(retryAfter) {
    FakeSocket.last.open();
    const frame = { type: "error", code: "node_full", detail: "x", retry_after: retryAfter };
    FakeSocket.last.frame(frame);
    FakeSocket.last.serverClose(Close.UNAVAILABLE);
  }

  it("keeps away from a node for its retry_after, trying the others meanwhile", async () => {
    const { c } = client({ random: () => 1, backoffBase: 100, backoffCap: 1000 });
    c.start();
    await settle();
    refuse(10); // a.test: 10 s
    await settle(200); // the backoff alone: b.test did not ask anything
    assert.equal(FakeSocket.last.url.host, "b.test");
    refuse(10);
    await settle(400);
    assert.equal(FakeSocket.last.url.host, "c.test");
    refuse(10); // now every node asked to wait: a.test is asked again when it said
    await settle(800);
    assert.equal(FakeSocket.instances.length, 3);
    assert.equal(c.state, "backing_off");
    await settle(10000 - 200 - 400 - 800 - 1);
    assert.equal(FakeSocket.instances.length, 3);
    await settle(1);
    assert.equal(FakeSocket.instances.length, 4);
    assert.equal(FakeSocket.last.url.host, "a.test");
  });

  it("waits out a redirect target's retry_after before following the redirect", async () => {
    const { c } = client({ random: () => 1, backoffBase: 100, backoffCap: 1000 });
    c.start();
    await settle();
    FakeSocket.last.open();
    FakeSocket.last.frame({ type: "redirect", node: "n3", url: "ws://c.test/ws", reason: "owner" });
    await settle();
    refuse(2); // the owner, c.test, is not ready
    await settle(200); // the backoff, then b.test, which redirects to c.test again
    assert.equal(FakeSocket.last.url.host, "b.test");
    FakeSocket.last.open();
    FakeSocket.last.frame({ type: "redirect", node: "n3", url: "ws://c.test/ws", reason: "owner" });
    await settle(2000 - 200 - 1);
    assert.equal(FakeSocket.last.url.host, "b.test");
    assert.equal(c.state, "backing_off");
    await settle(1);
    assert.equal(FakeSocket.last.url.host, "c.test");
  });

  it("keys the wait by host and port and asks the node free soonest first", async () => {
    const { c } = client();
    c._noteRetryAfter("ws://a.test:80/ws?device=d", 30);
    c._noteRetryAfter("ws://B.test/other", 10);
    c._noteRetryAfter("ws://c.test/ws", 20);
    assert.equal(c._waitFor("ws://a.test/ws"), 30000);
    assert.equal(c._waitFor("wss://a.test/ws"), 0); // port 443: another node
    assert.equal(c._rotate(), "ws://b.test/ws"); // every one waits: b is free soonest
    c._noteRetryAfter("not a url", 5); // no throw on a URL that does not parse
    assert.equal(c._waitFor("not a url"), 5000);
  });

  it("never waits longer than MAX_RETRY_AFTER, whatever the wall clock did", async () => {
    const { c } = client();
    c._noteRetryAfter("ws://a.test/ws", 10);
    c._notBefore.set("a.test:80", Date.now() + 10 ** 12); // as if the clock jumped back
    assert.equal(c._waitFor("ws://a.test/ws"), MAX_RETRY_AFTER * 1000);
  });

  it("ignores a retry_after that is not a number >= 0 and caps a huge one", async () => {
    const { c } = client();
    for (const bad of [-1, "5", null, [1], true, Number.NaN]) {
      c._noteRetryAfter("ws://a.test/ws", bad);
      assert.equal(c._waitFor("ws://a.test/ws"), 0);
    }
    c._noteRetryAfter("ws://a.test/ws?device=d", 1e9); // the node, whatever the query
    assert.equal(c._waitFor("ws://a.test/other"), MAX_RETRY_AFTER * 1000);
    assert.equal(c._waitFor("ws://b.test/ws"), 0);
  });

  it("abandons a connection that is not welcomed within connectTimeout", async () => {
    const { c } = client({ connectTimeout: 500 });
    c.start();
    await settle();
    const ws = FakeSocket.last;
    ws.open();
    await settle(500);
    assert.equal(ws.closedWith.code, Close.HEARTBEAT_TIMEOUT);
    assert.equal(FakeSocket.instances.length, 2);
    assert.equal(c.stats.lastError, "connect timeout");
  });
});

describe("close codes", () => {
  for (const code of [Close.POLICY, Close.FORBIDDEN]) {
    it(`${code} is final`, async () => {
      const { c, seen } = client();
      c.start();
      await settle();
      FakeSocket.last.welcome();
      FakeSocket.last.frame({ type: "error", code: "forbidden", detail: "no" });
      FakeSocket.last.serverClose(code);
      await settle(10_000);
      assert.equal(c.state, "closed");
      assert.equal(FakeSocket.instances.length, 1);
      assert.deepEqual(seen.events.find((e) => e.kind === "error"), {
        kind: "error",
        code: "forbidden",
        detail: "no",
      });
    });
  }

  for (const code of [Close.GOING_AWAY, Close.INVALID_DATA, Close.TOO_BIG, 4008, 4408, 4429, 4503]) {
    it(`${code} reconnects`, async () => {
      const { c } = client();
      c.start();
      await settle();
      FakeSocket.last.welcome();
      FakeSocket.last.serverClose(code);
      await settle(1);
      assert.equal(FakeSocket.instances.length, 2);
      assert.notEqual(c.state, "closed");
    });
  }

  it("4401 with a fixed token is final; with a token function it gets a new one", async () => {
    const fixed = client();
    fixed.c.start();
    await settle();
    FakeSocket.last.serverClose(Close.UNAUTHORIZED);
    await settle(10_000);
    assert.equal(fixed.c.state, "closed");

    FakeSocket.reset();
    let n = 0;
    const fresh = client({ token: () => `tok${++n}` });
    fresh.c.start();
    await settle();
    FakeSocket.last.welcome();
    FakeSocket.last.serverClose(Close.UNAUTHORIZED);
    await settle(1);
    assert.equal(FakeSocket.last.params.token, "tok2");
    // a token the server keeps refusing before any welcome: give up after a few
    FakeSocket.last.serverClose(Close.UNAUTHORIZED);
    await settle(1);
    FakeSocket.last.serverClose(Close.UNAUTHORIZED);
    await settle(1);
    FakeSocket.last.serverClose(Close.UNAUTHORIZED);
    await settle(10_000);
    assert.equal(fresh.c.state, "closed");
    assert.equal(FakeSocket.instances.length, 4);
  });

  it("a malformed server frame drops the connection and reconnects", async () => {
    const { c } = client();
    c.start();
    await settle();
    FakeSocket.last.welcome();
    FakeSocket.last.frame("{nope");
    assert.equal(FakeSocket.instances[0].closedWith.code, 1005); // browsers refuse to send 1007
    await settle(1);
    assert.equal(FakeSocket.instances.length, 2);
    assert.match(c.stats.lastError, /bad server frame/);
  });
});

describe("prev chain and gaps", () => {
  it("a chain break is an event and the client resumes from the last seq", async () => {
    const { c, seen } = client();
    c.start();
    await settle();
    FakeSocket.last.welcome();
    FakeSocket.last.msg(4, 0);
    FakeSocket.last.msg(9, 6); // 6 is missing
    assert.deepEqual(
      seen.messages.map((m) => m.seq),
      [4],
    );
    assert.deepEqual(seen.events.find((e) => e.kind === "chain_break"), {
      kind: "chain_break",
      ch: "user",
      expected: 4,
      prev: 6,
      seq: 9,
    });
    await settle(1);
    assert.equal(FakeSocket.last.params.last, "4");
    assert.equal(c.stats.chainBreaks, 1);
  });

  it("a gap is an event and the chain continues after it", async () => {
    const { c, seen } = client();
    c.start();
    await settle();
    const ws = FakeSocket.last;
    ws.welcome({ recovered: false });
    ws.msg(4, 0);
    ws.frame({ type: "gap", ch: "user", from: 5, to: 20 });
    ws.msg(21, 19); // prev inside the gap: no chain break right after a gap
    ws.msg(22, 21);
    assert.deepEqual(
      seen.messages.map((m) => m.seq),
      [4, 21, 22],
    );
    assert.deepEqual(
      seen.events.filter((e) => e.kind !== "close").map((e) => e.kind),
      ["not_recovered", "gap"],
    );
    assert.equal(FakeSocket.instances.length, 1);
  });
});

describe("acks, pings and token refresh", () => {
  it("acks cumulatively, batched, per channel", async () => {
    const { c } = client();
    c.start();
    await settle();
    const ws = FakeSocket.last;
    ws.welcome();
    ws.msg(1, 0);
    ws.msg(2, 1);
    ws.msg(3, 2);
    ws.msg(10, 0, { ch: "broadcast" });
    assert.deepEqual(ws.frames, []);
    await settle(100);
    assert.deepEqual(ws.frames, [
      { type: "ack", ch: "user", seq: 3 },
      { type: "ack", ch: "broadcast", seq: 10 },
    ]);
    await settle(1000);
    assert.equal(ws.frames.length, 2); // nothing new, nothing sent
  });

  it("without autoAck only what the application acks is acked; close() flushes", async () => {
    const { c, seen } = client({ autoAck: false });
    c.start();
    await settle();
    const ws = FakeSocket.last;
    ws.welcome();
    ws.msg(1, 0);
    ws.msg(2, 1);
    await settle(500);
    assert.deepEqual(ws.frames, []);
    c.ack(seen.messages[0]);
    c.close();
    assert.deepEqual(ws.frames, [{ type: "ack", ch: "user", seq: 1 }]);
    assert.deepEqual(ws.closedWith, { code: 1000, reason: "client closed" });
    assert.equal(c.state, "closed");
  });

  it("pings at the welcome's interval and drops a silent server", async () => {
    const { c } = client();
    c.start();
    await settle();
    const ws = FakeSocket.last;
    ws.welcome({ heartbeat: { interval: 1, timeout: 3 } });
    await settle(1000);
    assert.deepEqual(ws.frames, [{ type: "ping" }]);
    ws.frame({ type: "pong" });
    await settle(1000);
    await settle(1000);
    assert.equal(ws.frames.length, 3);
    assert.equal(FakeSocket.instances.length, 1);
    await settle(1000);
    await settle(1000); // 4 s after the last pong: gone
    assert.equal(ws.closedWith.code, Close.HEARTBEAT_TIMEOUT);
    assert.equal(FakeSocket.instances.length, 2);
    assert.equal(FakeSocket.last.params.avoid, "n1");
  });

  it("fetches a fresh token before expiry and moves the session onto it", async () => {
    const now = Date.now() / 1000;
    const tokens = [jwt({ sub: "alice", exp: now + 100 }), jwt({ sub: "alice", exp: now + 200 })];
    const { c } = client({ token: async () => tokens.shift(), refreshBefore: 30 });
    c.start();
    await settle();
    const ws = FakeSocket.last;
    ws.welcome({ node: "n2" });
    ws.msg(5, 0);
    await settle(69_000);
    assert.equal(FakeSocket.instances.length, 1);
    await settle(1000);
    assert.equal(c.stats.tokenRefreshes, 1);
    assert.deepEqual(ws.frames.filter((f) => f.type === "ack"), [{ type: "ack", ch: "user", seq: 5 }]);
    assert.equal(ws.closedWith.reason, "token refresh");
    const next = FakeSocket.last;
    assert.equal(FakeSocket.instances.length, 2);
    assert.equal(next.url.host, "a.test"); // same node, no backoff
    assert.equal(tokenExpiry(next.params.token), now + 200);
    assert.equal(next.params.last, "5");
  });

  it("a listener that throws does not break the client", async () => {
    const uncaught = [];
    const { c, seen } = client({ onListenerError: (err) => uncaught.push(err.message) });
    c.on("message", () => {
      throw new Error("app bug");
    });
    c.start();
    await settle();
    FakeSocket.last.welcome();
    FakeSocket.last.msg(1, 0);
    FakeSocket.last.msg(2, 1);
    await settle(100);
    assert.equal(seen.messages.length, 2);
    assert.deepEqual(uncaught, ["app bug", "app bug"]);
    assert.deepEqual(FakeSocket.last.frames, [{ type: "ack", ch: "user", seq: 2 }]);
  });
});
