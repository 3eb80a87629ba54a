"""The bench's peer: python-socketio + ``AsyncAioPikaManager`` on uvicorn (uvloop, httptools).

    python -m bench.peer_socketio --port 8001 [--broker-url URL] [--channel NAME]

The best-known Python way to do what triows does, set up the way its
documentation recommends for several instances: every instance publishes
every emit to one RabbitMQ fanout exchange (``--channel``) and consumes all of
them. A socket.io client joins the room ``user:<name>`` (``?name=`` in the
connect URL); ``POST /send`` with ``{"to": ..., "message": ...}`` emits the
event ``message`` to the room ``user:<to>`` and answers 202 once published.
A JSON array of such objects emits each in turn and answers 200 with one
``{"status": "accepted"}`` per item, so the ``batch`` scenario can run here too.
A connected client sends as a python-socketio chat client does,
``await sio.call("send", {"to": ..., "message": ...})``: the event ``send`` with an
acknowledgement, which the handler's return value ``{"status": "accepted"}``
answers once the emit is published (the ``direct-ws`` scenario).
``/send``, ``/healthz`` and ``/readyz`` are raw ASGI; ``/readyz`` answers 200
once the instance's fanout queue is bound (from then on it gets every emit).

This is asyncio code: it runs in its own process, never in the Trio load generator.
"""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import parse_qs

import socketio  # type: ignore[import-untyped]
import uvicorn

from deploy.brokers import BROKERS

ACCEPTED = b'{"status":"accepted"}'
KEEP_ALIVE_TIMEOUT = 300
JSON_HEADERS = [(b"content-type", b"application/json")]


class Manager(socketio.AsyncAioPikaManager):  # type: ignore[misc]
    """``AsyncAioPikaManager`` as shipped; it only notes when its fanout queue is bound."""

    listening = False

    async def _queue(self, channel: Any, exchange: Any) -> Any:
        queue = await super()._queue(channel, exchange)
        self.listening = True
        return queue


def build_app(broker_url: str, channel: str) -> Any:
    manager = Manager(broker_url, channel=channel)
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager, cors_allowed_origins=[])

    @sio.event  # type: ignore[misc]
    async def connect(sid: str, environ: dict[str, Any], auth: Any = None) -> bool:
        names = parse_qs(environ.get("QUERY_STRING", "")).get("name")
        if not names:
            return False
        await sio.enter_room(sid, f"user:{names[0]}")
        return True

    @sio.event  # type: ignore[misc]
    async def send(sid: str, data: Any) -> dict[str, str]:
        # What the handler returns is the acknowledgement python-socketio sends
        # back, after the emit below has been published (publisher confirms).
        try:
            to, message = data["to"], data["message"]
        except (KeyError, TypeError):
            return {"status": "invalid"}
        await sio.emit("message", message, room=f"user:{to}")
        return {"status": "accepted"}

    async def start() -> None:
        # python-socketio starts the pub/sub listener on the first connection;
        # an instance without users must still consume every emit (the fanout).
        sio.manager_initialized = True
        manager.initialize()

    async def respond(send: Any, status: int, body: bytes) -> None:
        await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
        await send({"type": "http.response.body", "body": body})

    async def http(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope["path"]
        if path == "/healthz":
            await respond(send, 200, b"{}")
            return
        if path == "/readyz":
            await respond(send, 200 if manager.listening else 503, b"{}")
            return
        if path != "/send" or scope["method"] != "POST":
            await respond(send, 404, b"{}")
            return
        chunks = []
        while True:
            event = await receive()
            chunks.append(event.get("body", b""))
            if not event.get("more_body"):
                break
        try:
            body = json.loads(b"".join(chunks))
            items = body if isinstance(body, list) else [body]
            for item in items:
                await sio.emit("message", item["message"], room=f"user:{item['to']}")
        except (ValueError, KeyError, TypeError):
            await respond(send, 400, b'{"status":"invalid"}')
            return
        if isinstance(body, list):
            await respond(send, 200, b"[" + b",".join([ACCEPTED] * len(items)) + b"]")
        else:
            await respond(send, 202, ACCEPTED)

    return socketio.ASGIApp(sio, other_asgi_app=http, on_startup=start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_socketio")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--broker-url", default=BROKERS["rabbitmq"].url)
    parser.add_argument("--channel", default="socketio", help="the fanout exchange's name")
    args = parser.parse_args(argv)
    uvicorn.run(
        build_app(args.broker_url, args.channel),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        ws="auto",  # websockets, as uvicorn[standard] installs it
        lifespan="on",
        log_level="warning",
        access_log=False,
        # The load generator's keep-alive connections may wait out a drain
        # between phases; uvicorn's default (5 s) would close them meanwhile.
        timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
    )


if __name__ == "__main__":
    main()
