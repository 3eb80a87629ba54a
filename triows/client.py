"""A small client for the triows wire protocol, used by the demo, the tests and the bench."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024


@dataclass
class EventsClient:
    """An open ``/events`` WebSocket; ``hello`` is the server's first frame."""

    websocket: WebSocketConnection
    hello: dict[str, Any]

    async def receive(self) -> dict[str, Any]:
        """The next frame from the server, decoded."""
        frame: dict[str, Any] = json.loads(await self.websocket.get_message())
        return frame

    async def send(self, to: str, message: Any, ref: str | None = None) -> None:
        frame: dict[str, Any] = {"type": "send", "to": to, "message": message}
        if ref is not None:
            frame["ref"] = ref
        await self.websocket.send_message(json.dumps(frame))

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
    to: str,
    message: Any,
    *,
    sender: str | None = None,
    token: str | None = None,
) -> httpx.Response:
    """``POST /send``; ``sender`` is the dev-mode ``from``, ``token`` a bearer token."""
    body: dict[str, Any] = {"to": to, "message": message}
    if sender is not None:
        body["from"] = sender
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await http.post(f"{base_url}/send", json=body, headers=headers)
