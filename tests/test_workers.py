"""``triows serve --workers N``: the parent process supervises its workers."""

from __future__ import annotations

import psutil
import pytest
import trio

from tests.brokers import require_broker
from triows.process import serve_instance

pytestmark = pytest.mark.broker


def worker_processes(parent_pid: int) -> list[psutil.Process]:
    """The spawned worker processes (not multiprocessing's resource tracker)."""
    return [
        child
        for child in psutil.Process(parent_pid).children()
        if "resource_tracker" not in " ".join(child.cmdline())
    ]


async def test_a_dead_worker_stops_the_others_and_the_parent_exits_non_zero() -> None:
    await require_broker("rabbitmq")
    async with serve_instance("amqp091", workers=2) as server:
        await server.wait_ready()
        workers = worker_processes(server.process.pid)
        assert len(workers) == 2
        workers[0].kill()
        with trio.fail_after(30):
            assert await server.process.wait() != 0
        assert not workers[1].is_running() or workers[1].status() == psutil.STATUS_ZOMBIE
