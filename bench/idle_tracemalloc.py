"""Where the bytes of an idle WebSocket go: tracemalloc inside one triows worker.

``python -m bench.idle_tracemalloc [N]`` serves triows (memory backend) in this
process, has a child process (``bench/idle_holder.py``) open N idle sockets,
and prints the Python heap that grew, per connection, by package.
"""

from __future__ import annotations

import collections
import sys
import tracemalloc
from pathlib import Path

import httpx
import trio
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from triows.app import create_app
from triows.process import free_port
from triows.serving import _listening_sockets, hypercorn_config, install_hypercorn_adaptation
from triows.settings import Settings

HOLDER = Path(__file__).with_name("idle_holder.py")


def _package(filename: str) -> str:
    if "site-packages/" in filename:
        return filename.split("site-packages/")[-1].split("/")[0]
    if "/triows/" in filename:
        return "triows"
    if filename.startswith("<attrs generated"):
        return "trio (attrs-generated classes)"
    return "stdlib" if "/lib/python" in filename else filename


async def measure(count: int) -> None:
    port = free_port()
    settings = Settings(bind=(f"127.0.0.1:{port}",), log_level="WARNING")
    config = hypercorn_config(settings)
    app = create_app(settings)
    install_hypercorn_adaptation(settings)
    sockets = _listening_sockets(config, settings, listen=True)
    wrapped = wrap_app(app, config.wsgi_max_body_size, None)
    async with trio.open_nursery() as nursery, httpx.AsyncClient() as http:
        nursery.start_soon(lambda: worker_serve(wrapped, config, sockets=sockets))
        while True:
            try:
                if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            await trio.sleep(0.1)
        tracemalloc.start(8)
        before = tracemalloc.take_snapshot()
        holder = await trio.lowlevel.open_process(
            [sys.executable, str(HOLDER), f"ws://127.0.0.1:{port}", str(count)]
        )
        while len(app.router.connections) < count:  # noqa: ASYNC110
            await trio.sleep(0.2)
        await trio.sleep(1)
        after = tracemalloc.take_snapshot()
        by_package: collections.Counter[str] = collections.Counter()
        for stat in after.compare_to(before, "filename"):
            by_package[_package(stat.traceback[0].filename)] += stat.size_diff
        print(f"{sum(by_package.values()) / count:.0f} B per connection ({count} idle sockets)")
        for name, size in by_package.most_common(12):
            print(f"  {name:36s} {size / count:8.0f} B")
        holder.kill()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(measure, int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
