// Types of the meshpush JavaScript client (src/index.js).

export type Channel = "user" | "broadcast";

export type ClientState = "connecting" | "online" | "redirecting" | "backing_off" | "closed";

/** A string, or a function asked for a (fresh) token before every connect and before expiry. */
export type TokenSource = string | (() => string | Promise<string>);

/** The subset of the WHATWG WebSocket this client uses (browsers, Node 22's global, `ws`). */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((event: unknown) => void) | null;
  onmessage: ((event: { data: unknown }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface ClientOptions {
  /** One or several node URLs (`ws://host:port/ws`); any node is a bootstrap. */
  urls: string | string[];
  token: TokenSource;
  /** Device id (1-256 bytes of UTF-8). Default "default". */
  device?: string;
  /** "frame" (default): a first `{"type":"auth","token"}` frame; "query": `?token=`. */
  auth?: "query" | "frame";
  /** WebSocket implementation; default `globalThis.WebSocket` (pass `ws` in Node 20). */
  WebSocket?: WebSocketConstructor;
  /** Redirects followed in a row before backing off. Default 5. */
  maxHops?: number;
  /** Backoff: uniform(0, min(backoffCap, backoffBase * 2^attempt)) ms. Defaults 50 and 5000. */
  backoffBase?: number;
  backoffCap?: number;
  /** ms until a connection must be welcomed or redirected. Default 10000. */
  connectTimeout?: number;
  /** ms acks are batched for. Default 100. */
  ackInterval?: number;
  /** With a token function: seconds before the JWT's `exp` to fetch a new one. Default 30. */
  refreshBefore?: number;
  /** Ack each message once the "message" listeners returned. Default true. */
  autoAck?: boolean;
  /** Random source for the backoff jitter (tests). Default Math.random. */
  random?: () => number;
  /** Called with what a listener threw. Default: rethrown from a timer (an uncaught error). */
  onListenerError?: (err: unknown) => void;
}

export interface Message {
  readonly ch: Channel;
  readonly seq: number;
  /** The seq of the previous message of the same channel (and user), 0 if none. */
  readonly prev: number | null;
  readonly id: string;
  readonly data: unknown;
}

export interface Welcome {
  type: "welcome";
  node: string;
  user: string;
  device: string;
  epoch: string;
  heartbeat: { interval: number; timeout: number };
  recovered?: boolean;
  resume?: { user: number; broadcast: number };
}

export interface ClientEvents {
  message: Message;
  state: ClientState;
  welcome: Welcome;
  /** Messages of `ch` in [from, to] were deleted by retention before this device got them. */
  gap: { ch: Channel; from: number; to: number };
  /** The node refused `last`/`blast` for `ch` (beyond its stream's end): `ch` starts over. */
  resume_reset: { ch: Channel; refused: number; detail: string };
  /** A msg's prev was not the last seq received: the client reconnects and resumes. */
  chain_break: { ch: Channel; expected: number; prev: number; seq: number };
  /** The store was recreated: seqs restart (last and consumed were reset). */
  epoch_reset: { old: string; new: string };
  /** The resume was incomplete (retention deleted messages; a gap follows). */
  not_recovered: { node: string };
  /** An error frame from the node, or a token function that failed. */
  error: { code: string; detail: string };
  /** A connection ended (the client reconnects unless its state became "closed"). */
  close: { code: number; reason: string; node: string; url: string };
  /** A fresh token was fetched before expiry; the session moves onto it. */
  token_refresh: { exp: number | null };
}

export interface ClientStats {
  connects: number;
  welcomes: number;
  redirects: number;
  duplicates: number;
  gaps: number;
  chainBreaks: number;
  pings: number;
  tokenRefreshes: number;
  lastClose: number | null;
  lastError: string;
  nodes: string[];
}

export declare const Close: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  ABNORMAL: 1006;
  INVALID_DATA: 1007;
  POLICY: 1008;
  TOO_BIG: 1009;
  SLOW_CONSUMER: 4008;
  REDIRECT: 4302;
  UNAUTHORIZED: 4401;
  FORBIDDEN: 4403;
  HEARTBEAT_TIMEOUT: 4408;
  RATE_LIMITED: 4429;
  UNAVAILABLE: 4503;
}>;

/** After these close codes the client stops (state "closed"); after 4401 too when the token is a string. */
export declare const FINAL_CLOSE_CODES: readonly number[];

export declare const State: Readonly<{
  CONNECTING: "connecting";
  ONLINE: "online";
  REDIRECTING: "redirecting";
  BACKING_OFF: "backing_off";
  CLOSED: "closed";
}>;

/** Seconds at most that a refusal's `retry_after` holds the client back. */
export declare const MAX_RETRY_AFTER: number;

export declare function tokenExpiry(token: string): number | null;

export declare function backoffDelay(
  attempt: number,
  base: number,
  cap: number,
  random?: () => number,
): number;

export declare class MeshpushClient {
  constructor(options: ClientOptions);
  readonly options: Required<Omit<ClientOptions, "WebSocket">>;
  readonly bootstraps: string[];
  readonly device: string;
  readonly state: ClientState;
  /** The node serving the current (or last) session. */
  readonly node: string | null;
  readonly epoch: string | null;
  /** Newest seq received per channel (sent as last/blast on reconnect). */
  readonly last: Record<Channel, number>;
  /** Newest seq the application consumed per channel (acked). */
  readonly consumed: Record<Channel, number>;
  readonly stats: ClientStats;
  readonly bootstrap: string;
  on<K extends keyof ClientEvents>(event: K, listener: (value: ClientEvents[K]) => void): () => void;
  off<K extends keyof ClientEvents>(event: K, listener: (value: ClientEvents[K]) => void): void;
  start(): this;
  waitOnline(): Promise<void>;
  ack(msg: Message): void;
  close(): void;
}
