"""Single-connection helpers of the wire protocol, for the demo, the tests and the bench.

``open_events`` (one ``/events`` WebSocket, no reconnect) and ``SendConnection``
(many ``POST /send`` on one keep-alive connection) run under Trio only: they
are built on trio-websocket and Trio streams. Applications use
:func:`triows.client.open_client` instead, which reconnects by itself and runs
under asyncio and Trio alike; ``triows.client`` re-exports these names too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

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


def events_url(
    base_url: str,
    *,
    user: str | None = None,
    token: str | None = None,
    session: str | None = None,
    last: str | None = None,
    presence: bool = False,
) -> str:
    """The ``/events`` WebSocket URL of the instance (or load balancer) at ``base_url``.

    ``session`` and ``last`` resume a session: its token and the cursor
    (``<seq>-<message id>``) of the last message frame seen. ``presence``:
    the connection gets its rooms' presence events.
    """
    pairs = (
        ("user", user),
        ("token", token),
        ("session", session),
        ("last", last),
        ("presence", "1" if presence else None),
    )
    query = {key: value for key, value in pairs if value}
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
    presence: bool = False,
) -> AsyncIterator[EventsClient]:
    """Connect to ``/events`` as ``user`` (dev mode) or with ``token``; wait for ``hello``.

    ``presence``: get the presence events of the rooms joined.
    """
    url = events_url(base_url, user=user, token=token, presence=presence)
    async with open_websocket_url(url, max_message_size=max_message_size) as websocket:
        hello = json.loads(await websocket.get_message())
        yield EventsClient(websocket, hello)


def send_body(to: str | None, message: Any, sender: str | None, room: str | None = None) -> bytes:
    """The JSON body of ``POST /send``, compact as the server would write it."""
    body: dict[str, Any] = {"to": to, "message": message} if room is None else {"room": room}
    body["message"] = message
    if sender is not None:
        body["from"] = sender
    return json.dumps(body, separators=(",", ":")).encode()


class SendConnection:
    """One keep-alive HTTP/1.1 connection that POSTs ``/send`` requests one at a time
    (and GETs, for the bench's presence queries).

    The same request as :func:`triows.client.post_send`, for a caller that sends many: h11
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
        return await self.post(send_body(to, message, sender, room))

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """``POST /send`` with ``body`` (a JSON object, or an array for a batch); the status
        code and the response body. Raises :class:`h11.RemoteProtocolError` if the server
        closes the connection."""
        return await self._request("POST", "/send", body)

    async def get(self, target: str) -> tuple[int, bytes]:
        """``GET target`` (``/presence?user=Bob``, say) on the same connection; the status
        code and the response body."""
        return await self._request("GET", target, b"")

    async def _request(self, method: str, target: str, body: bytes) -> tuple[int, bytes]:
        if self._http.our_state is not h11.IDLE:
            # The last answer ended keep-alive: this request goes on a new connection.
            await self._stream.aclose()
            self._stream = await trio.open_tcp_stream(*self._address)
            self._http = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method=method,
            target=target,
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
