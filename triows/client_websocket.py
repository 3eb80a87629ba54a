"""One client WebSocket over AnyIO, so that :mod:`triows.client` runs under asyncio and Trio alike.

wsproto does the handshake and the framing; this module adds the socket
(``anyio.connect_tcp``, TLS for ``wss://``), answers pings and the server's
close, and bounds what it buffers. Written here rather than taken from
httpx-ws because the client needs three things that library does not give:
a bound on the size of one incoming message (httpx-ws joins fragments without
a limit), the body of a refused handshake (the problem detail that says why a
token was refused), and errors raised as they are rather than wrapped in the
exception group of a background task group.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

RECEIVE_SIZE = 65536
REFUSAL_BODY_LIMIT = 16384
"""Bytes of a refused handshake's body kept for the error message."""
CLOSE_ABNORMAL = 1006
CLOSE_TOO_BIG = 1009


class WebSocketClosed(Exception):
    """The connection is closed: by a close frame (``code``, ``reason``) or broken (1006)."""

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"closed with {code} {reason}".rstrip())


class HandshakeRefused(Exception):
    """The server answered the upgrade request with ``status`` instead of 101."""

    def __init__(self, status: int, body: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"handshake refused with {status}: {body}".rstrip(": "))


class ClientWebSocket:
    """An open client WebSocket; made by :func:`open_websocket`.

    One task reads (:meth:`receive_text`); any number may send. Reading also
    answers pings and the server's close frame.
    """

    def __init__(self, stream: anyio.abc.ByteStream, max_message_size: int) -> None:
        self._stream = stream
        self._max_message_size = max_message_size
        self._protocol = WSConnection(ConnectionType.CLIENT)
        self._write_lock = anyio.Lock()
        self.closed: WebSocketClosed | None = None

    async def send_text(self, text: str) -> None:
        """Send one text message; raises :class:`WebSocketClosed` if the connection is closed."""
        if self.closed is not None:
            raise self.closed
        try:
            data = self._protocol.send(TextMessage(data=text))
        except LocalProtocolError:
            # The server's close frame arrived and the reader has not seen it yet.
            raise WebSocketClosed(CLOSE_ABNORMAL, "closing") from None
        await self._write(data)

    async def receive_text(self) -> str:
        """The next text message; raises :class:`WebSocketClosed` once the connection closes.

        A message over ``max_message_size`` bytes closes the connection with 1009.
        """
        parts: list[str] = []
        size = 0
        while True:
            for event in self._protocol.events():
                if isinstance(event, TextMessage):
                    size += len(event.data.encode())
                    if size > self._max_message_size:
                        await self._close(CLOSE_TOO_BIG, "message too big")
                        raise WebSocketClosed(CLOSE_TOO_BIG, "message too big")
                    parts.append(event.data)
                    if event.message_finished:
                        return "".join(parts)
                elif isinstance(event, Ping):
                    await self._write(self._protocol.send(event.response()), ignore_errors=True)
                elif isinstance(event, CloseConnection):
                    if self._protocol.state is ConnectionState.REMOTE_CLOSING:
                        await self._write(self._protocol.send(event.response()), ignore_errors=True)
                    self.closed = WebSocketClosed(event.code, event.reason or "")
                    raise self.closed
            if self.closed is not None:
                raise self.closed
            self._protocol.receive_data(await self._receive_some())

    async def _handshake(self, host: str, target: str) -> None:
        await self._write(self._protocol.send(Request(host=host, target=target)))
        status = 0
        body = bytearray()
        while True:
            data = await self._receive_some()
            try:
                self._protocol.receive_data(data)
                for event in self._protocol.events():
                    if isinstance(event, AcceptConnection):
                        # Return at once: frames that came with the 101 (the
                        # server's hello) stay queued in wsproto for receive_text.
                        return
                    if isinstance(event, RejectConnection):
                        status = event.status_code
                        if not event.has_body:
                            raise HandshakeRefused(status, "")
                    elif isinstance(event, RejectData):
                        body += event.data[: REFUSAL_BODY_LIMIT - len(body)]
                        if event.body_finished:
                            raise HandshakeRefused(status, body.decode(errors="replace"))
            except RemoteProtocolError as error:
                raise ConnectionError(f"not a WebSocket handshake answer: {error}") from None
            if data is None:
                raise ConnectionError("the server closed the connection during the handshake")

    async def _receive_some(self) -> bytes | None:
        """Bytes from the socket, or None once it is closed (wsproto then reports 1006)."""
        try:
            return await self._stream.receive(RECEIVE_SIZE)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return None

    async def _write(self, data: bytes, *, ignore_errors: bool = False) -> None:
        try:
            async with self._write_lock:
                await self._stream.send(data)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            if ignore_errors:
                return
            self.closed = self.closed or WebSocketClosed(CLOSE_ABNORMAL, "the connection broke")
            raise self.closed from None

    async def _close(self, code: int, reason: str) -> None:
        if self._protocol.state is ConnectionState.OPEN:
            await self._write(
                self._protocol.send(CloseConnection(code=code, reason=reason)), ignore_errors=True
            )
        self.closed = self.closed or WebSocketClosed(code, reason)

    async def _close_and_wait(self) -> None:
        """Send a close frame (if none was exchanged) and read until the server's answer."""
        await self._close(1000, "")
        while self._protocol.state is ConnectionState.LOCAL_CLOSING:
            data = await self._receive_some()
            self._protocol.receive_data(data)
            for _event in self._protocol.events():
                pass
            if data is None:
                return


@asynccontextmanager
async def open_websocket(
    url: str, *, max_message_size: int, connect_timeout: float
) -> AsyncIterator[ClientWebSocket]:
    """Connect to ``url`` (``ws://`` or ``wss://``) and complete the handshake.

    Raises :class:`HandshakeRefused` for an answer other than 101, ``OSError``
    (``TimeoutError`` after ``connect_timeout``) when the server cannot be
    reached. On exit (also on cancellation) it sends a close frame and waits up
    to ``connect_timeout`` for the server's.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or parts.hostname is None:
        raise ValueError(f"open_websocket takes a ws:// or wss:// URL, got {url!r}")
    tls = parts.scheme == "wss"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host, port = parts.hostname, parts.port or (443 if tls else 80)
    stream: anyio.abc.ByteStream
    with anyio.fail_after(connect_timeout):
        if tls:
            # Not standard-compatible: a server that drops TCP without a TLS
            # close_notify after the WebSocket close handshake is not an error.
            stream = await anyio.connect_tcp(host, port, tls=True, tls_standard_compatible=False)
        else:
            stream = await anyio.connect_tcp(host, port)
    try:
        websocket = ClientWebSocket(stream, max_message_size)
        with anyio.fail_after(connect_timeout):
            await websocket._handshake(parts.netloc, target)
        try:
            yield websocket
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(connect_timeout):
                await websocket._close_and_wait()
    finally:
        with anyio.CancelScope(shield=True):
            await stream.aclose()
