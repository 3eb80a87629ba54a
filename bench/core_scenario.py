"""Throughput and latency of the core scenario, per backend, on this machine.

For each backend named: start two real ``triows serve`` instances A and B on
loopback (their own exchange), connect Bob's WebSocket to B, and POST
``--messages`` messages for Bob to A from ``--concurrency`` concurrent HTTP
clients. Latency is end to end, from the start of the POST to the frame's
arrival on Bob's socket; throughput is messages delivered per second of the
whole run. Every backend runs in the same process, one after the other, so
the figures are comparable.

    python bench/core_scenario.py --backends amqp091 amqp10 --messages 5000

A backend may name its broker as ``NAME=BROKER_URL``, so one backend can be
compared on two brokers in the same run, e.g. STOMP on ActiveMQ and RabbitMQ:

    python bench/core_scenario.py --backends stomp=stomp://guest:guest@127.0.0.1:61614 \
        stomp=stomp://guest:guest@127.0.0.1:61613

The brokers must be running (``deploy/brokers.sh start rabbitmq rabbitmq-amqp10``).
"""

from __future__ import annotations

import argparse
import math
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import trio

from triows.client import open_events, post_send
from triows.process import serve_instance

RUN_TIMEOUT = 600  # seconds; a hang guard per backend


@dataclass
class Result:
    backend: str
    messages: int
    seconds: float
    latencies: list[float]

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1)]

    def row(self) -> str:
        return (
            f"{self.backend:<16} {self.messages:>8} {self.messages / self.seconds:>10.0f} "
            f"{self.percentile(0.50) * 1000:>8.2f} {self.percentile(0.99) * 1000:>8.2f}"
        )


async def run_backend(spec: str, messages: int, concurrency: int) -> Result:
    backend, _, broker_url = spec.partition("=")
    label = f"{backend}:{urlsplit(broker_url).port}" if broker_url else backend
    env = {"TRIOWS_EXCHANGE": f"triows-bench-{secrets.token_hex(4)}"}
    if broker_url:
        env["TRIOWS_BROKER_URL"] = broker_url
    # Bob's outbound queue must hold a burst: overflowing it is not what is measured.
    bob_env = {**env, "TRIOWS_SEND_QUEUE": str(messages)}
    async with (
        serve_instance(backend, env=env) as a,
        serve_instance(backend, env=bob_env) as b,
        httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as http,
    ):
        await a.wait_ready()
        await b.wait_ready()
        async with open_events(b.base_url, user="Bob") as bob:
            sent_at: dict[int, float] = {}
            latencies: list[float] = []
            next_number = 0

            async def post_worker() -> None:
                nonlocal next_number
                while next_number < messages:
                    number = next_number
                    next_number += 1
                    sent_at[number] = time.perf_counter()
                    message = {"n": number}
                    response = await post_send(http, a.base_url, "Bob", message, sender="Anne")
                    if response.status_code != 202:
                        status, text = response.status_code, response.text
                        raise RuntimeError(f"/send answered {status}: {text}")

            async def read_bob() -> None:
                while len(latencies) < messages:
                    frame = await bob.receive()
                    latencies.append(time.perf_counter() - sent_at[frame["message"]["n"]])

            started = time.perf_counter()
            with trio.fail_after(RUN_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_bob)
                    for _ in range(concurrency):
                        nursery.start_soon(post_worker)
            return Result(label, messages, time.perf_counter() - started, latencies)


async def main(backends: list[str], messages: int, concurrency: int) -> None:
    results = [await run_backend(backend, messages, concurrency) for backend in backends]
    print(f"core scenario: {messages} messages, {concurrency} concurrent POSTs, 2 instances")
    print(f"{'backend':<16} {'messages':>8} {'msg/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for result in results:
        print(result.row())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--backends", nargs="+", default=["amqp091", "amqp10"], metavar="NAME[=BROKER_URL]"
    )
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    options = parser.parse_args()
    trio.run(main, options.backends, options.messages, options.concurrency)
