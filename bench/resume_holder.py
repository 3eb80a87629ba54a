"""Hold N idle sessions on one instance and resume each on another when its socket ends.

``python -m bench.resume_holder FIRST_URL THEN_URL PREFIX COUNT``: opens
``COUNT`` ``/events`` sockets on ``FIRST_URL`` (users ``PREFIX0`` ...), prints
``open`` once every ``hello`` came, and when a socket ends reconnects at once
to ``THEN_URL`` with its session's token (``?session=``; nothing was received,
so no cursor), again after each refused attempt. Once every session came back
(or ``DEADLINE`` passed) it prints one JSON line: when each ``hello`` after
the end came (``time.monotonic()``, comparable across processes), whether it
said ``"resumed": true``, and the attempts. Closing its stdin (at any stage)
closes every socket normally (which ends the sessions) and exits. The client side of
``bench.mass_resume``: many sockets per process, one process per share.
"""

from __future__ import annotations

import json
import random
import sys
import time
from contextlib import suppress
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

# Handshakes in flight while opening the sessions on the first instance.
OPEN_CONCURRENCY = 64
# After a refused or failed reconnect: wait up to this (random) before the next.
RETRY_JITTER = 0.5
DEADLINE = 300.0
CONNECT_TIMEOUT = 60.0
CLOSE_TIMEOUT = 60.0


async def hold_all(first_url: str, then_url: str, prefix: str, count: int) -> None:
    opened = failed = 0
    all_open = trio.Event()
    back: dict[int, dict[str, Any]] = {}
    all_back = trio.Event()
    attempts = [0] * count
    handshakes = trio.Semaphore(OPEN_CONCURRENCY)
    finish = trio.Event()

    async def hold(index: int) -> None:
        nonlocal opened, failed
        user = f"{prefix}{index}"
        token: str | None = None
        await handshakes.acquire()
        released = False
        try:
            async with open_websocket_url(
                f"{first_url}/events?user={user}", connect_timeout=CONNECT_TIMEOUT
            ) as socket:
                handshakes.release()
                released = True
                token = json.loads(await socket.get_message())["session"]
                opened += 1
                if opened + failed == count:
                    all_open.set()
                with suppress(ConnectionClosed):
                    while True:
                        await socket.get_message()
        except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError):
            if not released:
                failed += 1
                if opened + failed == count:
                    all_open.set()
                return
        finally:
            if not released:
                handshakes.release()
        if token is None:
            return  # cut before its hello: never opened
        ended = time.monotonic()
        url = f"{then_url}/events?user={user}&session={token}"
        while time.monotonic() < ended + DEADLINE:
            attempts[index] += 1
            try:
                async with open_websocket_url(url, connect_timeout=CONNECT_TIMEOUT) as again:
                    hello = json.loads(await again.get_message())
                    back[index] = {
                        "at": time.monotonic(),
                        "ended": ended,
                        "resumed": bool(hello.get("resumed")),
                    }
                    if len(back) == opened:
                        all_back.set()
                    await finish.wait()
                    return
            except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError):
                await trio.sleep(random.uniform(0, RETRY_JITTER))

    async def until_stdin_closes() -> None:
        await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
        finish.set()
        all_open.set()  # whatever stage this is: report and stop
        all_back.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(until_stdin_closes)
        for index in range(count):
            nursery.start_soon(hold, index)
        await all_open.wait()
        print(f"open {opened} failed {failed}", flush=True)
        with trio.move_on_after(DEADLINE):
            await all_back.wait()
        resumed_at = [entry["at"] for entry in back.values() if entry["resumed"]]
        print(
            json.dumps(
                {
                    "count": count,
                    "opened": opened,
                    "back": len(back),
                    "resumed": len(resumed_at),
                    "not_resumed": sum(1 for entry in back.values() if not entry["resumed"]),
                    "first_ended": min((e["ended"] for e in back.values()), default=None),
                    "last_resumed": max(resumed_at, default=None),
                    "resumed_at": sorted(resumed_at),
                    "attempts": sum(attempts),
                }
            ),
            flush=True,
        )
        await finish.wait()
        # Each resumed socket now closes normally (ending its session); not forever.
        nursery.cancel_scope.deadline = trio.current_time() + CLOSE_TIMEOUT


if __name__ == "__main__":
    trio.run(hold_all, sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
