"""Open N idle ``/events`` sockets and hold them (the client side of idle_tracemalloc)."""

from __future__ import annotations

import sys

import trio
from trio_websocket import open_websocket_url


async def hold_all(url: str, count: int) -> None:
    async def hold(number: int) -> None:
        async with open_websocket_url(f"{url}/events?user=u{number}") as websocket:
            await websocket.get_message()  # hello
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for number in range(count):
            nursery.start_soon(hold, number)
            if number % 50 == 0:
                await trio.sleep(0.05)  # do not overrun the listen backlog


if __name__ == "__main__":
    trio.run(hold_all, sys.argv[1], int(sys.argv[2]))
