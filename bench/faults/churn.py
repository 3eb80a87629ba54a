"""Connect/disconnect churn over both instances: what is held once it settles."""

from __future__ import annotations

from typing import Any

import trio
from trio_websocket import ConnectionClosed, HandshakeError

from bench.faults.broker_side import broker_side_count
from bench.faults.cluster import Cluster, open_cluster, process_stats
from bench.faults.options import Options
from bench.faults.traffic import now
from bench.targets import Target
from triows.client import open_events

# Cycles between two RSS samples.
CHURN_SAMPLE_CYCLES = 1000


async def settled_stats(cluster: Cluster) -> dict[str, Any]:
    await trio.sleep(1.0)
    stats: dict[str, Any] = {label: process_stats(node) for label, node in cluster.nodes.items()}
    side = await broker_side_count(cluster, "-")
    if side is not None:
        stats["broker_bindings"] = side["bindings"]
    return stats


async def run_churn(
    target: Target, cycles: int, opts: Options, concurrency: int = 20
) -> dict[str, Any]:
    """``cycles`` connect/disconnect cycles over both instances (users u0..u9, many sockets)."""
    async with open_cluster(target, opts) as cluster:
        urls = [node.base_url for node in cluster.nodes.values()]

        # Warm up first: the first connections allocate what later ones reuse.
        async def cycle(n: int) -> None:
            async with open_events(urls[n % 2], user=f"u{n % 10}"):
                pass

        for n in range(min(50, cycles)):
            await cycle(n)
        baseline = await settled_stats(cluster)
        failures = 0
        limiter = trio.CapacityLimiter(concurrency)

        async def limited(n: int) -> None:
            nonlocal failures
            async with limiter:
                try:
                    await cycle(n)
                except (OSError, HandshakeError, ConnectionClosed):
                    failures += 1

        # RSS after every CHURN_SAMPLE_CYCLES cycles: a leak per cycle shows as
        # a slope that one before/after pair (allocator noise) cannot show.
        samples: dict[str, list[tuple[int, float]]] = {label: [] for label in cluster.nodes}
        with trio.fail_after(max(600.0, cycles * 0.2)):
            for start in range(0, cycles, CHURN_SAMPLE_CYCLES):
                done = min(cycles, start + CHURN_SAMPLE_CYCLES)
                async with trio.open_nursery() as nursery:
                    for n in range(start, done):
                        nursery.start_soon(limited, n)
                for label, node in cluster.nodes.items():
                    samples[label].append((done, process_stats(node)["rss_mib"]))
        # Settle: the last unsubscribes reach the broker. On AMQP 1.0 a
        # detached link's queue (and its binding) goes only when the expiry
        # policy removes it (AMQP10_ORPHAN_EXPIRES): wait for that, bounded.
        await trio.sleep(2.0)
        settled = await settled_stats(cluster)
        started = now()
        with trio.move_on_after(opts.forget_timeout):
            while settled.get("broker_bindings", 0) > baseline.get("broker_bindings", 0):
                await trio.sleep(1.0)
                settled = await settled_stats(cluster)
        bindings_settled_s = round(now() - started, 1)
        alive = all(node.process.returncode is None for node in cluster.nodes.values())
        return {
            "target": target.name,
            "fault": "churn",
            "status": "ok",
            "cycles": cycles,
            "failures": failures,
            "alive": alive,
            "baseline": baseline,
            "settled": settled,
            "bindings_settled_s": bindings_settled_s,
            "rss_samples": samples,
            "rss_slope_kib_per_1000_cycles": {
                label: rss_slope(points) for label, points in samples.items()
            },
        }


def rss_slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares growth of RSS in KiB per 1,000 cycles over ``(cycles, rss_mib)``
    samples, the first (warm-up) left out; None with fewer than three left."""
    points = points[1:]
    if len(points) < 3:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return round(slope * 1000 * 1024, 1)
