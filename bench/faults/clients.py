"""Client-side cases: one user with many sockets (fan-out), and clients that vanish."""

from __future__ import annotations

import subprocess
import sys
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from bench.faults.broker_side import bound_keys
from bench.faults.cluster import open_cluster, process_stats
from bench.faults.options import DEFAULT_CLOSE_TIMEOUT, HTTP_TIMEOUT, POLL, STEP_TIMEOUT, Options
from bench.faults.proxy import open_fault_proxy
from bench.faults.traffic import now
from bench.targets import Target
from triows.client import open_events


async def run_fanout(target: Target, sockets: int, messages: int, opts: Options) -> dict[str, Any]:
    """One user with ``sockets`` sockets on instance B; messages POSTed to A reach each socket."""
    async with (
        open_cluster(target, opts) as cluster,
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http,
    ):
        b = cluster.nodes["b"]
        counts: list[list[int]] = []
        async with trio.open_nursery() as nursery:
            opened = trio.Semaphore(0)
            done = trio.Event()

            async def holder(index: int) -> None:
                got: list[int] = []
                counts.append(got)
                async with open_events(b.base_url, user="many") as events:
                    opened.release()
                    while len(got) < messages:
                        frame = await events.receive()
                        if frame.get("type") == "message":
                            got.append(frame["message"]["s"])
                    await done.wait()

            for index in range(sockets):
                nursery.start_soon(holder, index)
            with trio.fail_after(STEP_TIMEOUT * 2):
                for _ in range(sockets):
                    await opened.acquire()
            statuses = []
            for seq in range(messages):
                response = await http.post(
                    f"{cluster.nodes['a'].base_url}/send",
                    json={"to": "many", "from": "faults", "message": {"s": seq}},
                )
                statuses.append(response.status_code)
            with trio.move_on_after(STEP_TIMEOUT):
                while sum(len(c) for c in counts) < sockets * messages:  # noqa: ASYNC110
                    await trio.sleep(POLL)
            done.set()
            nursery.cancel_scope.cancel()
        complete = sum(1 for c in counts if c == list(range(messages)))
        return {
            "target": target.name,
            "fault": "fanout",
            "status": "ok",
            "sockets": sockets,
            "messages": messages,
            "sends_2xx": statuses.count(202),
            "sockets_complete_in_order": complete,
            "frames_received": sum(len(c) for c in counts),
            "instance_b": process_stats(b),
        }


# What is sent to the dead clients meanwhile: a few of these fill the tight
# proxy's window, after which the instance's writes to the silent socket
# wait, as they would towards a vanished peer.
DEAD_CLIENT_PADDING = "x" * 8192


def dead_client_wait(opts: Options) -> float:
    """How long a vanished client may go unnoticed before giving up (a hang guard).

    Written to, the silent socket is cut by the instance's write deadline
    (TRIOWS_CLOSE_TIMEOUT, default 5 s; measured: 7-8 s to the broker's 404,
    whatever the ping interval) or by TCP_USER_TIMEOUT (twice the ping
    interval); idle, by TCP keepalive after the ping interval plus 3 probes
    (twice the interval). The idle path cannot be shown through a loopback
    proxy: the proxy's kernel answers the probes. Three times the larger bound
    leaves room for a loaded machine.
    """
    return 3 * max(DEFAULT_CLOSE_TIMEOUT, 2 * opts.ping_interval)


async def run_dead_client(target: Target, opts: Options, wait: float) -> dict[str, Any]:
    """A client whose socket goes silent (half-open) and one whose process is killed.

    Both are connected to instance B directly, the first through a proxy that
    stalls. Reports how long until the broker reports each user offline (404
    on ``routed`` targets) and whether that happened within ``wait`` seconds.
    """
    async with (
        open_cluster(target, opts) as cluster,
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http,
    ):
        b = cluster.nodes["b"]
        b_port = urlsplit(b.base_url).port or 0
        result: dict[str, Any] = {"target": target.name, "fault": "dead-client", "status": "ok"}
        async with open_fault_proxy(b_port, tight=True) as proxy, trio.open_nursery() as nursery:
            ready = trio.Event()

            async def silent_client() -> None:
                async with open_events(f"http://127.0.0.1:{proxy.port}", user="ghost"):
                    ready.set()
                    await trio.sleep_forever()

            nursery.start_soon(silent_client)
            await ready.wait()
            killed = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-c",
                    "import sys,trio;from triows.client import open_events\n"
                    "async def m():\n"
                    f"  async with open_events({b.base_url!r}, user='killed'):\n"
                    "    print('open', flush=True); await trio.sleep_forever()\n"
                    "trio.run(m)",
                ],
                stdout=subprocess.PIPE,
            )
            assert killed.stdout is not None
            await killed.stdout.receive_some(10)
            for user in ("ghost", "killed"):
                response = await http.post(
                    f"{cluster.nodes['a'].base_url}/send", json={"to": user, "message": "x"}
                )
                result[f"{user}_before"] = response.status_code
            start = now()
            proxy.stall()
            killed.kill()
            await killed.wait()
            gone: dict[str, float | None] = {"ghost": None, "killed": None}
            # Released: the broker says offline (404, amqp091) or, on RabbitMQ,
            # holds no binding for the user's key any more (every backend there).
            observable = target.backend == "amqp091" or target.family == "rabbitmq"
            result["release_observable"] = observable
            with trio.move_on_after(wait if observable else 0):
                while any(v is None for v in gone.values()):
                    keys = await bound_keys(cluster)
                    for user in gone:
                        if gone[user] is None:
                            response = await http.post(
                                f"{cluster.nodes['a'].base_url}/send",
                                json={"to": user, "message": DEAD_CLIENT_PADDING},
                            )
                            unbound = keys is not None and f"user.{user}" not in keys
                            if response.status_code == 404 or unbound:
                                gone[user] = round(now() - start, 3)
                    await trio.sleep(0.2)
            result["half_open_released_s"] = gone["ghost"]
            result["killed_released_s"] = gone["killed"]
            result["waited_s"] = wait
            result["alive"] = all(n.process.returncode is None for n in cluster.nodes.values())
            proxy.resume()
            nursery.cancel_scope.cancel()
        return result
