"""What costly JSON does to everyone else: ``/healthz`` and Anne -> Bob latency under attack.

``python -m bench.abuse_json [--tree DIR] [--attack frames|batches|none]
[--attackers 10] [--objects 21500] [--duration 15] [--warmup 3]`` starts ``triows serve`` (dev
mode, memory backend) from ``--tree`` (default: this checkout; ``python -m``
imports from the working directory first, so another checkout's code runs),
then, while ``--attackers`` clients attack, probes every 100 ms:

- ``/healthz`` on its own keep-alive HTTP connection: the time to the answer;
- Anne -> Bob: Anne's WebSocket sends Bob a small message, the time until
  Bob's WebSocket reads it.

Attacks (each client within every limit the server sets):

- ``frames``: each of ``--attackers`` WebSockets sends ``send`` frames of
  ``--objects`` empty objects (21,500: 64.5 KB, under
  ``TRIOWS_MAX_MESSAGE_BYTES``; 2,000: within ``TRIOWS_MAX_JSON_TOKENS``) to a
  reading user, one after another, each as soon as the previous is answered;
  the server's own send rate limit decides how fast;
- ``batches``: each of ``--attackers`` HTTP clients POSTs, one after another,
  a batch of one item holding 1 MiB (minus a little) of empty objects, under
  ``TRIOWS_MAX_BATCH_BYTES``;
- ``none``: the same probes with no attack (the baseline).

Prints the median, 90th percentile and maximum of each probe in milliseconds
and how many attack requests the server answered. A probe waits at most 10 s;
one that does not get its answer in time counts as 10 s. Needs the bench extra
(``httpx``, ``trio-websocket``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio
from trio_websocket import open_websocket_url

from triows.process import free_port

START_TIMEOUT = 60.0
PROBE_INTERVAL = 0.1
PROBE_TIMEOUT = 10.0
COMPACT = (",", ":")
BATCH_BYTES = 1_048_576 - 64


def costly_frame(objects: int) -> str:
    message: list[dict[str, str]] = [{}] * objects
    return json.dumps({"type": "send", "to": "Sink", "message": message}, separators=COMPACT)


def costly_batch() -> bytes:
    head, tail = b'[{"to":"Sink","message":[', b"{}]}]"
    count = (BATCH_BYTES - len(head) - len(tail)) // 3
    return head + b"{}," * count + tail


class Tally:
    def __init__(self) -> None:
        self.healthz: list[float] = []
        self.anne_bob: list[float] = []
        self.answers: dict[str, int] = {}

    def answered(self, what: str) -> None:
        self.answers[what] = self.answers.get(what, 0) + 1


async def probe_healthz(base: str, tally: Tally, until: float) -> None:
    async with httpx.AsyncClient(timeout=PROBE_TIMEOUT) as http:
        while trio.current_time() < until:
            started = trio.current_time()
            try:
                await http.get(f"{base}/healthz")
                tally.healthz.append(trio.current_time() - started)
            except httpx.HTTPError:
                tally.healthz.append(PROBE_TIMEOUT)
            await trio.sleep(PROBE_INTERVAL)


async def probe_anne_bob(ws_base: str, tally: Tally, until: float) -> None:
    async with (
        open_websocket_url(f"{ws_base}/events?user=Anne") as anne,
        open_websocket_url(f"{ws_base}/events?user=Bob") as bob,
    ):
        await anne.get_message()  # hello
        await bob.get_message()

        async def drain_acks() -> None:
            while True:
                await anne.get_message()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_acks)
            number = 0
            while trio.current_time() < until:
                number += 1
                frame = {"type": "send", "to": "Bob", "message": number}
                started = trio.current_time()
                await anne.send_message(json.dumps(frame))
                with trio.move_on_after(PROBE_TIMEOUT) as waiting:
                    while json.loads(await bob.get_message()).get("message") != number:
                        pass
                late = PROBE_TIMEOUT if waiting.cancelled_caught else None
                tally.anne_bob.append(late or trio.current_time() - started)
                await trio.sleep(PROBE_INTERVAL)
            nursery.cancel_scope.cancel()


async def sink(ws_base: str) -> None:
    """The user the attack frames go to: reads (and drops) all it gets."""
    async with open_websocket_url(
        f"{ws_base}/events?user=Sink", max_message_size=4 * 1024 * 1024
    ) as websocket:
        while True:
            await websocket.get_message()


async def attack_frames(ws_base: str, number: int, objects: int, tally: Tally) -> None:
    frame = costly_frame(objects)
    async with open_websocket_url(f"{ws_base}/events?user=Mallory{number}") as websocket:
        await websocket.get_message()  # hello
        while True:
            await websocket.send_message(frame)
            answer = json.loads(await websocket.get_message())
            tally.answered(answer.get("code") or answer["type"])


async def attack_batches(base: str, tally: Tally) -> None:
    body = costly_batch()
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=60) as http:
        while True:
            answer = await http.post(f"{base}/send", content=body, headers=headers)
            tally.answered(str(answer.status_code))


async def run(
    base: str, attack: str, attackers: int, objects: int, duration: float, warmup: float
) -> Tally:
    tally = Tally()
    ws_base = base.replace("http://", "ws://")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sink, ws_base)
        for number in range(attackers if attack != "none" else 0):
            if attack == "frames":
                nursery.start_soon(attack_frames, ws_base, number, objects, tally)
            else:
                nursery.start_soon(attack_batches, base, tally)
        await trio.sleep(warmup)
        until = trio.current_time() + duration
        async with trio.open_nursery() as probes:
            probes.start_soon(probe_healthz, base, tally, until)
            probes.start_soon(probe_anne_bob, ws_base, tally, until)
        nursery.cancel_scope.cancel()
    return tally


def summary(name: str, seconds: list[float]) -> str:
    if not seconds:
        return f"{name}: no probe finished"
    ms = sorted(1000 * s for s in seconds)
    p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
    return (
        f"{name}: median {statistics.median(ms):.1f} ms, p90 {p90:.1f} ms, "
        f"max {ms[-1]:.1f} ms ({len(ms)} probes)"
    )


def serve(tree: Path, url_file: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TRIOWS_LOG_LEVEL": "ERROR", "TRIOWS_BACKEND": "memory"}
    command = [sys.executable, "-m", "triows", "serve", "--bind", f"127.0.0.1:{free_port()}"]
    command += ["--url-file", str(url_file)]
    return subprocess.Popen(command, cwd=tree, env=env, stderr=subprocess.DEVNULL)


def wait_healthy(url_file: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if url_file.exists():
            base = url_file.read_text().split()[0]
            try:
                if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                    return base
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise RuntimeError("triows serve did not become healthy")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.abuse_json",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--attack", choices=["frames", "batches", "none"], default="frames")
    parser.add_argument("--attackers", type=int, default=10)
    parser.add_argument("--objects", type=int, default=21_500, help="empty objects per frame")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of probes")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of attack before")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        url_file = Path(scratch) / "url"
        server = serve(args.tree, url_file)
        try:
            base = wait_healthy(url_file)
            tally = trio.run(
                run, base, args.attack, args.attackers, args.objects, args.duration, args.warmup
            )
        finally:
            server.terminate()
            server.wait(timeout=START_TIMEOUT)
    objects = f" objects={args.objects}" if args.attack == "frames" else ""
    print(f"{args.tree} attack={args.attack} attackers={args.attackers}{objects}")
    print(summary("/healthz", tally.healthz))
    print(summary("Anne -> Bob", tally.anne_bob))
    print(f"attack answers: {tally.answers or 'none'}")


if __name__ == "__main__":
    main()
