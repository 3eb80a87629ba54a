"""Abuse of the data plane, by raw sockets against real ``triows serve`` processes."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import zlib

import h11
import httpx
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from triows.auth import mint_token
from triows.client import events_url, open_events, post_send
from triows.connection import Connection
from triows.process import Instance, serve_instance
from triows.serving import _tune_listener
from triows.settings import Settings

# Hang guards only: no test asserts on how long something took.
STEP_TIMEOUT = 30
SECRET = "abuse-secret-" + "x" * 48
BIG = "x" * 60_000


async def raw_handshake(
    instance: Instance, path: str, *, extensions: str | None = None, rcvbuf: int | None = None
) -> tuple[trio.SocketStream, bytes]:
    """Open a WebSocket by hand; return the stream and the server's handshake response."""
    port = int(instance.base_url.rsplit(":", 1)[1])
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    )
    if extensions is not None:
        request += f"Sec-WebSocket-Extensions: {extensions}\r\n"
    await stream.send_all((request + "\r\n").encode())
    response = b""
    with trio.fail_after(STEP_TIMEOUT):
        while b"\r\n\r\n" not in response:
            response += await stream.receive_some(1)
    return stream, response


def client_frame(payload: bytes, *, opcode: int = 0x1, rsv1: bool = False) -> bytes:
    """One masked client frame."""
    mask = os.urandom(4)
    first = 0x80 | (0x40 if rsv1 else 0) | opcode
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, size)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


async def read_frame(stream: trio.SocketStream, buffer: bytearray) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload)."""

    async def need(count: int) -> None:
        while len(buffer) < count:
            data = await stream.receive_some()
            if not data:
                raise EOFError
            buffer.extend(data)

    await need(2)
    opcode, size = buffer[0] & 0x0F, buffer[1] & 0x7F
    start = 2
    if size == 126:
        await need(4)
        size, start = struct.unpack("!H", buffer[2:4])[0], 4
    elif size == 127:
        await need(10)
        size, start = struct.unpack("!Q", buffer[2:10])[0], 10
    await need(start + size)
    payload = bytes(buffer[start : start + size])
    del buffer[: start + size]
    return opcode, payload


async def connections_open(http: httpx.AsyncClient, instance: Instance) -> float:
    text = (await http.get(f"{instance.base_url}/metrics")).text
    line = next(line for line in text.splitlines() if line.startswith("triows_connections_open "))
    return float(line.split()[1])


async def test_permessage_deflate_is_declined_and_a_compressed_frame_ends_the_socket() -> None:
    async with serve_instance("memory") as server, httpx.AsyncClient() as http:
        stream, response = await raw_handshake(
            server, "/events?user=Bob", extensions="permessage-deflate; client_max_window_bits"
        )
        assert response.startswith(b"HTTP/1.1 101")
        assert b"sec-websocket-extensions" not in response.lower()
        # 10 MB of zeros deflated to about 10 KB: a bomb the server must not inflate.
        deflate = zlib.compressobj(wbits=-15)
        bomb = deflate.compress(b"\0" * 10_000_000) + deflate.flush(zlib.Z_SYNC_FLUSH)
        await stream.send_all(client_frame(bomb[:-4], rsv1=True))
        # RSV1 was not agreed: a protocol error. wsproto ends the connection, uninflated.
        buffer = bytearray()
        with trio.fail_after(STEP_TIMEOUT), pytest.raises(EOFError):
            while True:
                opcode, payload = await read_frame(stream, buffer)
                if opcode == 0x8:
                    assert struct.unpack("!H", payload[:2])[0] == 1002
        assert (await http.get(f"{server.base_url}/healthz")).status_code == 200


async def test_concurrent_handshakes_cannot_exceed_max_connections() -> None:
    async with serve_instance("memory", env={"TRIOWS_MAX_CONNECTIONS": "5"}) as server:
        opened: list[int] = []
        refused: list[int] = []
        all_tried = trio.Event()

        async def connect(number: int) -> None:
            try:
                async with open_websocket_url(events_url(server.base_url, user=f"u{number}")):
                    opened.append(number)
                    await all_tried.wait()
            except HandshakeError:
                refused.append(number)

        with trio.fail_after(STEP_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for number in range(40):
                    nursery.start_soon(connect, number)
                while len(opened) + len(refused) < 40:  # noqa: ASYNC110
                    await trio.sleep(0.05)
                all_tried.set()
        assert (len(opened), len(refused)) == (5, 35)


async def test_a_pipelining_sender_cannot_get_a_reading_recipient_closed() -> None:
    env = {"TRIOWS_SEND_QUEUE": "64", "TRIOWS_SEND_RATE": "500", "TRIOWS_SEND_BURST": "32"}
    count = 1000
    async with serve_instance("memory", env=env) as server:
        async with (
            open_events(server.base_url, user="Victim") as victim,
            open_events(server.base_url, user="Mallory") as mallory,
        ):
            received: list[int] = []

            async def read_acks() -> None:
                for _ in range(count):
                    assert (await mallory.receive())["type"] == "ack"

            with trio.fail_after(STEP_TIMEOUT * 2):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_acks)
                    for number in range(count):
                        await mallory.send("Victim", number)
                    try:
                        while len(received) < count:
                            received.append((await victim.receive())["message"])
                    except ConnectionClosed:
                        pass
            assert victim.close_code is None
            assert received == list(range(count))


async def test_a_peer_that_never_reads_is_cut_and_leaves_the_instance() -> None:
    env = {"TRIOWS_CLOSE_TIMEOUT": "1", "TRIOWS_SEND_QUEUE": "8"}
    async with serve_instance("memory", env=env) as server, httpx.AsyncClient() as http:
        stream, response = await raw_handshake(server, "/events?user=Sloth", rcvbuf=4096)
        assert response.startswith(b"HTTP/1.1 101")
        with trio.fail_after(STEP_TIMEOUT):
            # The queue overflows (4001); then the socket, stuck in a write, must go too.
            while (await post_send(http, server.base_url, "Sloth", BIG)).status_code == 202:  # noqa: ASYNC110
                await trio.sleep(0.01)
            while await connections_open(http, server) != 0:  # noqa: ASYNC110
                await trio.sleep(0.05)
        await stream.aclose()


async def test_sigterm_drain_ends_although_a_peer_never_reads() -> None:
    # A session's queue would hold only 1 MiB of it (the sender then hears "full"):
    # without one, all 6 MB head for the socket.
    env = {"TRIOWS_CLOSE_TIMEOUT": "1", "TRIOWS_DRAIN_TIMEOUT": "1", "TRIOWS_RESUME_WINDOW": "0"}
    async with serve_instance("memory", env=env) as server, httpx.AsyncClient() as http:
        stream, _ = await raw_handshake(server, "/events?user=Sloth", rcvbuf=4096)
        for _ in range(100):  # about 6 MB: more than the socket buffers hold
            assert (await post_send(http, server.base_url, "Sloth", BIG)).status_code == 202
        server.terminate()
        # The bound is the documented one (drain + close timeout) plus a generous margin.
        with trio.fail_after(1 + 1 + 10):
            await server.process.wait()
        await stream.aclose()


async def http_exchange(
    stream: trio.SocketStream, connection: h11.Connection, request: h11.Request, body: bytes
) -> int:
    """Send one request on a kept-alive connection; return the status once its body is read."""
    await stream.send_all(connection.send(request))
    await stream.send_all(connection.send(h11.Data(data=body)))
    await stream.send_all(connection.send(h11.EndOfMessage()))
    status = 0
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some())
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.EndOfMessage):
            connection.start_next_cycle()
            return status


async def test_an_early_answer_leaves_the_keep_alive_connection_usable() -> None:
    # (A 401 is answered before the body is read, and closes: tests/test_http_abuse.py.)
    content_type, status = "text/plain", 415
    env = {"TRIOWS_SECRET": SECRET}
    async with serve_instance("memory", env=env) as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        connection = h11.Connection(h11.CLIENT)
        # Larger than the flow-control window Hypercorn keeps for a body nobody reads.
        body = json.dumps([{"to": "Bob", "message": "x" * 50_000}] * 6).encode()
        small = json.dumps({"to": "Bob", "message": 1}).encode()
        token = mint_token(SECRET, "Anne")
        headers = [
            ("Host", "127.0.0.1"),
            ("Content-Type", content_type),
            ("Authorization", f"Bearer {token}"),
        ]
        post = h11.Request(
            method="POST",
            target="/send",
            headers=[*headers, ("Content-Length", str(len(body)))],
        )
        with trio.fail_after(STEP_TIMEOUT):
            assert await http_exchange(stream, connection, post, body) == status
            authorized = h11.Request(
                method="POST",
                target="/send",
                headers=[
                    ("Host", "127.0.0.1"),
                    ("Content-Type", "application/json"),
                    ("Authorization", f"Bearer {token}"),
                    ("Content-Length", str(len(small))),
                ],
            )
            assert await http_exchange(stream, connection, authorized, small) == 404
        await stream.aclose()


@pytest.mark.parametrize("route", ["/send", "/healthz"])
async def test_an_idle_keep_alive_connection_is_closed_by_the_server(route: str) -> None:
    # /healthz is served by Quart, whose cancelled request nursery used to
    # stop Hypercorn from restarting the keep-alive timer (open for good).
    async with serve_instance("memory") as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        connection = h11.Connection(h11.CLIENT)
        body = json.dumps({"to": "Bob", "message": 1}).encode() if route == "/send" else b""
        headers = [("Host", "127.0.0.1"), ("Content-Length", str(len(body)))]
        if route == "/send":
            headers.append(("Content-Type", "application/json"))
        method = "POST" if route == "/send" else "GET"
        request = h11.Request(method=method, target=route, headers=headers)
        with trio.fail_after(STEP_TIMEOUT):
            assert await http_exchange(stream, connection, request, body) in (200, 404)
            # Hypercorn's keep-alive timeout is 5 s; the guard above is the hang bound.
            assert await stream.receive_some() == b""
        await stream.aclose()


async def test_a_keep_alive_connection_in_use_outlives_the_keep_alive_timeout() -> None:
    # The timer restarts each time the connection goes idle: requests 1.5 s
    # apart keep it open well past Hypercorn's 5 s (triows/serving.py KeepAliveTimer).
    async with serve_instance("memory") as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        connection = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target="/healthz", headers=[("Host", "127.0.0.1")])
        for _ in range(6):
            with trio.fail_after(STEP_TIMEOUT):
                assert await http_exchange(stream, connection, request, b"") == 200
            await trio.sleep(1.5)
        await stream.aclose()


def test_accepted_connections_inherit_keepalive_from_the_listener() -> None:
    settings = Settings(ping_interval=9, close_timeout=5)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        _tune_listener(listener, settings)
        listener.listen()
        with socket.create_connection(listener.getsockname()) as _client:
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 9
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 18000


async def test_offer_after_the_writer_failed_returns_false_and_never_raises() -> None:
    connection = Connection("Bob", 4)

    async def peer_gone(frame: object) -> None:
        raise trio.BrokenResourceError

    async with trio.open_nursery() as nursery:
        connection.start_writing(nursery, peer_gone)
        assert connection.offer("first")
        await trio.testing.wait_all_tasks_blocked()
        assert connection.offer("second") is False
        with pytest.raises(trio.BrokenResourceError):
            await connection.finish(1.0)
    assert not connection.flushed


async def test_an_idle_connection_has_no_writer_task() -> None:
    connection = Connection("Bob", 4)
    written: list[str] = []

    async def send(message: dict[str, str]) -> None:
        written.append(message["text"])

    async with trio.open_nursery() as nursery:
        connection.start_writing(nursery, send)  # type: ignore[arg-type]
        assert not nursery.child_tasks
        assert connection.offer("first") and connection.offer("second")
        await trio.testing.wait_all_tasks_blocked()
        assert written == ["first", "second"]
        assert not nursery.child_tasks
        await connection.finish(1.0)
    assert connection.flushed


async def test_finish_cuts_a_stuck_write_at_the_timeout(autojump_clock: trio.abc.Clock) -> None:
    connection = Connection("Bob", 4)

    async def stuck(message: object) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        connection.start_writing(nursery, stuck)
        connection.offer("first")
        connection.offer("second")
        started = trio.current_time()
        await connection.finish(5.0)
        assert trio.current_time() - started == pytest.approx(5.0)
        assert not nursery.child_tasks
    assert not connection.flushed
