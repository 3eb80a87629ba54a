"""How long a new connection's ``hello`` and a ``join`` take while other users churn.

Starts one ``triows serve`` (dev mode: no secret) on the chosen backend, then
runs ``--churners`` WebSocket clients that each connect, join a room of their
own, and disconnect, in a loop, as fast as the instance lets them: every cycle
is a subscribe and an unsubscribe of the user's key and of the room's. Once
they run, a probe connects as a new user every ``--interval`` seconds and
times its ``hello`` (the user's key subscribed) and then a ``join`` of a new
room (``joined``: the room's key subscribed). Prints one JSON line per
``--churners`` value with the probe's median, 90th percentile and maximum.

    python -m bench.churn_latency --target amqp091-rabbitmq --churners 0,20,200,1000

To measure other code with the same script, put it first on ``PYTHONPATH``:
the instance is started with this interpreter and inherits the environment.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from bench.targets import TARGETS
from triows.process import serve_instance

CYCLE_TIMEOUT = 30.0
"""A churner's cycle (or a probe) that takes longer is given up and counted as stuck."""


async def churn(url: str, number: int, counts: dict[str, int], stop: trio.Event) -> None:
    """Connect, join a room, disconnect, again, until ``stop``; count cycles."""
    user = f"churner{number}"
    while not stop.is_set():
        with trio.move_on_after(CYCLE_TIMEOUT) as cycle:
            try:
                async with open_websocket_url(f"{url}/events?user={user}") as websocket:
                    await websocket.get_message()  # hello
                    await websocket.send_message(
                        json.dumps({"type": "join", "room": f"churn{number}", "ref": "j"})
                    )
                    await websocket.get_message()  # joined
            except (ConnectionClosed, HandshakeError, OSError):
                counts["refused"] += 1
                await trio.sleep(0.1)  # refused (e.g. over the connection limit): back off
                continue
        counts["stuck" if cycle.cancelled_caught else "cycles"] += 1


async def probe_once(url: str, number: int) -> tuple[float, float]:
    """One new user's connect-to-``hello`` and ``join``-to-``joined`` times, in seconds."""
    started = time.perf_counter()
    async with open_websocket_url(f"{url}/events?user=probe{number}") as websocket:
        hello = json.loads(await websocket.get_message())
        connected = time.perf_counter()
        assert hello["type"] == "hello", hello
        await websocket.send_message(
            json.dumps({"type": "join", "room": f"probe{number}", "ref": "p"})
        )
        joined = json.loads(await websocket.get_message())
        assert joined["type"] == "joined", joined
        return connected - started, time.perf_counter() - connected


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 1),
        "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


async def measure(
    url: str, churners: int, probes: int, interval: float, warmup: float
) -> dict[str, Any]:
    stop = trio.Event()
    counts = {"cycles": 0, "refused": 0, "stuck": 0}
    hellos: list[float] = []
    joins: list[float] = []
    async with trio.open_nursery() as nursery:
        for number in range(churners):
            nursery.start_soon(churn, url, number, counts, stop)
            if number % 50 == 49:
                await trio.sleep(0.05)  # do not overrun the listen backlog
        await trio.sleep(warmup)
        counted_from, started = counts["cycles"], time.perf_counter()
        for number in range(probes):
            with trio.fail_after(CYCLE_TIMEOUT):
                hello, join = await probe_once(url, number)
            hellos.append(hello)
            joins.append(join)
            await trio.sleep(interval)
        cycle_rate = (counts["cycles"] - counted_from) / (time.perf_counter() - started)
        stop.set()
    return {
        "churners": churners,
        "probes": probes,
        "churn_cycles_per_s": round(cycle_rate, 1),
        "churn_refused": counts["refused"],
        "churn_stuck": counts["stuck"],
        "hello": summary(hellos),
        "join": summary(joins),
    }


async def main(arguments: argparse.Namespace) -> None:
    target = TARGETS[arguments.target]
    async with serve_instance(target.backend, broker_url=target.broker_url or None) as instance:
        await instance.wait_ready()
        url = instance.base_url.replace("http://", "ws://")
        for churners in arguments.churners:
            row = await measure(
                url, churners, arguments.probes, arguments.interval, arguments.warmup
            )
            print(json.dumps({"target": target.name, **row}), flush=True)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.churn_latency", description=__doc__.partition("\n\n")[0]
    )
    parser.add_argument(
        "--target",
        default="amqp091-rabbitmq",
        choices=sorted(TARGETS),
        help="backend and broker, as in python -m bench (default amqp091-rabbitmq)",
    )
    parser.add_argument(
        "--churners",
        type=lambda text: [int(part) for part in text.split(",")],
        default=[0, 20, 200, 1000],
        help="comma-separated numbers of churning clients, one row each (default 0,20,200,1000)",
    )
    parser.add_argument("--probes", type=int, default=30, help="probe connections per row")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between probes")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of churn before probing")
    return parser.parse_args(argv)


if __name__ == "__main__":
    trio.run(main, parse_arguments())
