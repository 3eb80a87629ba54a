"""Instance faults under traffic: SIGTERM (drain) and SIGKILL (death)."""

from __future__ import annotations

from typing import Any

import httpx
import trio

from bench.faults.broker_side import (
    ACTIVEMQ_LOG,
    activemq_expired,
    activemq_log_size,
    broker_side_count,
)
from bench.faults.cluster import Cluster
from bench.faults.options import STEP_TIMEOUT, Options
from bench.faults.traffic import Clock, Traffic, now


async def fault_drain(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """SIGTERM instance A under traffic; it drains and exits."""
    node = cluster.nodes["a"]
    on_a = [s.user for s in traffic.sockets if s.instance == "a" and s.closed is None]
    unready: float | None = None
    # When each /readyz that answered 200 was asked, since SIGTERM.
    ready_asked: list[float] = []

    async def poll_readyz() -> None:
        # Back to back, not every POLL: the first socket may close within milliseconds.
        nonlocal unready
        async with httpx.AsyncClient(timeout=2.0) as http:
            while unready is None:
                asked = now()
                try:
                    status = (await http.get(f"{node.base_url}/readyz")).status_code
                except httpx.HTTPError:
                    status = 0
                if status != 200:
                    unready = now()
                else:
                    ready_asked.append(asked)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll_readyz)
        await trio.sleep(0.2)  # the poller's connection is open and polling
        clock.began()
        cluster.stopped.add("a")
        node.instance.terminate()
        with trio.fail_after(STEP_TIMEOUT):
            await node.process.wait()
        clock.ended()
        nursery.cancel_scope.cancel()
    exit_s = round(clock.end - clock.begin, 3)
    closes = [s for s in traffic.sockets if s.instance == "a" and s.closed is not None]
    first_close = min((s.closed for s in closes if s.closed), default=None)
    return {
        "how": "kill -TERM <instance A>",
        "exit_code": node.process.returncode,
        "exit_s": exit_s,
        "sockets_on_a": len(on_a),
        "close_codes": sorted({s.code for s in closes if s.code is not None}),
        "readyz_503_before_first_close": (
            None if unready is None or first_close is None else unready <= first_close
        ),
        # Decidable from outside, whatever the latencies: a /readyz asked after a
        # client had already seen its socket closed, answered 200 all the same.
        "readyz_200_after_first_close": (
            first_close is not None and any(asked > first_close for asked in ready_asked)
        ),
        "readyz_503_s": None if unready is None else round(unready - clock.begin, 3),
        "first_close_s": None if first_close is None else round(first_close - clock.begin, 3),
    }


async def fault_death(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """SIGKILL instance A under traffic; the broker must forget what it held for A."""
    node = cluster.nodes["a"]
    before = await broker_side_count(cluster, node.instance_id)
    log_start = activemq_log_size()
    clock.began()
    cluster.stopped.add("a")
    node.process.kill()
    await node.process.wait()
    clock.ended(window=opts.instant_window)
    forgotten_s = None
    after = before
    if cluster.target.family == "activemq" and ACTIVEMQ_LOG.exists():
        # Offline durable subscriptions expire after 30 s, checked every 5 s.
        with trio.move_on_after(opts.forget_timeout):
            while True:
                after = activemq_expired(node.instance_id, log_start)
                if after["pinned_expired"]:
                    forgotten_s = round(now() - clock.begin, 3)
                    break
                await trio.sleep(0.5)
    if before is not None:
        with trio.move_on_after(opts.forget_timeout):
            while True:
                after = await broker_side_count(cluster, node.instance_id)
                assert after is not None
                if after["queue"] == 0 and after["pinned_bindings"] == 0:
                    forgotten_s = round(now() - clock.begin, 3)
                    break
                await trio.sleep(0.2)
    return {
        "how": "kill -KILL <instance A>",
        "broker_before": before,
        "broker_after": after,
        "broker_forgot_s": forgotten_s,
    }
