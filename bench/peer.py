"""The Trio side of the peer target: start ``bench.peer_socketio`` and be its socket.io client.

The client is the least of Engine.IO 4 / Socket.IO 5 over one WebSocket that
the bench needs (the load generator drives triows and the peer alike, so a
receiver costs the same on both sides): connect to
``/socket.io/?EIO=4&transport=websocket&name=USER``, read the open packet
(``0{...}``), connect the default namespace (``40`` → ``40{...}``), answer each
ping ``2`` with a pong ``3``, and decode events ``42["message", {...}]``. A sender
emits ``42<id>["send", {"to": ..., "message": ...}]``, the packet python-socketio's
own client writes for ``sio.call("send", ...)``, and reads its acknowledgement
``43<id>[{"status": "accepted"}]``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from triows.process import Instance, free_port, stop_process, wait_for_status

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0

# Engine.IO packet types (first character) and Socket.IO ones (second, in a message).
EIO_OPEN, EIO_CLOSE, EIO_PING, EIO_PONG, EIO_MESSAGE = "0", "1", "2", "3", "4"
SIO_CONNECT, SIO_DISCONNECT, SIO_EVENT, SIO_ACK, SIO_CONNECT_ERROR = "0", "1", "2", "3", "4"


class SocketIOClosed(ConnectionClosed):  # type: ignore[misc]
    """The server closed the Engine.IO session or disconnected the namespace."""

    def __init__(self, packet: str) -> None:
        super().__init__(None)
        self.packet = packet


@dataclass
class SocketIOClient:
    """One connected socket.io client; ``receive`` yields frames shaped like triows' own."""

    websocket: WebSocketConnection
    sid: str

    async def send(self, to: str, message: Any, ref: str) -> None:
        """Emit ``send`` asking for an acknowledgement with id ``ref`` (digits).

        Its answer comes from :meth:`receive` as ``{"type": "ack", "ref": ref}``
        (or an ``error`` frame), as triows answers a ``send`` frame.
        """
        event = json.dumps(["send", {"to": to, "message": message}], separators=(",", ":"))
        await self.websocket.send_message(f"{EIO_MESSAGE}{SIO_EVENT}{int(ref)}{event}")

    async def receive(self) -> dict[str, Any]:
        """The next ``message`` event as ``{"type": "message", "message": DATA}``, or the
        acknowledgement of a :meth:`send` as ``{"type": "ack", "ref": ID}``."""
        while True:
            packet = await self.websocket.get_message()
            kind = packet[:1]
            if kind == EIO_PING:
                await self.websocket.send_message(EIO_PONG)
            elif kind == EIO_MESSAGE and packet[1:2] == SIO_EVENT:
                # No namespace (the default one) and no ack id: the JSON array follows.
                event, *data = json.loads(packet[2:])
                return {"type": event, "message": data[0] if data else None}
            elif kind == EIO_MESSAGE and packet[1:2] == SIO_ACK:
                # The ack id, then the JSON array of what the handler returned.
                ack = packet[2:] if isinstance(packet, str) else packet[2:].decode()
                ref, _, data = ack.partition("[")
                answer = json.loads("[" + data)
                status = answer[0].get("status") if answer and isinstance(answer[0], dict) else None
                if status == "accepted":
                    return {"type": "ack", "ref": ref}
                return {"type": "error", "ref": ref, "code": status}
            elif kind == EIO_CLOSE or (kind == EIO_MESSAGE and packet[1:2] == SIO_DISCONNECT):
                raise SocketIOClosed(packet)

    @property
    def close_code(self) -> int | None:
        closed = self.websocket.closed
        return None if closed is None else closed.code


def socketio_url(base_url: str, user: str) -> str:
    _, _, rest = base_url.partition("://")
    return f"ws://{rest}/socket.io/?EIO=4&transport=websocket&name={quote(user)}"


@asynccontextmanager
async def open_socketio(base_url: str, *, user: str) -> AsyncIterator[SocketIOClient]:
    """Connect as ``user`` (the server puts the client in the room ``user:<user>``)."""
    async with open_websocket_url(socketio_url(base_url, user)) as websocket:
        opened = await websocket.get_message()
        if opened[:1] != EIO_OPEN:
            raise ValueError(f"expected an Engine.IO open packet, got {opened[:80]!r}")
        await websocket.send_message(EIO_MESSAGE + SIO_CONNECT)
        while True:
            packet = await websocket.get_message()
            if packet[:2] == EIO_MESSAGE + SIO_CONNECT:
                break
            if packet[:2] == EIO_MESSAGE + SIO_CONNECT_ERROR:
                raise ValueError(f"socket.io connect refused: {packet[2:80]}")
            if packet == EIO_PING:
                await websocket.send_message(EIO_PONG)
        yield SocketIOClient(websocket, json.loads(packet[2:])["sid"])


@asynccontextmanager
async def serve_peer(
    *, broker_url: str, channel: str, port: int | None = None
) -> AsyncIterator[Instance]:
    """Start ``python -m bench.peer_socketio`` and yield it once ``/healthz`` answers."""
    port = free_port() if port is None else port
    command = [
        sys.executable,
        "-m",
        "bench.peer_socketio",
        "--port",
        str(port),
        "--broker-url",
        broker_url,
        "--channel",
        channel,
    ]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, command, cwd=ROOT, env=dict(os.environ), check=False)
        )
        instance = Instance(f"http://127.0.0.1:{port}", process)
        try:
            await wait_for_status(f"{instance.base_url}/healthz", 200, START_TIMEOUT)
            yield instance
        finally:
            with trio.CancelScope(shield=True):
                await stop_process(process)
