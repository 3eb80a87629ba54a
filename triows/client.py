"""Clients of the triows wire protocol.

``open_client`` is the one for applications: it reconnects by itself. ``open_events``,
``post_send`` and ``SendConnection`` are single-connection helpers for the demo,
the tests and the bench.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11
import httpx
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from triows.backoff import Backoff

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
RECEIVE_SIZE = 65536


@dataclass
class EventsClient:
    """An open ``/events`` WebSocket; ``hello`` is the server's first frame."""

    websocket: WebSocketConnection
    hello: dict[str, Any]

    async def receive(self) -> dict[str, Any]:
        """The next frame from the server, decoded."""
        frame: dict[str, Any] = json.loads(await self.websocket.get_message())
        return frame

    async def send(
        self, to: str | None, message: Any, ref: str | None = None, *, room: str | None = None
    ) -> None:
        """Send to user ``to`` or (``to=None``) to ``room``; the answer comes as a frame."""
        frame: dict[str, Any] = {"type": "send", "to": to, "message": message}
        if room is not None:
            del frame["to"]
            frame["room"] = room
        if ref is not None:
            frame["ref"] = ref
        await self.websocket.send_message(json.dumps(frame))

    async def join(self, room: str, ref: str | None = None) -> None:
        """Ask to join ``room``; ``joined`` (or an ``error``) comes as a frame."""
        await self.websocket.send_message(json.dumps({"type": "join", "room": room, "ref": ref}))

    async def leave(self, room: str, ref: str | None = None) -> None:
        """Ask to leave ``room``; ``left`` comes as a frame."""
        await self.websocket.send_message(json.dumps({"type": "leave", "room": room, "ref": ref}))

    @property
    def close_code(self) -> int | None:
        """The close code once the connection is closed, else None."""
        closed = self.websocket.closed
        return None if closed is None else closed.code

    async def wait_closed(self) -> int:
        """Read (and discard) frames until the server closes; return the close code."""
        try:
            while True:
                await self.websocket.get_message()
        except ConnectionClosed as closed:
            code: int = closed.reason.code if closed.reason is not None else 1005
            return code


def events_url(base_url: str, *, user: str | None = None, token: str | None = None) -> str:
    query = {key: value for key, value in (("user", user), ("token", token)) if value}
    scheme, _, rest = base_url.partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    return f"{ws_scheme}://{rest}/events" + (f"?{urlencode(query)}" if query else "")


@asynccontextmanager
async def open_events(
    base_url: str,
    *,
    user: str | None = None,
    token: str | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> AsyncIterator[EventsClient]:
    """Connect to ``/events`` as ``user`` (dev mode) or with ``token``; wait for ``hello``."""
    url = events_url(base_url, user=user, token=token)
    async with open_websocket_url(url, max_message_size=max_message_size) as websocket:
        hello = json.loads(await websocket.get_message())
        yield EventsClient(websocket, hello)


async def post_send(
    http: httpx.AsyncClient,
    base_url: str,
    to: str | None,
    message: Any,
    *,
    sender: str | None = None,
    token: str | None = None,
    room: str | None = None,
) -> httpx.Response:
    """``POST /send`` to user ``to`` or (``to=None``) to ``room``.

    ``sender`` is the dev-mode ``from``, ``token`` a bearer token.
    """
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return await http.post(
        f"{base_url}/send", content=_send_body(to, message, sender, room), headers=headers
    )


def _send_body(to: str | None, message: Any, sender: str | None, room: str | None = None) -> bytes:
    body: dict[str, Any] = {"to": to, "message": message} if room is None else {"room": room}
    body["message"] = message
    if sender is not None:
        body["from"] = sender
    return json.dumps(body, separators=(",", ":")).encode()


class SendConnection:
    """One keep-alive HTTP/1.1 connection that POSTs ``/send`` requests one at a time.

    The same request as :func:`post_send`, for a caller that sends many: h11
    over a Trio stream spends a fraction of the CPU httpx's pool spends per
    request, so the bench's load generator measures the server, not itself.
    When the server ended keep-alive with its last answer (Hypercorn does
    after ``keep_alive_max_requests``), the next request opens a new
    connection first. Not safe for concurrent use: one request in flight.
    """

    def __init__(
        self, stream: trio.SocketStream, address: tuple[str, int], host: str, token: str | None
    ) -> None:
        self._stream = stream
        self._address = address
        self._http = h11.Connection(h11.CLIENT)
        self._headers = [("Host", host), ("Content-Type", "application/json")]
        if token:
            self._headers.append(("Authorization", f"Bearer {token}"))

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def send(
        self, to: str | None, message: Any, *, sender: str | None = None, room: str | None = None
    ) -> tuple[int, bytes]:
        """``POST /send`` to ``to`` or (``to=None``) ``room``; return the status and the body.

        Raises :class:`h11.RemoteProtocolError` if the server closes the connection.
        """
        return await self.post(_send_body(to, message, sender, room))

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """``POST /send`` with ``body`` (a JSON object, or an array for a batch); the status
        code and the response body. Raises :class:`h11.RemoteProtocolError` if the server
        closes the connection."""
        if self._http.our_state is not h11.IDLE:
            # The last answer ended keep-alive: this request goes on a new connection.
            await self._stream.aclose()
            self._stream = await trio.open_tcp_stream(*self._address)
            self._http = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="POST",
            target="/send",
            headers=[*self._headers, ("Content-Length", str(len(body)))],
        )
        # One write per request: headers and body together.
        await self._stream.send_all(
            b"".join(
                self._http.send(event) or b""
                for event in (request, h11.Data(data=body), h11.EndOfMessage())
            )
        )
        status = 0
        chunks: list[bytes] = []
        while True:
            event = self._http.next_event()
            if event is h11.NEED_DATA:
                self._http.receive_data(await self._stream.receive_some(RECEIVE_SIZE))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                if self._http.our_state is h11.DONE and self._http.their_state is h11.DONE:
                    self._http.start_next_cycle()
                # Else the server ended keep-alive (``Connection: close``): this answer
                # stands, and the next request goes on a new connection.
                return status, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("the server closed the connection")


@asynccontextmanager
async def open_send_connection(
    base_url: str, *, token: str | None = None
) -> AsyncIterator[SendConnection]:
    """Open one keep-alive connection to ``base_url`` (``http://`` only) for ``POST /send``."""
    parts = urlsplit(base_url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"open_send_connection takes an http:// URL, got {base_url!r}")
    address = (parts.hostname, parts.port or 80)
    connection = SendConnection(await trio.open_tcp_stream(*address), address, parts.netloc, token)
    try:
        yield connection
    finally:
        await connection.aclose()


# --- A reconnecting client: open_client -------------------------------------

client_logger = logging.getLogger("triows.client")

# Close codes after which connecting again can help: the server went away or
# is draining (1001, 1012), the connection broke without a close frame (1006),
# one frame was over the size limit (1009: that send fails, the next may
# not), the server failed or is overloaded (1011, 1013). Any other code (1008
# a frame the server does not understand, 4001 slow consumer, 4401 token
# expired) means this client or its token must change first, so the client
# stops and says why.
RECONNECT_CLOSE_CODES = frozenset({1001, 1006, 1009, 1011, 1012, 1013})
# Handshake statuses that no retry can fix: bad or missing credentials, bad name.
FINAL_HANDSHAKE_STATUSES = frozenset({400, 401, 403})
DEFAULT_RECONNECT_MAX = 10.0
"""Seconds; the cap of the jittered delay between reconnect attempts."""
DEFAULT_REQUEST_TIMEOUT = 30.0
"""Seconds a ``send``/``join``/``leave`` waits for a connection and the server's answer."""
DEFAULT_INCOMING_QUEUE = 1024
"""Frames received but not yet taken by ``async for``; when full, reading the socket pauses."""
DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds one connection attempt (TCP, WebSocket handshake, ``hello``) may take."""


class ClientError(Exception):
    """Base class of what :class:`TriowsClient` raises."""


class RequestRefused(ClientError):
    """The server answered a request with an ``error`` frame.

    ``code`` is the protocol's: ``offline``, ``invalid``, ``too_large``,
    ``unavailable`` (and, for rooms, whatever the server documents).
    """

    def __init__(self, frame: dict[str, Any]) -> None:
        self.frame = frame
        self.code: str = str(frame.get("code"))
        self.detail: str = str(frame.get("detail", ""))
        self.ref: str | None = frame.get("ref")
        super().__init__(f"{self.code}: {self.detail}")


class ConnectionLost(ClientError):
    """The connection closed before the server answered a request.

    The request may or may not have reached the server (a ``send`` may have
    been delivered); the client reconnects by itself, so retrying is possible.
    """


class ClientClosed(ClientError):
    """The client stopped for good: a close code or handshake status that reconnecting cannot fix.

    ``code`` is the WebSocket close code (e.g. 4401 token expired) or, for a
    refused handshake, the HTTP status (e.g. 401).
    """

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"closed with {code}: {reason}" if reason else f"closed with {code}")


@dataclass
class _Pending:
    answered: trio.Event = field(default_factory=trio.Event)
    frame: dict[str, Any] | None = None
    error: ClientError | None = None


class TriowsClient:
    """One logical connection to triows that survives instance drains and restarts.

    Made by :func:`open_client`. Iterate it for the server's frames (``message``,
    ``joined``/``left`` are answered to :meth:`join`/:meth:`leave` instead), plus
    one ``{"type": "reconnected", ...}`` frame, made by the client, each time it
    connects again. ``hello`` is the current connection's ``hello`` frame, so
    ``client.hello["instance"]`` names the instance it is on.
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        user: str | None,
        token: str | None,
        reconnect_max: float,
        request_timeout: float,
        connect_timeout: float,
        incoming_queue: int,
        max_message_size: int,
    ) -> None:
        if not urls:
            raise ValueError("open_client needs at least one URL")
        self._urls = list(urls)
        self._user = user
        self._token = token
        self._backoff = Backoff(max_delay=reconnect_max)
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._max_message_size = max_message_size
        self._incoming_send, self._incoming = trio.open_memory_channel[dict[str, Any]](
            incoming_queue
        )
        self._websocket: WebSocketConnection | None = None
        self._connected = trio.Event()
        self._pending: dict[str, _Pending] = {}
        self._refs = itertools.count(1)
        self._rooms: set[str] = set()
        self._closed: ClientClosed | None = None
        self._stopped = False
        self.hello: dict[str, Any] = {}
        self.url: str = self._urls[0]
        self.reconnects = 0

    @property
    def instance(self) -> str | None:
        """The id of the instance the current (or last) connection is on."""
        instance = self.hello.get("instance")
        return None if instance is None else str(instance)

    @property
    def rooms(self) -> frozenset[str]:
        """The rooms this client has joined; it joins them again after each reconnect."""
        return frozenset(self._rooms)

    # -- requests ----------------------------------------------------------------

    async def send(
        self, *, message: Any, to: str | None = None, room: str | None = None
    ) -> dict[str, Any]:
        """Send ``message`` to user ``to`` or to ``room`` (exactly one); return the ``ack`` frame.

        Raises :class:`RequestRefused` for an ``error`` answer, :class:`ConnectionLost`
        if the connection closed first, :class:`ClientClosed` once the client has
        stopped, ``trio.TooSlowError`` after the request timeout.
        """
        if (to is None) == (room is None):
            raise ValueError("send takes exactly one of to= or room=")
        frame: dict[str, Any] = {"type": "send", "message": message}
        if to is not None:
            frame["to"] = to
        else:
            frame["room"] = room
        return await self._request(frame)

    async def join(self, room: str) -> dict[str, Any]:
        """Join ``room``; return the ``joined`` frame. Re-joined after every reconnect."""
        answer = await self._request({"type": "join", "room": room})
        self._rooms.add(room)
        return answer

    async def leave(self, room: str) -> dict[str, Any]:
        """Leave ``room``; return the ``left`` frame."""
        self._rooms.discard(room)
        return await self._request({"type": "leave", "room": room})

    async def _request(self, frame: dict[str, Any]) -> dict[str, Any]:
        with trio.fail_after(self._request_timeout):
            while True:
                if self._closed is not None:
                    raise self._closed
                if self._stopped:
                    raise ClientClosed(1000, "the client was closed")
                if self._websocket is not None:
                    break
                await self._connected.wait()
            websocket = self._websocket
            ref = f"c{next(self._refs)}"
            pending = self._pending[ref] = _Pending()
            try:
                try:
                    await websocket.send_message(json.dumps({**frame, "ref": ref}))
                except ConnectionClosed:
                    raise ConnectionLost(
                        "the connection closed before the frame was sent"
                    ) from None
                await pending.answered.wait()
            finally:
                self._pending.pop(ref, None)
        if pending.error is not None:
            raise pending.error
        assert pending.frame is not None
        if pending.frame.get("type") == "error":
            raise RequestRefused(pending.frame)
        return pending.frame

    # -- frames ------------------------------------------------------------------

    def __aiter__(self) -> TriowsClient:
        return self

    async def __anext__(self) -> dict[str, Any]:
        """The next frame; raises :class:`ClientClosed` once the client has stopped for good."""
        try:
            return await self._incoming.receive()
        except trio.EndOfChannel:
            if self._closed is not None:
                raise self._closed from None
            raise StopAsyncIteration from None

    async def receive(self) -> dict[str, Any]:
        """The next frame (what one step of ``async for`` gives)."""
        return await self.__anext__()

    # -- the connection loop -------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, read, and reconnect until cancelled or closed for good.

        Signals ``task_status.started()`` after the first ``hello``; a final
        refusal before that (e.g. a 401 handshake) raises :class:`ClientClosed`.
        """
        index = 0
        previous: dict[str, Any] = {}
        try:
            while True:
                self.url = self._urls[index % len(self._urls)]
                close_code: int | str
                try:
                    close_code = await self._connect_and_read(previous, task_status)
                except ConnectionRejected as rejected:
                    if rejected.status_code in FINAL_HANDSHAKE_STATUSES:
                        body = (rejected.body or b"").decode(errors="replace")
                        raise ClientClosed(rejected.status_code, body) from None
                    close_code = f"handshake {rejected.status_code}"
                except ConnectionClosed as closed:
                    # Closed before or instead of hello (e.g. 1013: the instance is full).
                    code, reason = _close_code(closed)
                    if code not in RECONNECT_CLOSE_CODES:
                        raise ClientClosed(code, reason) from None
                    close_code = code
                except (
                    OSError,
                    HandshakeError,
                    trio.BrokenResourceError,
                    trio.TooSlowError,
                ) as error:
                    close_code = type(error).__name__
                previous = self.hello
                index += 1
                delay = self._backoff.next_delay()
                client_logger.warning(
                    "triows client disconnected (%s); reconnecting to %s in %.3fs",
                    close_code,
                    self._urls[index % len(self._urls)],
                    delay,
                )
                await trio.sleep(delay)
        except ClientClosed as closed:
            self._closed = closed
            if not self.hello:
                raise
        finally:
            self._stopped = True
            # Wake requests waiting for a connection: none will come.
            self._connected.set()
            self._fail_pending(ConnectionLost("the client stopped"))
            self._incoming_send.close()

    async def _connect_and_read(
        self, previous: dict[str, Any], task_status: trio.TaskStatus[None]
    ) -> int:
        """One connection: handshake, hello, re-join, read until closed; return the close code.

        Raises :class:`ClientClosed` for a close code reconnecting cannot fix.
        """
        url = events_url(self.url, user=self._user, token=self._token)
        async with open_websocket_url(
            url,
            max_message_size=self._max_message_size,
            connect_timeout=self._connect_timeout,
            disconnect_timeout=self._connect_timeout,
        ) as websocket:
            try:
                with trio.fail_after(self._connect_timeout):
                    hello = json.loads(await websocket.get_message())
                reconnected = bool(self.hello)
                self.hello = hello
                self._backoff.reset()
                self._websocket = websocket
                self._connected.set()
                if not reconnected:
                    task_status.started()
                async with trio.open_nursery() as nursery:
                    if reconnected:
                        nursery.start_soon(self._rejoin, previous)
                    code, reason = await self._read(websocket)
                    nursery.cancel_scope.cancel()
            finally:
                self._websocket = None
                self._connected = trio.Event()
                self._fail_pending(ConnectionLost(_lost_detail(websocket)))
        if code not in RECONNECT_CLOSE_CODES:
            raise ClientClosed(code, reason)
        return code

    async def _read(self, websocket: WebSocketConnection) -> tuple[int, str]:
        try:
            while True:
                frame: dict[str, Any] = json.loads(await websocket.get_message())
                pending = self._pending.get(str(frame.get("ref")))
                if frame.get("type") in ("ack", "error", "joined", "left") and pending:
                    pending.frame = frame
                    pending.answered.set()
                else:
                    await self._incoming_send.send(frame)
        except ConnectionClosed as closed:
            return _close_code(closed)

    async def _rejoin(self, previous: dict[str, Any]) -> None:
        rejoined, failed = [], {}
        for room in sorted(self._rooms):
            try:
                await self._request({"type": "join", "room": room})
                rejoined.append(room)
            except RequestRefused as refused:
                self._rooms.discard(room)
                failed[room] = refused.code
            except (ConnectionLost, trio.TooSlowError):
                # This connection is going away; the next one joins every room again.
                return
        self.reconnects += 1
        event = {
            "type": "reconnected",
            "instance": self.instance,
            "previous_instance": previous.get("instance"),
            "url": self.url,
            "rooms": rejoined,
            "rooms_failed": failed,
        }
        client_logger.warning(
            "triows client reconnected to %s (instance %s, was %s); rooms re-joined: %s",
            self.url,
            event["instance"],
            event["previous_instance"],
            ", ".join(rejoined) or "none",
        )
        await self._incoming_send.send(event)

    def _fail_pending(self, error: ClientError) -> None:
        for pending in self._pending.values():
            if not pending.answered.is_set():
                pending.error = error
                pending.answered.set()


def _lost_detail(websocket: WebSocketConnection) -> str:
    closed = websocket.closed
    why = "" if closed is None else f" (closed with {closed.code} {closed.reason or ''})".rstrip()
    return f"the connection closed before the server answered{why}"


def _close_code(closed: ConnectionClosed) -> tuple[int, str]:
    if closed.reason is None:
        return 1006, ""
    return closed.reason.code, closed.reason.reason or ""


@asynccontextmanager
async def open_client(
    url: str | Sequence[str],
    *,
    user: str | None = None,
    token: str | None = None,
    reconnect_max: float = DEFAULT_RECONNECT_MAX,
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    incoming_queue: int = DEFAULT_INCOMING_QUEUE,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
) -> AsyncIterator[TriowsClient]:
    """Connect to triows at ``url`` (``http://host:port``) as ``user`` (dev mode) or with ``token``.

    Yields once the first ``hello`` has arrived. Behind a load balancer pass
    its one URL; without one, a list of instance URLs: each reconnect tries the
    next URL in the list. On 1012 (drain), 1006 (connection broke) and
    connection errors the client reconnects with capped, jittered backoff
    (:class:`triows.backoff.Backoff`), joins its rooms again, logs a warning and
    yields a ``{"type": "reconnected", "instance": ..., "rooms": [...]}`` frame.
    Iterate the client while sending: frames wait in a bounded queue
    (``incoming_queue``), and while it is full the socket is not read.
    """
    urls = [url] if isinstance(url, str) else list(url)
    client = TriowsClient(
        urls,
        user=user,
        token=token,
        reconnect_max=reconnect_max,
        request_timeout=request_timeout,
        connect_timeout=connect_timeout,
        incoming_queue=incoming_queue,
        max_message_size=max_message_size,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # After it has started, client.run stores its errors rather than
        # raising them, so the group holds one exception: the caller's own,
        # or the refusal that kept the client from starting. Raise it as is.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
