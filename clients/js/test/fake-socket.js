// A fake WebSocket for unit tests: the test plays the server.

export class FakeSocket {
  static instances = [];

  static reset() {
    FakeSocket.instances = [];
  }

  static get last() {
    return FakeSocket.instances.at(-1);
  }

  constructor(url) {
    this.url = new URL(url);
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    this.onopen = this.onmessage = this.onclose = this.onerror = null;
    FakeSocket.instances.push(this);
  }

  get params() {
    return Object.fromEntries(this.url.searchParams);
  }

  /** Frames the client sent, parsed. */
  get frames() {
    return this.sent.map((s) => JSON.parse(s));
  }

  send(data) {
    if (this.readyState !== 1) throw new Error("not open");
    this.sent.push(data);
  }

  close(code, reason = "") {
    // like a browser: a page may only send 1000 and 3000-4999
    if (code !== undefined && code !== 1000 && (code < 3000 || code > 4999)) {
      throw new Error(`InvalidAccessError: close code ${code}`);
    }
    this.closedWith = { code: code ?? 1005, reason };
    this.readyState = 2;
  }

  // ---- the "server" side

  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  frame(obj) {
    this.onmessage?.({ data: typeof obj === "string" ? obj : JSON.stringify(obj) });
  }

  welcome(extra = {}) {
    this.open();
    this.frame({
      type: "welcome",
      node: "n1",
      user: "alice",
      device: "d",
      epoch: "e1",
      heartbeat: { interval: 25, timeout: 60 },
      recovered: true,
      resume: { user: 0, broadcast: 0 },
      ...extra,
    });
  }

  msg(seq, prev, extra = {}) {
    this.frame({ type: "msg", ch: "user", seq, prev, id: `m${seq}`, data: { n: seq }, ...extra });
  }

  serverClose(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}
