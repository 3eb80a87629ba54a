"""Open idle ``/events`` sockets and hold them until killed (or stdin closes, with ``--report``).

``python -m bench.idle_holder URL COUNT``: users ``u0`` ... ``u{COUNT-1}`` on
``URL`` (``ws://host:port``), the client side of ``bench.idle_tracemalloc``.

The client side of ``bench presence`` takes more: ``URL`` may be a
comma-separated list, user number ``i`` (``--start``, then every ``--step``-th)
is ``PREFIX{i}`` on ``URLS[i % len(URLS)]`` and, with ``--rooms R``, joins
the room ``PREFIX-room{i % R}`` (waiting for ``joined``). With ``--report``
it prints ``open N failed M`` once every socket is open (or failed) and
exits when its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

# Handshakes in flight at once (so as not to overrun the instance's listen backlog).
OPEN_CONCURRENCY = 32
CONNECT_TIMEOUT = 120.0


def room_of(prefix: str, number: int, rooms: int) -> str:
    """The room user ``number`` joins when there are ``rooms`` rooms."""
    return f"{prefix}-room{number % rooms}"


async def hold_all(
    urls: list[str],
    count: int,
    *,
    prefix: str = "u",
    start: int = 0,
    step: int = 1,
    rooms: int = 0,
    report: bool = False,
) -> None:
    opened = failed = 0
    all_open = trio.Event()
    handshakes = trio.Semaphore(OPEN_CONCURRENCY)

    def done(ok: bool) -> None:
        nonlocal opened, failed
        opened, failed = opened + ok, failed + (not ok)
        if opened + failed == count:
            all_open.set()

    async def hold(number: int) -> None:
        url = urls[number % len(urls)]
        await handshakes.acquire()
        released = False
        try:
            async with open_websocket_url(
                f"{url}/events?user={prefix}{number}", connect_timeout=CONNECT_TIMEOUT
            ) as websocket:
                await websocket.get_message()  # hello
                if rooms:
                    room = room_of(prefix, number, rooms)
                    await websocket.send_message(json.dumps({"type": "join", "room": room}))
                    answer = json.loads(await websocket.get_message())
                    if answer.get("type") != "joined":
                        raise RuntimeError(f"{prefix}{number} could not join {room}: {answer}")
                handshakes.release()
                released = True
                done(True)
                while True:
                    await websocket.get_message()
        except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError):
            if not released:
                done(False)
        finally:
            if not released:
                handshakes.release()

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(hold, start + index * step)
        if not report:
            return  # held until the process is killed
        await all_open.wait()
        print(f"open {opened} failed {failed}", flush=True)
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_holder")
    parser.add_argument("urls", help="ws://host:port, or several comma-separated")
    parser.add_argument("count", type=int)
    parser.add_argument("--prefix", default="u")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--step", type=int, default=1)
    parser.add_argument("--rooms", type=int, default=0)
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    trio.run(
        lambda: hold_all(
            args.urls.split(","),
            args.count,
            prefix=args.prefix,
            start=args.start,
            step=args.step,
            rooms=args.rooms,
            report=args.report,
        )
    )


if __name__ == "__main__":
    main()
