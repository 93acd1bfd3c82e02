// meshpush JavaScript client: browsers and Node.js >= 20, no runtime dependencies.
//
// It does every client duty of docs/protocol.md section 6: any node is a bootstrap, redirect
// frames (close 4302) are followed, an unreachable owner is avoided (`avoid=`), every other
// drop reconnects with full-jitter backoff, sessions resume with last/blast/epoch, acks are
// cumulative and batched, seqs already seen are dropped, `prev` is checked (gaps and chain
// breaks are events), the client pings at the welcome's interval, a token function is asked
// for a fresh token before the current one expires, and every state change is an event.
// Types: index.d.ts next to this file.

/** Close codes (docs/protocol.md, "Close codes"). */
export const Close = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006,
  INVALID_DATA: 1007,
  POLICY: 1008,
  TOO_BIG: 1009,
  SLOW_CONSUMER: 4008,
  REDIRECT: 4302,
  UNAUTHORIZED: 4401,
  FORBIDDEN: 4403,
  HEARTBEAT_TIMEOUT: 4408,
  RATE_LIMITED: 4429,
  UNAVAILABLE: 4503,
});

/** Close codes after which reconnecting cannot help: the client stops (state "closed"). */
export const FINAL_CLOSE_CODES = Object.freeze([Close.POLICY, Close.FORBIDDEN]);

/** Codes that mean "the node went away under us": the node is avoided on the next connect. */
const DEAD_CODES = new Set([Close.ABNORMAL, Close.GOING_AWAY]);

export const State = Object.freeze({
  CONNECTING: "connecting",
  ONLINE: "online",
  REDIRECTING: "redirecting",
  BACKING_OFF: "backing_off",
  CLOSED: "closed",
});

const CHANNELS = ["user", "broadcast"];
const MAX_AUTH_FAILURES = 3;
/** Seconds at most that a refusal's `retry_after` holds the client back. */
export const MAX_RETRY_AFTER = 60;

const DEFAULTS = {
  device: "default",
  auth: "frame",
  maxHops: 5,
  backoffBase: 50,
  backoffCap: 5000,
  connectTimeout: 10000,
  ackInterval: 100,
  refreshBefore: 30,
  autoAck: true,
  random: Math.random,
  onListenerError: (err) => {
    // a listener's bug surfaces as an uncaught error (like any event handler), not in the SDK
    setTimeout(() => {
      throw err;
    }, 0);
  },
};

/**
 * The seconds-since-epoch `exp` of a JWT, or null if it is not a JWT with a numeric exp.
 * @param {string} token
 * @returns {number | null}
 */
export function tokenExpiry(token) {
  const part = typeof token === "string" ? token.split(".")[1] : undefined;
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

/**
 * The node a URL names: host and port (the scheme's default when none), whatever its path and
 * query (a URL that does not parse: itself).
 */
function nodeKey(url) {
  try {
    const u = new URL(url);
    const port = u.port || (u.protocol === "wss:" || u.protocol === "https:" ? "443" : "80");
    return `${u.hostname.toLowerCase()}:${port}`;
  } catch {
    return String(url);
  }
}

/**
 * The full-jitter backoff delay in ms for the `attempt`-th retry in a row.
 * @param {number} attempt
 * @param {number} base
 * @param {number} cap
 * @param {() => number} random
 */
export function backoffDelay(attempt, base, cap, random = Math.random) {
  const ceiling = Math.min(cap, base * 2 ** Math.min(attempt, 20));
  return random() * ceiling;
}

/** A resilient push session for one (user, device). See index.d.ts for the options. */
export class MeshpushClient {
  /** @param {import("./index.js").ClientOptions} options */
  constructor(options) {
    const opts = { ...DEFAULTS, ...options };
    const urls = typeof opts.urls === "string" ? [opts.urls] : [...(opts.urls ?? [])];
    if (urls.length === 0) throw new TypeError("meshpush: at least one bootstrap URL is needed");
    if (typeof opts.token !== "string" && typeof opts.token !== "function") {
      throw new TypeError("meshpush: token must be a string or a function returning one");
    }
    if (opts.auth !== "query" && opts.auth !== "frame") {
      throw new TypeError('meshpush: auth must be "query" or "frame"');
    }
    const WebSocketImpl = opts.WebSocket ?? globalThis.WebSocket;
    if (typeof WebSocketImpl !== "function") {
      throw new TypeError(
        "meshpush: no WebSocket here: pass one, e.g. `import WebSocket from 'ws'` and " +
          "new MeshpushClient({ WebSocket, ... })",
      );
    }
    this.options = opts;
    this.bootstraps = urls;
    this.device = opts.device;
    this._WebSocket = WebSocketImpl;
    /** @type {string} */
    this.state = State.CONNECTING;
    /** @type {string | null} */
    this.node = null;
    /** @type {string | null} */
    this.epoch = null;
    this.last = { user: 0, broadcast: 0 }; // newest seq received per channel
    this.consumed = { user: 0, broadcast: 0 }; // newest seq the application consumed
    this.stats = {
      connects: 0,
      welcomes: 0,
      redirects: 0,
      duplicates: 0,
      gaps: 0,
      chainBreaks: 0,
      pings: 0,
      tokenRefreshes: 0,
      lastClose: null,
      lastError: "",
      nodes: [],
    };
    this._listeners = new Map();
    this._acked = { user: 0, broadcast: 0 };
    this._afterGap = new Set();
    this._next = 0; // index of the bootstrap URL the next fresh connection starts from
    this._avoid = { node: "", url: "" }; // a node that just proved unreachable
    this._welcomed = { node: "", url: "" }; // the node of the current session
    this._attempt = 0;
    this._hops = 0;
    this._authFailures = 0;
    this._notBefore = new Map(); // node (host:port) -> Date.now() it asked us to wait for
    this._conn = null; // the current connection attempt (one at a time)
    this._timer = null; // backoff timer
    this._freshToken = null; // fetched ahead of expiry, used by the next connect
    this._started = false;
    this._stopped = false;
  }

  // ------------------------------------------------------------ public

  /**
   * Listen to an event: "message", "state", "welcome", "gap", "chain_break", "epoch_reset",
   * "not_recovered", "error", "close", "token_refresh". Returns a function that unsubscribes.
   */
  on(event, listener) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(listener);
    return () => this.off(event, listener);
  }

  off(event, listener) {
    this._listeners.get(event)?.delete(listener);
  }

  /** Connect (and keep connecting until close()). Returns this. */
  start() {
    if (this._started) return this;
    this._started = true;
    this._connect(this.bootstrap, { node: "", url: "" });
    return this;
  }

  /** Resolves when a session has been welcomed (at once if online now). */
  waitOnline() {
    if (this.state === State.ONLINE) return Promise.resolve();
    return new Promise((resolve, reject) => {
      const off = this.on("state", (state) => {
        if (state === State.ONLINE || state === State.CLOSED) {
          off();
          if (state === State.ONLINE) resolve();
          else reject(new Error("meshpush client closed"));
        }
      });
    });
  }

  /** Mark `msg` and everything before it on its channel consumed; the ack goes out batched. */
  ack(msg) {
    if (CHANNELS.includes(msg.ch) && msg.seq > this.consumed[msg.ch]) {
      this.consumed[msg.ch] = msg.seq;
      this._conn?.scheduleAck();
    }
  }

  /** Send pending acks, close the connection (1000) and stop reconnecting. */
  close() {
    if (this._stopped) return;
    this._stopped = true;
    clearTimeout(this._timer);
    const conn = this._conn;
    this._conn = null;
    if (conn) {
      conn.flushAcks();
      conn.end(Close.NORMAL, "client closed");
      conn.finish({ code: Close.NORMAL, reason: "client closed" });
    }
    this._setState(State.CLOSED);
  }

  /** The bootstrap URL the next fresh connection starts from. */
  get bootstrap() {
    return this.bootstraps[this._next % this.bootstraps.length];
  }

  // ------------------------------------------------------------ connection loop

  async _connect(url, target) {
    if (this._stopped) return;
    const wait = this._waitFor(url);
    if (wait > 0) {
      // that node asked us to wait (a refusal's retry_after): come back when it said
      this._setState(State.BACKING_OFF);
      this._timer = setTimeout(() => this._connect(url, target), wait);
      return;
    }
    this._setState(this._hops ? State.REDIRECTING : State.CONNECTING);
    this.stats.connects += 1;
    let token;
    try {
      token = await this._token();
    } catch (err) {
      this.stats.lastError = `token: ${err}`;
      this._emit("error", { code: "token_unavailable", detail: String(err) });
      this._retry();
      return;
    }
    if (this._stopped) return;
    const conn = new Connection(this, url, target, token);
    this._conn = conn;
    conn.open();
  }

  async _token() {
    const source = this.options.token;
    if (typeof source === "string") return source;
    if (this._freshToken !== null) {
      const token = this._freshToken;
      this._freshToken = null;
      return token;
    }
    const token = await source();
    if (typeof token !== "string" || !token) throw new TypeError("token function gave no string");
    return token;
  }

  /** Build the URL of a connection: token (unless sent as a frame), device and resume. */
  _url(url, token) {
    const u = new URL(url);
    const params = u.searchParams;
    if (this.options.auth === "query") params.set("token", token);
    params.set("device", this.device);
    params.set("last", String(this.last.user));
    params.set("blast", String(this.last.broadcast));
    if (this.epoch) params.set("epoch", this.epoch);
    if (this._avoid.node) params.set("avoid", this._avoid.node);
    return u.toString();
  }

  /** Called once per connection when it ended; decides where and when to go next. */
  _ended(conn, outcome) {
    if (this._conn !== conn) return;
    this._conn = null;
    const { code, reason, redirect } = outcome;
    this.stats.lastClose = code;
    this._emit("close", { code, reason, node: conn.node || conn.target.node, url: conn.url });
    if (this._stopped) return;
    if (conn.welcomed) {
      this._attempt = 0;
      this._authFailures = 0;
    }
    if (outcome.again) {
      this._hops = 0;
      this._connect(outcome.again.url, outcome.again);
      return;
    }
    if (redirect) {
      this.stats.redirects += 1;
      if (this._hops < this.options.maxHops) {
        this._hops += 1;
        this._connect(redirect.url, redirect);
        return;
      }
    } else if (this._isFinal(code, conn.welcomed)) {
      this.stats.lastError = `final close ${code} ${reason}`;
      this._setState(State.CLOSED);
      this._stopped = true;
      return;
    } else if (this._unreachable(code, conn.welcomed ? this._welcomed : conn.target)) {
      // that node is gone (its lease may not have expired yet): go straight to another node
      // and ask it to hold us until the ring no longer names the dead one
      this._hops = 0;
      this._welcomed = { node: "", url: "" };
      this._connect(this._rotate(), { node: "", url: "" });
      return;
    }
    this._retry();
  }

  _isFinal(code, welcomed) {
    if (FINAL_CLOSE_CODES.includes(code)) return true;
    if (code !== Close.UNAUTHORIZED) return false;
    if (typeof this.options.token === "string") return true; // no way to get another one
    this._authFailures = welcomed ? 0 : this._authFailures + 1;
    return this._authFailures >= MAX_AUTH_FAILURES;
  }

  _unreachable(code, node) {
    if (!DEAD_CODES.has(code) || !node.node) return false;
    if (node.node === this._avoid.node && node.url === this._avoid.url) return false;
    this._avoid = { node: node.node, url: node.url };
    return true;
  }

  /** Back off (full jitter), then start again from the next bootstrap URL. */
  _retry() {
    this._hops = 0;
    this._attempt += 1;
    const { backoffBase, backoffCap, random } = this.options;
    const delay = backoffDelay(this._attempt, backoffBase, backoffCap, random);
    this._setState(State.BACKING_OFF);
    this._timer = setTimeout(() => this._connect(this._rotate(), { node: "", url: "" }), delay);
  }

  /**
   * Keep `url`'s node away for a refusal's `retry_after` (seconds; ignored unless a number
   * >= 0; capped at MAX_RETRY_AFTER).
   */
  _noteRetryAfter(url, value) {
    if (typeof value !== "number" || !(value >= 0)) return;
    const now = Date.now();
    for (const [node, until] of this._notBefore) if (until <= now) this._notBefore.delete(node);
    this._notBefore.set(nodeKey(url), now + Math.min(value, MAX_RETRY_AFTER) * 1000);
  }

  /**
   * Milliseconds until `url`'s node may be asked again (0: now; at most MAX_RETRY_AFTER,
   * whatever the wall clock did meanwhile).
   */
  _waitFor(url) {
    const left = (this._notBefore.get(nodeKey(url)) ?? 0) - Date.now();
    return Math.min(MAX_RETRY_AFTER * 1000, Math.max(0, left));
  }

  /**
   * The next bootstrap URL, skipping the avoided node and the nodes that asked us to wait
   * (`retry_after`) when there is another.
   */
  _rotate() {
    const n = this.bootstraps.length;
    const after = Array.from({ length: n }, (_, k) => this._next + k + 1);
    const notAvoided = (url) => url !== this._avoid.url;
    const free = (url) => notAvoided(url) && this._waitFor(url) === 0;
    let pick = after.find((i) => free(this.bootstraps[i % n]));
    if (pick === undefined) {
      // every one asked us to wait (or is avoided): the one free soonest
      const allowed = after.filter((i) => notAvoided(this.bootstraps[i % n]));
      const candidates = allowed.length ? allowed : after;
      const wait = (i) => this._waitFor(this.bootstraps[i % n]);
      pick = candidates.reduce((best, i) => (wait(i) < wait(best) ? i : best));
    }
    this._next = pick;
    return this.bootstrap;
  }

  // ------------------------------------------------------------ frames (called by Connection)

  _onWelcome(conn, f) {
    this.stats.welcomes += 1;
    this.node = String(f.node);
    this.stats.nodes.push(this.node);
    this._welcomed = { node: this.node, url: conn.url };
    this._avoid = { node: "", url: "" };
    this._hops = 0;
    this._adoptEpoch(typeof f.epoch === "string" ? f.epoch : "");
    this._adoptResume(f.resume);
    this._acked = { ...this.consumed }; // the server resumed from at least these
    if (f.recovered === false) this._emit("not_recovered", { node: this.node });
    this._emit("welcome", f);
    this._setState(State.ONLINE);
  }

  _adoptEpoch(epoch) {
    if (this.epoch && epoch && epoch !== this.epoch) {
      this._emit("epoch_reset", { old: this.epoch, new: epoch });
      this.last = { user: 0, broadcast: 0 };
      this.consumed = { user: 0, broadcast: 0 };
      this._acked = { user: 0, broadcast: 0 };
    }
    this.epoch = epoch || this.epoch;
  }

  _adoptResume(resume) {
    if (!resume || typeof resume !== "object") return;
    for (const ch of CHANNELS) {
      const seq = resume[ch];
      if (Number.isInteger(seq) && seq > this.last[ch] && this.last[ch] > 0) this.last[ch] = seq;
    }
  }

  /** A msg frame: returns false when the chain broke (the connection is then dropped). */
  _onMessage(f) {
    const { ch, seq, prev } = f;
    if (!CHANNELS.includes(ch) || !Number.isInteger(seq)) {
      throw new ProtocolError("msg frame without a valid ch/seq");
    }
    if (seq <= this.last[ch]) {
      this.stats.duplicates += 1;
      return true;
    }
    const known = this.last[ch] > 0 && !this._afterGap.has(ch);
    if (known && Number.isInteger(prev) && prev !== this.last[ch]) {
      this.stats.chainBreaks += 1;
      this._emit("chain_break", { ch, expected: this.last[ch], prev, seq });
      return false;
    }
    this._afterGap.delete(ch);
    this.last[ch] = seq;
    const msg = Object.freeze({
      ch,
      seq,
      prev: Number.isInteger(prev) ? prev : null,
      id: String(f.id),
      data: f.data,
    });
    this._emit("message", msg);
    if (this.options.autoAck) this.ack(msg);
    return true;
  }

  /**
   * The node refused our resume position (beyond its stream's end, e.g. a recreated store):
   * start that channel (both if unnamed) over from the device's cursor, not the same `last`.
   */
  _resetResume(ch, detail) {
    for (const name of CHANNELS.includes(ch) ? [ch] : CHANNELS) {
      this._emit("resume_reset", { ch: name, refused: this.last[name], detail: String(detail) });
      this.last[name] = 0;
      this.consumed[name] = 0;
      this._acked[name] = 0;
    }
  }

  _onGap(f) {
    const { ch, from, to } = f;
    if (!CHANNELS.includes(ch) || !Number.isInteger(to)) {
      throw new ProtocolError("gap frame without a valid ch/to");
    }
    this.stats.gaps += 1;
    this._emit("gap", { ch, from, to });
    this.last[ch] = Math.max(this.last[ch], to);
    this._afterGap.add(ch);
  }

  /** The token runs out soon: fetch a fresh one now, then move the session onto it. */
  async _refreshToken(conn) {
    let token;
    try {
      token = await this.options.token();
    } catch (err) {
      this._emit("error", { code: "token_refresh_failed", detail: String(err) });
      return; // the server closes with 4401 at expiry; the reconnect asks again
    }
    if (this._conn !== conn || this._stopped || typeof token !== "string" || !token) return;
    this.stats.tokenRefreshes += 1;
    this._freshToken = token;
    this._emit("token_refresh", { exp: tokenExpiry(token) });
    // a seamless hand-over: the next session resumes after what this one received
    conn.flushAcks();
    conn.end(Close.NORMAL, "token refresh");
    conn.finish({ code: Close.NORMAL, reason: "token refresh", again: conn.welcomedTarget() });
  }

  _emit(event, value) {
    const listeners = this._listeners.get(event);
    if (!listeners) return;
    for (const listener of [...listeners]) {
      try {
        listener(value);
      } catch (err) {
        this.options.onListenerError(err);
      }
    }
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    this._emit("state", state);
  }
}

class ProtocolError extends Error {}

/** One WebSocket connection attempt and, if welcomed, its session. */
class Connection {
  constructor(client, url, target, token) {
    this.client = client;
    this.url = url;
    this.target = target; // {node, url} of a redirect target, or empty for a bootstrap
    this.token = token;
    this.ws = null;
    this.welcomed = false;
    this.node = "";
    this.done = false;
    this.lastHeard = Date.now();
    this.timers = [];
    this.ackTimer = null;
  }

  open() {
    const { client } = this;
    try {
      this.ws = new client._WebSocket(client._url(this.url, this.token));
    } catch (err) {
      // a malformed URL or a refused scheme: nothing will ever open it
      client.stats.lastError = String(err);
      this.finish({ code: Close.ABNORMAL, reason: String(err) });
      return;
    }
    const ws = this.ws;
    ws.onopen = () => this.onOpen();
    ws.onmessage = (event) => this.onFrame(event.data);
    ws.onclose = (event) => {
      const outcome = { code: event.code, reason: event.reason || "" };
      // 4302 without a redirect frame: the owner is elsewhere, unnamed; start from a bootstrap
      if (event.code === Close.REDIRECT) outcome.redirect = { node: "", url: client._rotate() };
      this.finish(outcome);
    };
    ws.onerror = () => {}; // always followed by a close event
    this.later(client.options.connectTimeout, () => {
      if (!this.welcomed) this.abandon("connect timeout");
    });
  }

  onOpen() {
    this.lastHeard = Date.now();
    if (this.client.options.auth === "frame") this.send({ type: "auth", token: this.token });
  }

  onFrame(data) {
    if (this.done) return;
    this.lastHeard = Date.now();
    let frame;
    try {
      frame = JSON.parse(typeof data === "string" ? data : String(data));
      if (!frame || typeof frame !== "object" || typeof frame.type !== "string") {
        throw new ProtocolError("frame is not an object with a type");
      }
      this.handle(frame);
    } catch (err) {
      this.client.stats.lastError = `bad server frame: ${err.message ?? err}`;
      this.end(Close.INVALID_DATA, "bad server frame");
      this.finish({ code: Close.INVALID_DATA, reason: "bad server frame" });
    }
  }

  handle(f) {
    const { client } = this;
    switch (f.type) {
      case "msg":
        if (!this.welcomed) throw new ProtocolError("msg before welcome");
        if (!client._onMessage(f)) this.resume("chain break");
        break;
      case "welcome":
        this.onWelcome(f);
        break;
      case "redirect":
        this.onRedirect(f);
        break;
      case "gap":
        client._onGap(f);
        break;
      case "error":
        client._emit("error", { code: f.code, detail: f.detail });
        client._noteRetryAfter(this.url, f.retry_after);
        if (f.code === "bad_resume") client._resetResume(f.ch, f.detail);
        break;
      default: // pong, and frame types this SDK does not know yet
        break;
    }
  }

  onWelcome(f) {
    this.welcomed = true;
    this.node = String(f.node);
    this.client._onWelcome(this, f);
    const hb = f.heartbeat ?? {};
    const interval = Number(hb.interval ?? 25) * 1000;
    const timeout = Number(hb.timeout ?? 60) * 1000;
    this.every(interval, () => this.heartbeat(timeout));
    this.scheduleRefresh();
    this.scheduleAck();
  }

  /** Ping at the server's interval; a server silent for its timeout is gone. */
  heartbeat(timeout) {
    if (Date.now() - this.lastHeard > timeout) {
      this.abandon("server heartbeat timeout");
      return;
    }
    this.client.stats.pings += 1;
    this.send({ type: "ping" });
  }

  onRedirect(f) {
    const url = typeof f.url === "string" && f.url ? f.url : this.client.bootstrap;
    const node = typeof f.node === "string" ? f.node : "";
    // the node closes with 4302 next; go at once rather than wait for its close
    this.end(Close.NORMAL, "redirected");
    this.finish({ code: Close.REDIRECT, reason: String(f.reason ?? ""), redirect: { node, url } });
  }

  /** prev did not match: something went missing; reconnect so the resume replays it. */
  resume(reason) {
    this.flushAcks();
    this.end(Close.NORMAL, reason);
    this.finish({ code: Close.NORMAL, reason });
  }

  scheduleRefresh() {
    const { options } = this.client;
    if (typeof options.token !== "function") return;
    const exp = tokenExpiry(this.token);
    if (exp === null) return;
    const remaining = exp * 1000 - Date.now();
    const lead = Math.min(options.refreshBefore * 1000, remaining / 2);
    this.later(Math.max(0, remaining - lead), () => this.client._refreshToken(this));
  }

  welcomedTarget() {
    return { node: this.node, url: this.url };
  }

  scheduleAck() {
    if (!this.welcomed || this.done || this.ackTimer !== null) return;
    this.ackTimer = setTimeout(() => {
      this.ackTimer = null;
      this.flushAcks();
    }, this.client.options.ackInterval);
  }

  flushAcks() {
    const { client } = this;
    if (!this.welcomed || this.done) return;
    for (const ch of CHANNELS) {
      const seq = client.consumed[ch];
      if (seq > client._acked[ch] && seq <= client.last[ch]) {
        if (this.send({ type: "ack", ch, seq })) client._acked[ch] = seq;
      }
    }
  }

  send(frame) {
    const ws = this.ws;
    if (!ws || ws.readyState !== 1) return false; // OPEN
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  /** The peer is silent or never answered: drop the socket without waiting for a close. */
  abandon(reason) {
    this.client.stats.lastError = reason;
    this.end(Close.HEARTBEAT_TIMEOUT, reason);
    this.finish({ code: Close.ABNORMAL, reason });
  }

  /** Close the socket if it is still connecting or open. */
  end(code, reason) {
    const ws = this.ws;
    if (!ws || (ws.readyState !== 0 && ws.readyState !== 1)) return;
    try {
      ws.close(code, reason);
    } catch {
      // browsers only let a page send 1000 and 3000-4999 (not 1007): close without a code
      try {
        ws.close();
      } catch {
        // a socket that cannot be closed any more is closed enough
      }
    }
  }

  /** The connection is over, once: stop its timers and tell the client how it ended. */
  finish(outcome) {
    if (this.done) return;
    this.done = true;
    for (const timer of this.timers) clearTimeout(timer);
    clearTimeout(this.ackTimer);
    if (this.ws) {
      this.ws.onopen = this.ws.onmessage = this.ws.onclose = null;
      this.ws.onerror = () => {}; // some implementations still report a late error
    }
    this.client._ended(this, outcome);
  }

  later(ms, fn) {
    this.timers.push(setTimeout(fn, ms));
  }

  every(ms, fn) {
    const tick = () => {
      fn();
      if (!this.done) this.later(ms, tick);
    };
    this.later(ms, tick);
  }
}
