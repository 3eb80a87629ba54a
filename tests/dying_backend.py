"""A test-only backend whose tasks can be made to die, for the fatal-exit tests.

Never registered in production: ``tests/test_fatal_exit.py`` adds it to the
registry inside the ``triows serve`` process it starts. A publish to
``user.kill-backend-task`` makes a task of the backend's nursery raise; one to
``user.end-incoming`` ends the stream the router's pump reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from triows.backend import Outcome
from triows.backends.memory import MemoryBackend, open_memory_backend
from triows.settings import Settings

KILL_TASK_KEY = "user.kill-backend-task"
END_INCOMING_KEY = "user.end-incoming"


class DyingBackend:
    def __init__(self, memory: MemoryBackend, kill: trio.Event) -> None:
        self._memory = memory
        self._kill = kill
        self.subscribe = memory.subscribe
        self.unsubscribe = memory.unsubscribe
        self.sessions = memory.sessions

    @property
    def ready(self) -> bool:
        return True

    @property
    def incoming(self):  # type: ignore[no-untyped-def]
        return self._memory.incoming

    async def publish(self, key: str, body: bytes) -> Outcome:
        if key == KILL_TASK_KEY:
            self._kill.set()
        elif key == END_INCOMING_KEY:
            await self._memory._send.aclose()
        return await self._memory.publish(key, body)


async def _die_when(kill: trio.Event) -> None:
    await kill.wait()
    raise RuntimeError("a backend task died")


@asynccontextmanager
async def open_dying_backend(settings: Settings) -> AsyncIterator[DyingBackend]:
    kill = trio.Event()
    async with open_memory_backend(settings) as memory, trio.open_nursery() as nursery:
        nursery.start_soon(_die_when, kill)
        yield DyingBackend(memory, kill)
        nursery.cancel_scope.cancel()
