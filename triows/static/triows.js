// triows browser client: one logical connection to a triows server's /events
// WebSocket that survives drains and restarts. Dependency-free ES module, no
// build step; served by every triows instance at /triows.js. The wire protocol
// is docs/protocol.md; the guide, with a complete example page, is docs/client.md.
//
//   import {TriowsClient} from "/triows.js";
//   const client = new TriowsClient({user: "Anne"});       // or {token: jwt}
//   client.addEventListener("message", (event) => console.log(event.detail.frame));
//   await client.connect();                                   // the first hello
//   // {storage: sessionStorage} in the options: a reload of the page resumes too
//   await client.join("general");                             // the joined frame
//   const ack = await client.send({room: "general", message: "hi"});
//   // {presence: true} in the options: "presence" events as members come and go
//   const {users} = await client.presence({room: "general"});

// Close codes after which the client connects again by itself: going away,
// connection lost, frame too large, server error, instance draining, busy.
// Any other code (1008 bad frame, 4001 slow consumer, 4401 token expired)
// stops it, and a "closed" event tells the app why.
export const RECONNECT_CODES = Object.freeze([1001, 1006, 1009, 1011, 1012, 1013]);
export const TOKEN_EXPIRED = 4401;
export const CLOSE_REASONS = Object.freeze({
  1000: "closed", 1001: "server going away", 1006: "connection lost",
  1008: "invalid frame", 1009: "frame too large", 1011: "server error",
  1012: "instance draining", 1013: "server busy", 4001: "slow consumer", 4401: "token expired",
});
// Acked ids of this client's sends that may still come back to it (room
// messages, notes to self): bounded, the oldest forgotten first.
const ECHOES_KEPT = 256;

/** The server answered a send, join, leave or presence with an `error` frame (`code`, `detail`). */
export class RequestRefused extends Error {
  constructor(frame) {
    super(`${frame.code}: ${frame.detail}`);
    this.name = "RequestRefused";
    this.code = frame.code;
    this.detail = frame.detail;
    this.frame = frame;
  }
}

/** No answer: the socket closed first (`code`; the request may or may not have
 * taken effect), the client was not connected, or the request timed out. */
export class ConnectionLost extends Error {
  constructor(message, code = null) {
    super(message);
    this.name = "ConnectionLost";
    this.code = code;
  }
}

/**
 * One logical connection; an EventTarget. Events (CustomEvent, in `detail`):
 *   "state"   {state, code, reason, delay}: state is connecting | connected |
 *             reconnecting | closed | disconnected; code/reason of the close that
 *             caused it; delay (ms) before the next attempt when reconnecting
 *   "hello"   {hello, reconnected, previousInstance, resumed, missed}: a
 *             connection is up; resumed: it took up the session of the last one,
 *             and the `missed` messages sent meanwhile come next (none twice)
 *   "message" {frame, echo}: a delivered message; echo is the object given to
 *             send() when the message is this client's own send coming back
 *             (a room it is in, a note to itself), else null
 *   "rejoined" {room, resumed} / "rejoin-failed" {room, error}: a room after a
 *             reconnect; resumed: the server joined it again with the session
 *   "presence" {room, user, joined, frame}: with the `presence` option, `user`'s
 *             first connection joined (joined: true) or last one left (false) a
 *             room this client is in; this client's own join included. None is
 *             replayed after a reconnect: ask presence({room}) again then
 *   "closed"  {code, reason, established}: stopped for good (not by close());
 *             code 4401 (TOKEN_EXPIRED): call connect({token: fresh}) again
 */
export class TriowsClient extends EventTarget {
  #url; #credentials; #presence; #socket = null; #wanted = false; #established = false;
  #reconnecting = false; #attempt = 0; #timer = null; #refs = 0; #first = null;
  #lastInstance = null;
  // The session the next connection resumes: its token (from the hello) and the
  // cursor, "<seq>-<message id>" of the last message frame received.
  #session = null; #cursor = null; #storage; #storageKey;
  #pending = new Map();   // ref -> {resolve, reject, timer, request, echoId}
  #echoes = new Map();    // message id -> the send() request it acknowledged
  #rooms = new Set();     // joined rooms, joined again after each reconnect
  #rejoining = new Set(); // rooms of a lost connection not yet joined again

  /**
   * @param {object} options
   * @param {string} [options.url] the server (http, https, ws or wss; default: this page's origin)
   * @param {string} [options.user] the user name (dev mode), or
   * @param {string} [options.token] a JWT whose `sub` is the user
   * @param {number} [options.backoffInitialMs=250] the first reconnect's delay cap
   * @param {number} [options.backoffMaxMs=10000] the cap of every reconnect's delay
   * @param {number} [options.requestTimeoutMs=30000] how long send/join/leave wait for an answer
   * @param {Storage} [options.storage] where the session, its cursor and the rooms are kept
   *   (e.g. sessionStorage), so that a client made by a reload of the page resumes them
   * @param {boolean} [options.presence=false] ask for the rooms' "presence" events
   *   (`?presence=1` on every connection, resumes included)
   */
  constructor({url = globalThis.location?.origin, user, token,
               backoffInitialMs = 250, backoffMaxMs = 10000, requestTimeoutMs = 30000,
               storage = null, presence = false} = {}) {
    super();
    this.#url = url;
    this.#presence = presence === true;
    this.#storage = storage;
    this.#storageKey = `triows-session ${url}`;
    this.#credentials = {user, token};
    this.backoffInitialMs = backoffInitialMs;
    this.backoffMaxMs = backoffMaxMs;
    this.requestTimeoutMs = requestTimeoutMs;
    this.state = "disconnected";
    this.hello = null;       // the current connection's hello frame
    this.reconnects = 0;     // automatic reconnects so far
  }

  get user() { return this.hello?.user ?? null; }
  get instance() { return this.hello?.instance ?? null; }
  get rooms() { return new Set(this.#rooms); }
  get rejoining() { return new Set(this.#rejoining); }
  /** The session token the next connection presents (null: none yet, or the server keeps none). */
  get session() { return this.#session; }

  /** Connect (optionally with new credentials, e.g. a fresh token after 4401).
   * Resolves with the first hello; rejects with ConnectionLost if the socket
   * closes before one (refused credentials, server down): not retried. Rooms
   * still held from before a stop are joined again. */
  connect({user, token} = {}) {
    if (user !== undefined || token !== undefined) this.#credentials = {user, token};
    if (this.#wanted) return Promise.reject(new ConnectionLost("already connecting or connected"));
    this.#wanted = true;
    this.#established = false;
    this.#reconnecting = false;
    this.#attempt = 0;
    if (this.#session === null) this.#restore();
    for (const room of this.#rooms) this.#rejoining.add(room);
    return new Promise((resolve, reject) => {
      this.#first = {resolve, reject};
      this.#open();
    });
  }

  /** Close for good (code 1000, which ends the session at the server), forget the
   * session and the rooms; in-flight requests reject. */
  close() {
    this.#wanted = false;
    clearTimeout(this.#timer);
    this.#timer = null;
    this.#rooms.clear();
    this.#rejoining.clear();
    this.#session = this.#cursor = null;
    this.#forget();
    if (this.#socket) this.#socket.close(1000);
    else this.#setState("disconnected");
  }

  /** Send {to: "Bob", message} or {room: "general", message}; resolves with the
   * ack ({id, status}), rejects with RequestRefused or ConnectionLost. */
  send(request) {
    const {to, room, message} = request;
    const frame = room != null ? {type: "send", room, message} : {type: "send", to, message};
    return this.#request(frame, request);
  }

  /** Join a room; resolves with `joined` once every later room message reaches this client. */
  async join(room) {
    const answer = await this.#request({type: "join", room});
    this.#rooms.add(room);
    this.#rejoining.delete(room);
    this.#save();
    return answer;
  }

  /** Leave a room (resolves at once when not connected: the server holds nothing then). */
  async leave(room) {
    if (!this.#isOpen()) {
      this.#rooms.delete(room);
      this.#rejoining.delete(room);
      return {type: "left", room};
    }
    const answer = await this.#request({type: "leave", room});
    this.#rooms.delete(room);
    this.#rejoining.delete(room);
    this.#save();
    return answer;
  }

  /** Who is in a room, `presence({room})`, or whether a user is online, `presence({user})`
   * (exactly one). Resolves with the `presence` answer: {room, users, complete, truncated}
   * or {user, online, connections, complete}; complete is false when an instance did not
   * answer in time. Rejects with RequestRefused (`forbidden`, `rate_limited`, `invalid`)
   * or ConnectionLost. */
  presence({room, user} = {}) {
    if ((room == null) === (user == null)) {
      return Promise.reject(new TypeError("presence() takes exactly one of room and user"));
    }
    return this.#request(room != null ? {type: "presence", room} : {type: "presence", user});
  }

  #isOpen() { return this.#socket?.readyState === WebSocket.OPEN && this.hello !== null; }

  #emit(type, detail) { this.dispatchEvent(new CustomEvent(type, {detail})); }

  #setState(state, detail = {}) {
    this.state = state;
    this.#emit("state", {state, code: null, reason: "", delay: null, ...detail});
  }

  #request(frame, request = null) {
    if (!this.#isOpen()) return Promise.reject(new ConnectionLost("not connected"));
    const ref = "r" + (++this.#refs);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(ref);
        reject(new ConnectionLost(`no answer within ${this.requestTimeoutMs} ms`));
      }, this.requestTimeoutMs);
      this.#pending.set(ref, {resolve, reject, timer, request, echoId: null});
      this.#socket.send(JSON.stringify({...frame, ref}));
    });
  }

  #open() {
    this.#timer = null;
    const target = new URL("/events", this.#url);
    target.protocol = target.protocol.replace(/^http/, "ws");
    const {user, token} = this.#credentials;
    if (token) target.searchParams.set("token", token);
    else target.searchParams.set("user", user ?? "");
    if (this.#presence) target.searchParams.set("presence", "1");
    if (this.#session !== null) {
      target.searchParams.set("session", this.#session);
      if (this.#cursor !== null) target.searchParams.set("last", this.#cursor);
    }
    this.#setState(this.#reconnecting ? "reconnecting" : "connecting", {attempt: this.#attempt});
    const socket = new WebSocket(target);
    this.#socket = socket;
    socket.onmessage = (event) => { if (socket === this.#socket) this.#onFrame(JSON.parse(event.data)); };
    socket.onclose = (event) => { if (socket === this.#socket) this.#onClose(event.code, event.reason); };
  }

  #onFrame(frame) {
    const waiting = frame.ref != null ? this.#pending.get(frame.ref) : undefined;
    if (waiting && frame.type !== "message") {
      this.#pending.delete(frame.ref);
      clearTimeout(waiting.timer);
    }
    switch (frame.type) {
      case "hello": return this.#onHello(frame);
      case "message":
        if (frame.seq != null) {
          this.#cursor = `${frame.seq}-${frame.id}`;
          this.#save();
        }
        return this.#emit("message", {frame, echo: this.#echoOf(frame)});
      case "ack":
        if (waiting) {
          if (waiting.echoId === null && this.#mayComeBack(waiting.request)) this.#remember(frame.id, waiting.request);
          waiting.resolve(frame);
        }
        return;
      case "joined": case "left":
        return waiting?.resolve(frame);
      case "presence":
        // An answer carries the request's ref; an event has none.
        if ("ref" in frame) return waiting?.resolve(frame);
        return this.#emit("presence", {room: frame.room, user: frame.joined ?? frame.left,
                                       joined: frame.joined != null, frame});
      case "error":
        return waiting?.reject(new RequestRefused(frame));
    }
  }

  #onHello(hello) {
    const previousInstance = this.#lastInstance;
    const reconnected = this.#reconnecting;
    const resumed = hello.resumed === true, missed = hello.missed ?? 0;
    this.#lastInstance = hello.instance;
    this.hello = hello;
    this.#established = true;
    this.#reconnecting = false;
    this.#attempt = 0;
    this.#session = hello.session ?? null;
    // A fresh session (or none) numbers its frames from 1.
    if (!resumed) this.#cursor = null;
    this.#save();
    if (reconnected) this.reconnects += 1;
    this.#setState("connected");
    this.#emit("hello", {hello, reconnected, previousInstance, resumed, missed});
    if (this.#first) {
      this.#first.resolve(hello);
      this.#first = null;
    }
    if (resumed) {
      // The server joined the session's rooms again; what was missed comes next.
      const rooms = [...this.#rejoining];
      this.#rejoining.clear();
      for (const room of rooms) this.#emit("rejoined", {room, resumed: true});
      return;
    }
    for (const room of this.#rejoining) {
      this.join(room).then(
        () => this.#emit("rejoined", {room, resumed: false}),
        (error) => {
          // Refused (e.g. the token no longer allows it): the room is gone. Lost
          // again: the next connection tries it again.
          if (error instanceof RequestRefused) {
            this.#rooms.delete(room);
            this.#rejoining.delete(room);
          }
          this.#emit("rejoin-failed", {room, error});
        });
    }
  }

  // The session in `storage` (when given), for a client made by a reload of the
  // page. Storage can be unavailable (disabled, full): then it is not kept.
  #save() {
    if (!this.#storage || this.#session === null) return;
    const kept = {session: this.#session, cursor: this.#cursor, user: this.user, rooms: [...this.#rooms]};
    try { this.#storage.setItem(this.#storageKey, JSON.stringify(kept)); } catch {}
  }

  #restore() {
    let kept = null;
    try { kept = JSON.parse(this.#storage?.getItem(this.#storageKey) ?? "null"); } catch {}
    const {user} = this.#credentials;
    // Another user's session would not resume anyway (the server checks); skip it.
    if (!kept?.session || (user && kept.user !== user)) return;
    this.#session = kept.session;
    this.#cursor = kept.cursor ?? null;
    for (const room of kept.rooms ?? []) this.#rooms.add(room);
  }

  #forget() {
    try { this.#storage?.removeItem(this.#storageKey); } catch {}
  }

  // A room message, or a message to itself, comes back to the connection that
  // sent it; the app shows it once by matching `echo` to what it sent. The ack
  // and the delivery arrive in either order: by id once acked, else the first
  // unacked send with the same destination and message.
  #mayComeBack(request) { return request?.room != null || request?.to === this.user; }

  #remember(id, request) {
    this.#echoes.set(id, request);
    if (this.#echoes.size > ECHOES_KEPT) this.#echoes.delete(this.#echoes.keys().next().value);
  }

  #echoOf(frame) {
    const acked = this.#echoes.get(frame.id);
    if (acked) {
      this.#echoes.delete(frame.id);
      return acked;
    }
    if (frame.from !== this.user) return null;
    const text = JSON.stringify(frame.message);
    for (const waiting of this.#pending.values()) {
      const request = waiting.request;
      if (!request || waiting.echoId !== null || !this.#mayComeBack(request)) continue;
      const same = frame.room ? request.room === frame.room : request.room == null;
      if (same && JSON.stringify(request.message) === text) {
        waiting.echoId = frame.id;
        return request;
      }
    }
    return null;
  }

  #onClose(code, reason) {
    this.#socket = null;
    this.hello = null;
    reason = reason || CLOSE_REASONS[code] || "";
    for (const waiting of this.#pending.values()) {
      clearTimeout(waiting.timer);
      waiting.reject(new ConnectionLost(`connection closed (${code} ${reason})`.trim(), code));
    }
    this.#pending.clear();
    if (!this.#wanted) {
      this.#first?.reject(new ConnectionLost("closed before the first hello", code));
      this.#first = null;
      this.#setState("disconnected", {code, reason});
      return;
    }
    if (this.#established && RECONNECT_CODES.includes(code)) {
      const delay = Math.random() * Math.min(this.backoffMaxMs, this.backoffInitialMs * 2 ** this.#attempt);
      this.#attempt += 1;
      this.#reconnecting = true;
      for (const room of this.#rooms) this.#rejoining.add(room);
      this.#setState("reconnecting", {code, reason, delay});
      this.#timer = setTimeout(() => this.#open(), delay);
      return;
    }
    this.#wanted = false;
    this.#setState("closed", {code, reason});
    if (this.#first) {
      this.#first.reject(new ConnectionLost(`could not connect (${code} ${reason})`.trim(), code));
      this.#first = null;
    }
    this.#emit("closed", {code, reason, established: this.#established});
  }
}
