"""HTTP-level attacks on a running ``triows serve``, with the server's fds and RSS after each.

    python -m bench.abuse_http --url http://127.0.0.1:8000 --pid PID h2-partial-post
    python -m bench.abuse_http --url ... --pid PID h2-streams --rounds 3
    python -m bench.abuse_http --url ... --pid PID body-hold --connections 200

``h2-partial-post``: ``--connections`` cleartext HTTP/2 connections (prior
knowledge), no credentials, each starting a ``POST /send`` of Content-Length
200, sending part of the body, and closing. ``h2-streams``: per round, two
HTTP/2 connections each opening 100 ``POST /send`` streams and sending 1 MiB
on each, then closing. ``body-hold``: ``--connections`` HTTP/1.1 connections
without credentials, each announcing a 1 MiB body and sending all of it but
the last byte, then holding the connection ``--hold`` seconds.

The server is measured (psutil, ``--pid``) before, after each round and
``--settle`` seconds later; one JSON line each. The server process must be
the one serving (``--workers 1``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.exceptions
import psutil
import trio

MIB = 1 << 20
STREAMS_PER_CONNECTION = 100
TIMEOUT = 30.0


def measure(pid: int, label: str, **extra: Any) -> dict[str, Any]:
    """The server's open fds, established TCP connections and RSS, as one JSON line."""
    process = psutil.Process(pid)
    established = sum(
        1 for c in process.net_connections(kind="tcp") if c.status == psutil.CONN_ESTABLISHED
    )
    line = {
        "at": label,
        "fds": process.num_fds(),
        "established": established,
        "rss_mb": round(process.memory_info().rss / 1e6, 1),
        **extra,
    }
    print(json.dumps(line), flush=True)
    return line


async def open_h2(host: str, port: int) -> tuple[trio.SocketStream, h2.connection.H2Connection]:
    stream = await trio.open_tcp_stream(host, port)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    await stream.send_all(connection.data_to_send())
    return stream, connection


def post_headers(host: str, length: int) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":path", "/send"),
        (":scheme", "http"),
        (":authority", host),
        ("content-type", "application/json"),
        ("content-length", str(length)),
    ]


async def send_quietly(stream: trio.SocketStream, data: bytes) -> bool:
    """Send; False if the server closed or reset the connection first."""
    try:
        with trio.fail_after(TIMEOUT):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        return False
    return True


async def h2_partial_post(host: str, port: int) -> None:
    stream, connection = await open_h2(host, port)
    try:
        connection.send_headers(1, post_headers(host, 200))
        connection.send_data(1, b'{"to": "Bob", "message": "part of a')
        await send_quietly(stream, connection.data_to_send())
        # Give the server the time to start the request before going away.
        await trio.sleep(0.05)
    finally:
        await stream.aclose()


async def h2_streams(host: str, port: int) -> None:
    stream, connection = await open_h2(host, port)
    window_opened = trio.Event()
    chunk = b"x" * 16384
    sending = trio.Lock()

    async def flush() -> None:
        async with sending:
            await stream.send_all(connection.data_to_send())

    async def read_frames() -> None:
        # The server's WINDOW_UPDATEs let the bodies go out whole; SETTINGS are acked.
        nonlocal window_opened
        while data := await stream.receive_some():
            connection.receive_data(data)
            await flush()
            window_opened.set()
            window_opened = trio.Event()

    async def send_bodies() -> None:
        for number in range(STREAMS_PER_CONNECTION):
            stream_id = 1 + 2 * number
            connection.send_headers(stream_id, post_headers(host, MIB))
            sent = 0
            while sent < MIB:
                size = min(len(chunk), MIB - sent, connection.local_flow_control_window(stream_id))
                if size == 0:
                    with trio.move_on_after(TIMEOUT):
                        await window_opened.wait()
                        continue
                    return  # the server's window stays shut
                connection.send_data(stream_id, chunk[:size])
                sent += size
                await flush()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_frames)
            await send_bodies()
            nursery.cancel_scope.cancel()
    except* (trio.BrokenResourceError, trio.ClosedResourceError, h2.exceptions.ProtocolError):
        pass  # the server ended the connection: the attack is over for it
    finally:
        await stream.aclose()


async def body_hold(host: str, port: int, hold: float) -> None:
    stream = await trio.open_tcp_stream(host, port)
    head = (
        f"POST /send HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MIB}\r\n\r\n"
    ).encode()
    try:
        if await send_quietly(stream, head):
            await send_quietly(stream, b"x" * (MIB - 1))
        await trio.sleep(hold)
    finally:
        await stream.aclose()


async def run_all(attack: Callable[[], Any], count: int) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(attack)


async def main(args: argparse.Namespace) -> None:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    measure(args.pid, "before")
    started = time.monotonic()
    for round_number in range(1, args.rounds + 1):
        if args.attack == "h2-partial-post":
            await run_all(lambda: h2_partial_post(host, port), args.connections)
        elif args.attack == "h2-streams":
            await run_all(lambda: h2_streams(host, port), 2)
        else:
            async with trio.open_nursery() as nursery:
                for _ in range(args.connections):
                    nursery.start_soon(body_hold, host, port, args.hold)
                # Measured while every connection is held (the last bytes sent or refused).
                await trio.sleep(args.hold - 1)
                measure(args.pid, f"holding {args.hold - 1:g} s", round=round_number)
            continue
        measure(args.pid, "after", round=round_number, seconds=round(time.monotonic() - started))
    await trio.sleep(args.settle)
    measure(args.pid, f"{args.settle:g} s later")


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.abuse_http", description=__doc__.splitlines()[0]
    )
    parser.add_argument("attack", choices=["h2-partial-post", "h2-streams", "body-hold"])
    parser.add_argument("--url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, required=True, help="the serving process's pid")
    parser.add_argument("--connections", type=int, default=50, help="h2-partial-post, body-hold")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the attack")
    parser.add_argument("--hold", type=float, default=21.0, help="body-hold: seconds to hold")
    parser.add_argument("--settle", type=float, default=5.0, help="seconds before the last look")
    return parser


if __name__ == "__main__":
    trio.run(main, parser().parse_args())
