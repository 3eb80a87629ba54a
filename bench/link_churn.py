"""Memory and proton links of one AMQP 1.0 backend that holds and releases one key again and again.

Each cycle is what a user's last disconnect (or a room's last leave) and the
next connect cost the instance: a subscribe and an unsubscribe of one key on
one broker connection. This prints, as one JSON line, the process's RSS every
``--every`` cycles, its least-squares slope in KiB per 1,000 cycles (the first
sample, warm-up, left out), and the links proton still keeps on the connection
and the detached link names the backend still remembers at the end.

    python -m bench.link_churn --cycles 4000
    PYTHONPATH=/path/to/checkout python -m bench.link_churn   # another version's backends
"""

from __future__ import annotations

import argparse
import json
import secrets

import psutil
import trio

from bench.faults.churn import rss_slope
from deploy.brokers import BROKERS
from triows.backends.amqp10 import Amqp10Backend, open_amqp10_backend
from triows.settings import Settings


def proton_links(backend: Amqp10Backend) -> int:
    """How many links proton keeps on the backend's connection (freed ones are gone)."""
    live = backend._following
    assert live is not None
    count, link = 0, live.pump.connection.link_head(0)
    while link is not None:
        count, link = count + 1, link.next(0)
    return count


async def run(cycles: int, every: int) -> dict[str, object]:
    settings = Settings(
        backend="amqp10",
        broker_url=BROKERS["rabbitmq-amqp10"].url,
        exchange=f"bench-links-{secrets.token_hex(4)}",
        instance_id=f"bench-links-{secrets.token_hex(4)}",
        resume_window=0,  # links per key, as before sessions
    )
    process = psutil.Process()
    samples: list[tuple[int, float]] = []
    async with open_amqp10_backend(settings) as backend:
        await backend.wait_ready()
        for n in range(1, cycles + 1):
            await backend.subscribe("user.bob")
            await backend.unsubscribe("user.bob")
            if n % every == 0:
                samples.append((n, round(process.memory_info().rss / 2**20, 2)))
        live = backend._following
        assert live is not None
        return {
            "cycles": cycles,
            "rss_mib": samples,
            "rss_slope_kib_per_1000_cycles": rss_slope(samples),
            "proton_links": proton_links(backend),
            "detached_names": len(live.detached),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=4000)
    parser.add_argument("--every", type=int, default=500, help="cycles between RSS samples")
    args = parser.parse_args()
    print(json.dumps(trio.run(run, args.cycles, args.every)))


if __name__ == "__main__":
    main()
