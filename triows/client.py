"""The triows client for applications: ``open_client`` and ``post_send``.

Both run under asyncio and Trio alike: ``open_client`` is built on AnyIO (tasks,
cancel scopes, memory streams, timeouts) with its WebSocket in
:mod:`triows.client_websocket`, and ``post_send`` on httpx. ``open_client``
holds one logical connection that reconnects by itself.

The single-connection helpers of the demo, the tests and the bench
(``open_events``, ``SendConnection``, ...) live in
:mod:`triows.single_connection` (Trio only) and are re-exported here.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import httpx
import trio

from triows.backoff import Backoff
from triows.client_websocket import (
    ClientWebSocket,
    HandshakeRefused,
    WebSocketClosed,
    open_websocket,
)
from triows.single_connection import (
    DEFAULT_MAX_MESSAGE_SIZE,
    EventsClient,
    SendConnection,
    events_url,
    open_events,
    open_send_connection,
    send_body,
)

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_INCOMING_QUEUE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_RECONNECT_MAX",
    "DEFAULT_REQUEST_TIMEOUT",
    "FINAL_HANDSHAKE_STATUSES",
    "RECONNECT_CLOSE_CODES",
    "ClientClosed",
    "ClientError",
    "ConnectionLost",
    "EventsClient",
    "RequestRefused",
    "RequestTimeout",
    "SendConnection",
    "TriowsClient",
    "client_logger",
    "events_url",
    "open_client",
    "open_events",
    "open_send_connection",
    "post_send",
]


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
        f"{base_url}/send", content=send_body(to, message, sender, room), headers=headers
    )


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

    ``code`` is the protocol's: ``offline``, ``full`` (the recipient's session,
    away, holds all it may), ``invalid``, ``too_large``, ``unavailable`` (and,
    for rooms, whatever the server documents).
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


class RequestTimeout(ClientError, TimeoutError, trio.TooSlowError):
    """No connection, or no answer from the server, within the request timeout.

    A ``TimeoutError`` under any event loop, and also a ``trio.TooSlowError``
    so that Trio code written against earlier releases keeps catching it.
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
    answered: anyio.Event = field(default_factory=anyio.Event)
    frame: dict[str, Any] | None = None
    error: ClientError | None = None


class TriowsClient:
    """One logical connection to triows that survives instance drains and restarts.

    Made by :func:`open_client`. Iterate it for the server's frames (``message``,
    ``joined``/``left`` are answered to :meth:`join`/:meth:`leave` instead), plus
    one ``{"type": "reconnected", ...}`` frame, made by the client, each time it
    connects again. ``hello`` is the current connection's ``hello`` frame, so
    ``client.hello["instance"]`` names the instance it is on.

    When the server holds sessions, each reconnect presents the session's token
    and the cursor of the last message frame received: ``"resumed": true`` in
    the ``reconnected`` frame means that the messages sent meanwhile (``missed``
    of them) follow it, none already received, and that the server joined the
    session's rooms again; ``"resumed": false`` (the window passed, or the
    server holds no sessions) means that they are lost, and the client joined
    its rooms again itself.
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
        presence: bool = False,
    ) -> None:
        if not urls:
            raise ValueError("open_client needs at least one URL")
        self._urls = list(urls)
        self._user = user
        self._token = token
        self._presence = presence
        self._backoff = Backoff(max_delay=reconnect_max)
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._max_message_size = max_message_size
        self._incoming_send, self._incoming = anyio.create_memory_object_stream[dict[str, Any]](
            incoming_queue
        )
        self._websocket: ClientWebSocket | None = None
        self._connected = anyio.Event()
        self._pending: dict[str, _Pending] = {}
        self._refs = itertools.count(1)
        self._rooms: set[str] = set()
        self._closed: ClientClosed | None = None
        self._stopped = False
        self._run_scope: anyio.CancelScope | None = None
        self._finished = anyio.Event()
        # The session to resume on the next connection: its token (from the
        # hello) and the cursor of the last message frame read off the socket.
        self._session: str | None = None
        self._cursor: str | None = None
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
        """The rooms this client has joined; they are joined again after each reconnect."""
        return frozenset(self._rooms)

    @property
    def session(self) -> str | None:
        """The token of the session the next reconnect resumes (None: the server holds none)."""
        return self._session

    @property
    def cursor(self) -> str | None:
        """``<seq>-<message id>`` of the last message frame of the session received, or None."""
        return self._cursor

    async def aclose(self) -> None:
        """Close for good with a normal close (1000), which ends the session at the server.

        Safe to call twice. Afterwards iterating ends and requests raise
        :class:`ClientClosed`. Leaving :func:`open_client`'s block does the same.
        """
        if self._run_scope is not None:
            self._run_scope.cancel()
            await self._finished.wait()

    # -- requests ----------------------------------------------------------------

    async def send(
        self, *, message: Any, to: str | None = None, room: str | None = None
    ) -> dict[str, Any]:
        """Send ``message`` to user ``to`` or to ``room`` (exactly one); return the ``ack`` frame.

        Raises :class:`RequestRefused` for an ``error`` answer, :class:`ConnectionLost`
        if the connection closed first, :class:`ClientClosed` once the client has
        stopped, :class:`RequestTimeout` after the request timeout.
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

    async def presence(self, *, user: str | None = None, room: str | None = None) -> dict[str, Any]:
        """Who is in ``room``, or whether ``user`` is online (exactly one); the answer frame.

        ``{"room": ..., "users": [...], "complete": ..., "truncated": ...}`` or
        ``{"user": ..., "online": ..., "connections": ..., "complete": ...}``:
        ``complete`` is false when an instance did not answer in time.
        """
        if (user is None) == (room is None):
            raise ValueError("presence() takes exactly one of user and room")
        question = {"user": user} if room is None else {"room": room}
        return await self._request({"type": "presence", **question})

    async def leave(self, room: str) -> dict[str, Any]:
        """Leave ``room``; return the ``left`` frame."""
        self._rooms.discard(room)
        return await self._request({"type": "leave", "room": room})

    async def _request(self, frame: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._request_within_timeout(frame)
        except TimeoutError:
            raise RequestTimeout(
                f"no answer within the request timeout ({self._request_timeout}s)"
            ) from None

    async def _request_within_timeout(self, frame: dict[str, Any]) -> dict[str, Any]:
        with anyio.fail_after(self._request_timeout):
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
                    await websocket.send_text(json.dumps({**frame, "ref": ref}))
                except WebSocketClosed:
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
        except anyio.EndOfStream:
            if self._closed is not None:
                raise self._closed from None
            raise StopAsyncIteration from None

    async def receive(self) -> dict[str, Any]:
        """The next frame (what one step of ``async for`` gives)."""
        return await self.__anext__()

    # -- the connection loop -------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, read, and reconnect until cancelled or closed for good.

        Signals ``task_status.started()`` after the first ``hello``; a final
        refusal before that (e.g. a 401 handshake) raises :class:`ClientClosed`.
        """
        try:
            with anyio.CancelScope() as self._run_scope:
                await self._connect_until_closed(task_status)
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
            self._finished.set()

    async def _connect_until_closed(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        index = 0
        previous: dict[str, Any] = {}
        while True:
            self.url = self._urls[index % len(self._urls)]
            close_code: int | str
            try:
                close_code = await self._connect_and_read(previous, task_status)
            except HandshakeRefused as refused:
                if refused.status in FINAL_HANDSHAKE_STATUSES:
                    raise ClientClosed(refused.status, refused.body) from None
                close_code = f"handshake {refused.status}"
            except WebSocketClosed as closed:
                # Closed before or instead of hello (e.g. 1013: the instance is full).
                if closed.code not in RECONNECT_CLOSE_CODES:
                    raise ClientClosed(closed.code, closed.reason) from None
                close_code = closed.code
            except (OSError, anyio.BrokenResourceError) as error:
                # OSError covers refused connections, TLS errors and TimeoutError.
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
            await anyio.sleep(delay)

    async def _connect_and_read(
        self, previous: dict[str, Any], task_status: anyio.abc.TaskStatus[None]
    ) -> int:
        """One connection: handshake, hello, resume or re-join, read until closed.

        Returns the close code; raises :class:`ClientClosed` for a close code
        reconnecting cannot fix.
        """
        url = events_url(
            self.url,
            user=self._user,
            token=self._token,
            session=self._session,
            last=self._cursor,
            presence=self._presence,
        )
        async with open_websocket(
            url, max_message_size=self._max_message_size, connect_timeout=self._connect_timeout
        ) as websocket:
            try:
                with anyio.fail_after(self._connect_timeout):
                    hello = json.loads(await websocket.receive_text())
                reconnected = bool(self.hello)
                resumed = bool(hello.get("resumed"))
                self.hello = hello
                self._session = hello.get("session")
                if not resumed:
                    # A fresh session (or none): its frames are numbered from 1.
                    self._cursor = None
                self._backoff.reset()
                self._websocket = websocket
                self._connected.set()
                if not reconnected:
                    task_status.started()
                elif resumed:
                    # The server joined the session's rooms again; the frame goes
                    # ahead of the messages that waited, which come first.
                    await self._reconnected(previous, sorted(self._rooms), {})
                async with anyio.create_task_group() as tasks:
                    if reconnected and not resumed:
                        tasks.start_soon(self._rejoin, previous)
                    code, reason = await self._read(websocket)
                    tasks.cancel_scope.cancel()
            finally:
                self._websocket = None
                self._connected = anyio.Event()
                self._fail_pending(ConnectionLost(_lost_detail(websocket)))
        if code not in RECONNECT_CLOSE_CODES:
            raise ClientClosed(code, reason)
        return code

    async def _read(self, websocket: ClientWebSocket) -> tuple[int, str]:
        try:
            while True:
                frame: dict[str, Any] = json.loads(await websocket.receive_text())
                pending = self._pending.get(str(frame.get("ref")))
                answer = frame.get("type") in ("ack", "error", "joined", "left", "presence")
                if answer and pending:
                    pending.frame = frame
                    pending.answered.set()
                else:
                    await self._incoming_send.send(frame)
                    if frame.get("type") == "message" and "seq" in frame:
                        # Received is enough: the frames queued here outlive the
                        # connection, so a resume must not bring them again.
                        self._cursor = f"{frame['seq']}-{frame['id']}"
        except WebSocketClosed as closed:
            return closed.code, closed.reason

    async def _rejoin(self, previous: dict[str, Any]) -> None:
        rejoined, failed = [], {}
        for room in sorted(self._rooms):
            try:
                await self._request({"type": "join", "room": room})
                rejoined.append(room)
            except RequestRefused as refused:
                self._rooms.discard(room)
                failed[room] = refused.code
            except (ConnectionLost, RequestTimeout):
                # This connection is going away; the next one joins every room again.
                return
        await self._reconnected(previous, rejoined, failed)

    async def _reconnected(
        self, previous: dict[str, Any], rooms: list[str], failed: dict[str, str]
    ) -> None:
        """Count the reconnect, log it and hand the ``reconnected`` frame to the iteration."""
        self.reconnects += 1
        resumed = bool(self.hello.get("resumed"))
        event = {
            "type": "reconnected",
            "instance": self.instance,
            "previous_instance": previous.get("instance"),
            "url": self.url,
            "resumed": resumed,
            "missed": int(self.hello.get("missed", 0)),
            "rooms": rooms,
            "rooms_failed": failed,
        }
        client_logger.warning(
            "triows client reconnected to %s (instance %s, was %s); %s; rooms: %s",
            self.url,
            event["instance"],
            event["previous_instance"],
            f"session resumed, {event['missed']} missed" if resumed else "not resumed",
            ", ".join(rooms) or "none",
        )
        await self._incoming_send.send(event)

    def _fail_pending(self, error: ClientError) -> None:
        for pending in self._pending.values():
            if not pending.answered.is_set():
                pending.error = error
                pending.answered.set()


def _lost_detail(websocket: ClientWebSocket) -> str:
    closed = websocket.closed
    why = "" if closed is None else f" ({closed})"
    return f"the connection closed before the server answered{why}"


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
    presence: bool = False,
) -> AsyncIterator[TriowsClient]:
    """Connect to triows at ``url`` (``http://host:port``) as ``user`` (dev mode) or with ``token``.

    Yields once the first ``hello`` has arrived. Behind a load balancer pass
    its one URL; without one, a list of instance URLs: each reconnect tries the
    next URL in the list. On 1012 (drain), 1006 (connection broke) and
    connection errors the client reconnects with capped, jittered backoff
    (:class:`triows.backoff.Backoff`), resumes its session (or, when that is
    not possible, joins its rooms again), logs a warning and yields a
    ``{"type": "reconnected", "instance": ..., "resumed": ..., "missed": ...,
    "rooms": [...]}`` frame. Iterate the client while sending: frames wait in a
    bounded queue (``incoming_queue``), and while it is full the socket is not
    read. Leaving the block (or :meth:`TriowsClient.aclose`) closes with 1000,
    which ends the session. ``presence``: the rooms' presence events
    (``{"type": "presence", "room": ..., "joined"|"left": ...}``) come through
    the iterator too.
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
        presence=presence,
    )
    try:
        async with anyio.create_task_group() as tasks:
            await tasks.start(client.run)
            try:
                yield client
            finally:
                tasks.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # After it has started, client.run stores its errors rather than
        # raising them, so the group holds one exception: the caller's own,
        # or the refusal that kept the client from starting. Raise it as is.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
