"""``GET /events`` as Server-Sent Events: the WebSocket's frames, queue, drain and limits.

Unit tests drive the ASGI app directly (a client whose buffer, reading and
disconnect the test controls: Quart's test client never ends a response the
server cut); the end-to-end tests run real ``triows serve`` processes on
RabbitMQ. The stream is read as raw bytes on purpose: the tests pin down the
exact wire lines (``id:``, ``retry:``, comments), which an SSE client library
would hide.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest
import trio
from quart.testing.connections import WebsocketResponseError
from quart.typing import TestClientProtocol as QuartClient

from tests.brokers import require_broker
from tests.conftest import serving
from tests.e2e import STEP_TIMEOUT, TARGETS_BY_NAME, ready_instances, send_confirmed
from triows.app import TriowsApp, create_app
from triows.auth import mint_token
from triows.client import open_events, post_send
from triows.process import serve_instance
from triows.protocol import hello_frame
from triows.settings import Settings
from triows.sse import encode_event, message_id, requested_rooms, wants_event_stream

SECRET = "test-secret-" + "x" * 64
EVENT_STREAM = {"Accept": "text/event-stream"}
Block = list[tuple[str, str]]


class EventParser:
    """Split an event stream into blocks of ``(field, value)`` lines (a comment: ``("", text)``)."""

    def __init__(self) -> None:
        self.buffer = ""

    def feed(self, chunk: bytes) -> list[Block]:
        self.buffer += chunk.decode()
        *complete, self.buffer = self.buffer.split("\n\n")
        return [[field(line) for line in block.split("\n")] for block in complete]


def field(line: str) -> tuple[str, str]:
    name, _, value = line.partition(":")
    return name, value.removeprefix(" ")


def frame_of(block: Block) -> dict[str, Any]:
    data = [value for name, value in block if name == "data"]
    assert data, block
    value: dict[str, Any] = json.loads("\n".join(data))
    return value


class Stream:
    """One event stream from the app, as a client holding a buffer of ``buffer`` chunks sees it."""

    def __init__(self, buffer: int) -> None:
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.started = trio.Event()
        self.disconnected = trio.Event()
        # True once the server ended the response (more_body False); False if it was cut.
        self.ended_cleanly = False
        self._chunks_in, self._chunks = trio.open_memory_channel[bytes](buffer)
        self._parser = EventParser()
        self._blocks: list[Block] = []
        self._requested = False

    async def receive(self) -> dict[str, Any]:
        if not self._requested:
            self._requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
            self.started.set()
            return
        await self._chunks_in.send(message.get("body", b""))
        if not message.get("more_body", False):
            self.ended_cleanly = True
            await self._chunks_in.aclose()

    async def next_block(self) -> Block:
        """The next complete block; raises ``trio.EndOfChannel`` once the stream is over."""
        while not self._blocks:
            self._blocks += self._parser.feed(await self._chunks.receive())
        return self._blocks.pop(0)

    async def rest(self) -> list[Block]:
        """Every block until the stream is over."""
        blocks = []
        with trio.fail_after(STEP_TIMEOUT):
            while True:
                try:
                    blocks.append(await self.next_block())
                except trio.EndOfChannel:
                    return blocks


@asynccontextmanager
async def open_stream(
    client: QuartClient,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    buffer: int = 100,
) -> AsyncIterator[Stream]:
    """Run the app's ``path`` for a client; on exit the client disconnects (if still there)."""
    scope = client.request(path, method=method, headers=headers or EVENT_STREAM).scope
    stream = Stream(buffer)
    returned = trio.Event()
    async with trio.open_nursery() as nursery:

        async def run_app() -> None:
            await client.app(scope, stream.receive, stream.send)
            stream._chunks_in.close()  # the app returned: nothing more (cut if not ended)
            returned.set()

        nursery.start_soon(run_app)
        with trio.fail_after(STEP_TIMEOUT):
            await stream.started.wait()
        yield stream
        stream.disconnected.set()
        with trio.fail_after(STEP_TIMEOUT):
            await returned.wait()


async def answer(client: QuartClient, path: str, **kwargs: Any) -> tuple[Stream, dict[str, Any]]:
    """A request refused before any stream: its status and problem document."""
    async with open_stream(client, path, **kwargs) as stream:
        body = b"".join(
            [chunk async for chunk in stream._chunks]  # ended: a refusal is one response
        )
    return stream, json.loads(body)


def names_message(block: list[tuple[str, str]], message_id: str) -> bool:
    """Whether ``block``'s event id is a session's cursor at message ``message_id``."""
    return block[0][0] == "id" and block[0][1].endswith(f"-{message_id}")


async def open_hello(stream: Stream) -> dict[str, Any]:
    """Read the stream's opening: ``retry:``, then the hello event."""
    with trio.fail_after(STEP_TIMEOUT):
        assert await stream.next_block() == [("retry", "2000")]
        return frame_of(await stream.next_block())


async def wait_idle(client: QuartClient) -> None:
    """Wait until the app holds no connection (each one detached from the router)."""
    app = cast(TriowsApp, client.app)
    with trio.fail_after(STEP_TIMEOUT):
        await app.router.idle.wait()


async def metric(client: QuartClient, line_start: str) -> float:
    text = await (await client.get("/metrics")).get_data(as_text=True)
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


# The encoders, without sockets.


def test_a_message_frame_is_one_event_with_its_id_and_the_exact_frame_as_data() -> None:
    frame = '{"type":"message","id":"abc123","from":"Anne","to":"Bob","message":{"a":1},"ts":1}'
    assert encode_event(frame) == f"id: abc123\ndata: {frame}\n\n".encode()


def test_a_hello_frame_has_no_id_line() -> None:
    frame = hello_frame("Bob", "inst")
    assert encode_event(frame) == f"data: {frame}\n\n".encode()


def test_a_frame_with_raw_line_breaks_becomes_several_data_lines() -> None:
    # Valid JSON from a forged delivery: the line breaks must not end the event early.
    frame = '{"id": "x",\r\n"type": "message",\n"to": "Bob"}'
    event = encode_event(frame).decode()
    assert event == 'id: x\ndata: {"id": "x",\ndata: "type": "message",\ndata: "to": "Bob"}\n\n'
    assert json.loads("\n".join(v for n, v in map(field, event.split("\n")) if n == "data"))


def test_an_id_with_a_line_break_or_nul_is_left_out() -> None:
    assert message_id('{"type":"message","id":"a\\nb"}') is None
    assert message_id('{"type":"message","id":"a\\u0000b"}') is None
    assert message_id('{"type":"message","id":"plain"}') == "plain"


@pytest.mark.parametrize(
    ("accept", "wanted"),
    [
        ("text/event-stream", True),
        ("text/html, text/event-stream;q=0.5", True),
        ("TEXT/Event-Stream", True),
        ("text/event-stream;q=0", False),
        ("*/*", False),
        ("text/*", False),
        ("", False),
        ("application/json", False),
    ],
)
def test_only_an_explicit_event_stream_accept_asks_for_the_stream(
    accept: str, wanted: bool
) -> None:
    assert wants_event_stream(accept) is wanted


def test_rooms_are_repeatable_in_order_without_repeats() -> None:
    assert requested_rooms(b"user=Bob&room=general&room=team-a&room=general") == [
        "general",
        "team-a",
    ]
    assert requested_rooms(b"user=Bob") == []


def test_a_room_outside_the_name_rules_is_invalid() -> None:
    with pytest.raises(ValueError, match="room 'a\\*b'"):
        requested_rooms(b"room=a%2Ab")


# One app, driven through ASGI.


async def test_stream_opens_with_retry_then_hello_and_a_message_carries_its_id() -> None:
    async with (
        serving(instance_id="inst-1") as client,
        open_stream(client, "/events?user=Bob") as bob,
    ):
        assert bob.status == 200
        assert bob.headers["content-type"].startswith("text/event-stream")
        assert bob.headers["cache-control"] == "no-store"
        hello = await open_hello(bob)
        session = hello.pop("session")
        assert hello == {
            "type": "hello",
            "user": "Bob",
            "instance": "inst-1",
            "protocol": 1,
            "resumable": True,
            "resumed": False,
            "missed": 0,
        }
        sent = await client.post("/send", json={"to": "Bob", "message": {"n": 1}, "from": "Anne"})
        assert sent.status_code == 202
        message_id = (await sent.get_json())["id"]
        with trio.fail_after(STEP_TIMEOUT):
            block = await bob.next_block()
        # What Last-Event-ID brings back on a reconnect: the session and the cursor.
        assert block[0] == ("id", f"{session}:1-{message_id}")
        frame = frame_of(block)
        assert (frame["type"], frame["from"], frame["message"]) == ("message", "Anne", {"n": 1})


async def test_a_heartbeat_comment_follows_idle_seconds(autojump_clock: trio.abc.Clock) -> None:
    async with (
        serving(sse_heartbeat=15) as client,
        open_stream(client, "/events?user=Bob") as bob,
    ):
        await open_hello(bob)
        idle_since = trio.current_time()
        with trio.fail_after(60):  # on the virtual clock
            assert await bob.next_block() == [("", "ping")]
            assert trio.current_time() - idle_since >= 15
            assert await bob.next_block() == [("", "ping")]


async def test_no_heartbeat_when_it_is_off(autojump_clock: trio.abc.Clock) -> None:
    async with (
        serving(sse_heartbeat=0) as client,
        open_stream(client, "/events?user=Bob") as bob,
    ):
        await open_hello(bob)
        with trio.move_on_after(3600) as waited:
            await bob.next_block()
        assert waited.cancelled_caught


async def test_without_credentials_the_stream_is_refused_with_401() -> None:
    async with serving(secret=SECRET) as client:
        refused, problem = await answer(client, "/events")
    assert refused.status == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert refused.headers["content-type"] == "application/problem+json"
    assert problem["status"] == 401


@pytest.mark.parametrize("where", ["header", "query"])
async def test_a_token_in_the_header_or_query_opens_the_stream(where: str) -> None:
    token = mint_token(SECRET, "Bob")
    path, headers = "/events", {**EVENT_STREAM, "Authorization": f"Bearer {token}"}
    if where == "query":
        path, headers = f"/events?token={token}", EVENT_STREAM
    async with serving(secret=SECRET) as client, open_stream(client, path, headers=headers) as bob:
        assert (await open_hello(bob))["user"] == "Bob"


@pytest.mark.parametrize("accept", [None, "*/*", "application/json", "text/event-stream;q=0"])
async def test_a_plain_get_without_the_event_stream_accept_is_406(accept: str | None) -> None:
    async with serving() as client:
        refused, problem = await answer(
            client, "/events?user=Bob", headers={"Accept": accept} if accept else {"X": "y"}
        )
    assert refused.status == 406
    assert "text/event-stream" in problem["detail"]


async def test_post_to_events_is_405() -> None:
    async with serving() as client:
        refused, _ = await answer(client, "/events?user=Bob", method="POST")
    assert (refused.status, refused.headers["allow"]) == (405, "GET")


@pytest.mark.parametrize(
    "query",
    ["user=a*b", "user=Bob&room=a*b", "user=Bob&room=a&room=b&room=c"],
    ids=["user", "room", "too-many-rooms"],
)
async def test_a_bad_user_or_room_is_400(query: str) -> None:
    async with serving(max_rooms=2) as client:
        refused, problem = await answer(client, f"/events?{query}")
    assert refused.status == 400
    assert problem["status"] == 400


async def test_a_stream_joined_to_a_room_at_connect_gets_its_room_messages() -> None:
    async with (
        serving() as client,
        open_stream(client, "/events?user=Bob&room=general&room=team-a") as bob,
    ):
        await open_hello(bob)
        sent = await client.post("/send", json={"room": "team-a", "message": "hi", "from": "Anne"})
        assert (sent.status_code, (await sent.get_json())["status"]) == (202, "routed")
        with trio.fail_after(STEP_TIMEOUT):
            frame = frame_of(await bob.next_block())
        assert (frame["room"], frame["to"], frame["message"]) == ("team-a", None, "hi")


async def test_a_room_the_token_does_not_allow_is_403() -> None:
    token = mint_token(SECRET, "Bob", rooms=("team-*",))
    async with serving(secret=SECRET) as client:
        allowed, _ = await answer(client, f"/events?token={token}&room=team-a&room=general")
    assert allowed.status == 403


async def test_slow_consumer_stream_ends_and_is_counted_while_others_keep_receiving() -> None:
    async with (
        # Without sessions: with one, the backlog waits at the broker instead.
        serving(send_queue=4, resume_window=0) as client,
        open_stream(client, "/events?user=Sloth", buffer=10) as sloth,
        open_stream(client, "/events?user=Bob") as bob,
    ):
        await open_hello(sloth)
        await open_hello(bob)
        # Sloth holds 10 chunks, the server queue 4: 40 cannot all fit.
        for n in range(40):
            sent = await client.post("/send", json={"to": "Sloth", "message": n})
            assert sent.status_code == 202
            await client.post("/send", json={"to": "Bob", "message": n})
            with trio.fail_after(STEP_TIMEOUT):
                assert frame_of(await bob.next_block())["message"] == n
        blocks = await sloth.rest()
        received = [frame_of(block)["message"] for block in blocks if block[0][0] == "id"]
        assert received == list(range(len(received))) and len(received) < 40
        assert blocks[-1][0] == ("", "close 4001 slow consumer: outbound queue overflowed")
        assert sloth.ended_cleanly
        assert await metric(client, 'triows_messages_dropped_total{reason="slow_consumer"}') > 0


async def test_drain_flushes_then_ends_the_stream_with_retry() -> None:
    app = create_app(Settings(retry_after=2))
    async with app.test_app() as test_app:
        client = test_app.test_client()
        async with open_stream(client, "/events?user=Bob") as bob:
            await open_hello(bob)
            await client.post("/send", json={"to": "Bob", "message": "last"})
            await app.drain()
            blocks = await bob.rest()
        assert frame_of(blocks[0])["message"] == "last"
        (comment, retry) = blocks[-1]
        assert comment == ("", "close 1012 instance draining, reconnect")
        assert retry[0] == "retry" and 2000 <= int(retry[1]) <= 4000
        assert bob.ended_cleanly
        # A new stream on the draining instance ends at once, telling the browser when to return.
        async with open_stream(client, "/events?user=Carol") as carol:
            assert carol.status == 200
            assert await carol.rest() == [[("", "close 1012 instance draining"), ("retry", "2000")]]


async def test_an_expired_token_ends_the_stream(autojump_clock: trio.abc.Clock) -> None:
    token = mint_token(SECRET, "Bob", ttl=10)
    async with (
        serving(secret=SECRET, jwt_leeway=0) as client,
        open_stream(client, f"/events?token={token}") as bob,
    ):
        await open_hello(bob)
        blocks = await bob.rest()
    assert blocks[-1][0] == ("", "close 4401 token expired")
    assert bob.ended_cleanly


async def test_streams_and_websockets_share_the_connection_limit() -> None:
    async with serving(max_connections=1) as client:
        async with open_stream(client, "/events?user=Bob") as bob:
            await open_hello(bob)
            refused, problem = await answer(client, "/events?user=Anne")
            assert (refused.status, refused.headers["retry-after"]) == (503, "2")
            assert problem["status"] == 503
        # Bob's slot is free again once his stream is gone.
        await wait_idle(client)
        async with client.websocket("/events?user=Carol") as carol:
            await carol.receive()
            refused, _ = await answer(client, "/events?user=Anne")
            assert refused.status == 503
        await wait_idle(client)
        async with open_stream(client, "/events?user=Anne") as anne:
            await open_hello(anne)
            async with client.websocket("/events?user=Carol") as carol:
                with pytest.raises(WebsocketResponseError) as refused_ws:
                    await carol.receive()
                assert refused_ws.value.response.status_code == 503


async def test_a_client_that_goes_away_is_detached() -> None:
    async with serving() as client:
        async with open_stream(client, "/events?user=Bob") as bob:
            await open_hello(bob)
            assert await metric(client, "triows_connections_open") == 1
        await wait_idle(client)
        assert not bob.ended_cleanly  # cut, not ended: nobody was there to read an end


# Real processes on RabbitMQ (AMQP 0-9-1).

RABBITMQ = TARGETS_BY_NAME["amqp091-rabbitmq"]


class HttpStream:
    """An SSE stream over httpx, read block by block."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._bytes = response.aiter_raw()
        self._parser = EventParser()
        self._blocks: list[Block] = []

    async def next_block(self) -> Block:
        with trio.fail_after(STEP_TIMEOUT):
            while not self._blocks:
                self._blocks += self._parser.feed(await anext(self._bytes))
        return self._blocks.pop(0)

    async def rest(self) -> list[Block]:
        """Every block until the server ends the response."""
        with trio.fail_after(STEP_TIMEOUT):
            async for chunk in self._bytes:
                self._blocks += self._parser.feed(chunk)
        blocks, self._blocks = self._blocks, []
        return blocks


@asynccontextmanager
async def open_http_stream(http: httpx.AsyncClient, url: str) -> AsyncIterator[HttpStream]:
    async with http.stream("GET", url, headers=EVENT_STREAM, timeout=None) as response:
        assert response.status_code == 200
        stream = HttpStream(response)
        assert await stream.next_block() == [("retry", "2000")]
        yield stream


@pytest.mark.broker
async def test_core_scenario_over_sse_bob_on_b_gets_annes_send_to_a() -> None:
    await require_broker(RABBITMQ.broker)
    async with ready_instances(RABBITMQ) as (a, b), httpx.AsyncClient() as http:
        async with open_http_stream(http, f"{b.base_url}/events?user=Bob") as bob:
            hello = frame_of(await bob.next_block())
            a_instance = (await http.get(f"{a.base_url}/healthz")).json()["instance"]
            assert hello["type"] == "hello" and hello["instance"] != a_instance
            first = await send_confirmed(http, RABBITMQ, a.base_url, "Bob", {"text": "hi Bob"})
            block = await bob.next_block()
            assert names_message(block, first)
            frame = frame_of(block)
            assert (frame["from"], frame["to"], frame["message"]) == (
                "Anne",
                "Bob",
                {"text": "hi Bob"},
            )
            # Once: the next event is the next message, not a second copy.
            second = await send_confirmed(http, RABBITMQ, a.base_url, "Bob", "marker")
            assert names_message(await bob.next_block(), second)


@pytest.mark.broker
async def test_sigterm_drains_the_sse_stream_after_flushing_with_retry() -> None:
    await require_broker(RABBITMQ.broker)
    async with ready_instances(RABBITMQ) as (a, b), httpx.AsyncClient() as http:
        async with open_http_stream(http, f"{b.base_url}/events?user=Bob") as bob:
            assert frame_of(await bob.next_block())["type"] == "hello"
            sent = await send_confirmed(http, RABBITMQ, a.base_url, "Bob", "before the drain")
            b.terminate()
            blocks = await bob.rest()
        assert names_message(blocks[0], sent)
        (comment, retry) = blocks[-1]
        assert comment == ("", "close 1012 instance draining, reconnect")
        assert retry[0] == "retry" and int(retry[1]) >= 2000


def never_reading_stream(base_url: str, path: str) -> socket.socket:
    """A raw socket that asks for ``path`` as an event stream and then never reads."""
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    return sock


@pytest.mark.broker
async def test_a_slow_sse_consumer_is_cut_and_counted_while_others_keep_receiving() -> None:
    await require_broker(RABBITMQ.broker)
    # Without sessions: with one, the backlog waits at the broker instead.
    env = {"TRIOWS_SEND_QUEUE": "8", "TRIOWS_CLOSE_TIMEOUT": "1", "TRIOWS_RESUME_WINDOW": "0"}
    payload = "x" * 60000
    async with ready_instances(RABBITMQ, env=env) as (a, b), httpx.AsyncClient() as http:
        sloth = never_reading_stream(b.base_url, "/events?user=Sloth")
        with sloth:
            async with open_events(b.base_url, user="Bob") as bob:
                dropped = 0.0
                sent = 0
                with trio.fail_after(STEP_TIMEOUT * 4):
                    while dropped == 0:
                        response = await post_send(
                            http, a.base_url, "Sloth", payload, sender="Anne"
                        )
                        assert response.status_code == 202, response.text
                        sent += 1
                        text = (await http.get(f"{b.base_url}/metrics")).text
                        dropped = sum(
                            float(line.split()[-1])
                            for line in text.splitlines()
                            if line.startswith(
                                'triows_messages_dropped_total{reason="slow_consumer"}'
                            )
                        )
                # Bob, on the same instance, is unaffected.
                message = await send_confirmed(http, RABBITMQ, a.base_url, "Bob", "still here")
                with trio.fail_after(STEP_TIMEOUT):
                    frame = await bob.receive()
                assert (frame["id"], frame["message"]) == (message, "still here")
            # Sloth's stream has ended: reading what was buffered reaches its end (or a reset).
            sloth.settimeout(STEP_TIMEOUT)
            received = b""
            with pytest.raises((ConnectionResetError, EOFError)):
                while True:
                    chunk = await trio.to_thread.run_sync(sloth.recv, 65536)
                    if not chunk:
                        raise EOFError
                    received += chunk
            assert received.startswith(b"HTTP/1.1 200")
            assert received.count(b"\nid: ") < sent


async def test_rooms_asked_for_faster_than_the_join_rate_are_refused_with_429() -> None:
    # Every GET is a new connection that subscribes each ?room= on the broker:
    # the rooms are paced per user, with the WebSocket joins' rate and burst.
    pace = {"TRIOWS_SEND_BURST": "4", "TRIOWS_SEND_RATE": "0.001"}
    rooms = "&room=r1&room=r2&room=r3"
    async with serve_instance(env=pace) as instance, httpx.AsyncClient() as http:
        url = f"{instance.base_url}/events"
        async with open_http_stream(http, f"{url}?user=Mallory{rooms}") as stream:
            assert frame_of(await stream.next_block())["type"] == "hello"
        async with http.stream(
            "GET", f"{url}?user=Mallory{rooms}", headers=EVENT_STREAM
        ) as refused:
            assert refused.status_code == 429
            assert refused.headers["content-type"] == "application/problem+json"
            assert json.loads(await refused.aread())["status"] == 429
            assert int(refused.headers["retry-after"]) >= 1
        # Without rooms, and for another user, streams still open.
        async with open_http_stream(http, f"{url}?user=Mallory") as stream:
            assert frame_of(await stream.next_block())["type"] == "hello"
        async with open_http_stream(http, f"{url}?user=Anne{rooms}") as stream:
            assert frame_of(await stream.next_block())["type"] == "hello"
