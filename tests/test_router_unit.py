"""The router alone, over a recording fake backend (no broker, no server).

What it promises the backend: subscribe only on a user's first local
connection and unsubscribe only on the last (edges), never two edges of one
user at once, and a detach that completes even when its task is cancelled.
"""

from __future__ import annotations

import itertools
import random
from contextlib import AsyncExitStack

import anyio
import pytest
import trio
import trio.testing
from anyio.abc import ObjectReceiveStream

from triows.backend import Delivery, Outcome
from triows.connection import Connection
from triows.metrics import Metrics
from triows.router import Router
from triows.settings import Settings


class SubscribeFailed(Exception):
    """What the fake backend raises when told to fail a subscribe."""


class RecordingBackend:
    """Records every subscribe/unsubscribe; each may be slowed or made to fail."""

    def __init__(self, *, delay: float = 0.0, rng: random.Random | None = None) -> None:
        self.calls: list[tuple[str, str]] = []  # as asked
        self.done: list[tuple[str, str]] = []  # as answered by the "broker"
        self.held: set[str] = set()
        self.in_flight = 0  # changes waiting for the "broker" now
        self.most_in_flight = 0
        self.fail_subscribes = 0
        self._delay = delay
        self._rng = rng or random.Random(0)
        send, self._receive = anyio.create_memory_object_stream[Delivery](16)
        self._send = send

    @property
    def ready(self) -> bool:
        return True

    @property
    def incoming(self) -> ObjectReceiveStream[Delivery]:
        return self._receive

    async def wait_ready(self) -> None:
        return

    async def aclose(self) -> None:
        return

    async def publish(self, key: str, body: bytes) -> Outcome:
        return Outcome.ROUTED if key in self.held else Outcome.UNROUTED

    async def _broker_answer(self) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await trio.sleep(self._rng.uniform(0, self._delay))
        finally:
            self.in_flight -= 1

    async def subscribe(self, key: str) -> None:
        self.calls.append(("subscribe", key))
        await self._broker_answer()
        if self.fail_subscribes:
            self.fail_subscribes -= 1
            raise SubscribeFailed(key)
        self.held.add(key)
        self.done.append(("subscribe", key))

    async def unsubscribe(self, key: str) -> None:
        self.calls.append(("unsubscribe", key))
        # Forgotten first, as the real backends do.
        self.held.discard(key)
        await self._broker_answer()
        self.done.append(("unsubscribe", key))


def new_router(backend: RecordingBackend) -> Router:
    return Router(backend, Metrics(), Settings())


def connection(user: str) -> Connection:
    return Connection(user, queue_size=8)


async def test_only_the_first_connection_subscribes_and_only_the_last_unsubscribes() -> None:
    backend = RecordingBackend()
    router = new_router(backend)
    async with router.attached(connection("Bob")):
        assert backend.calls == [("subscribe", "user.Bob")]
        async with router.attached(connection("Bob")):
            async with router.attached(connection("Anne")):
                pass
        assert backend.calls == [
            ("subscribe", "user.Bob"),
            ("subscribe", "user.Anne"),
            ("unsubscribe", "user.Anne"),
        ]
        assert backend.held == {"user.Bob"}
    assert backend.calls[-1] == ("unsubscribe", "user.Bob")
    assert backend.held == set()
    assert router.idle.is_set()


FRAME_TO_BOB = '{"type":"message","id":"1","from":null,"to":"Bob","message":"hi","ts":1}'


async def test_a_delivery_reaches_every_local_connection_of_its_user_only() -> None:
    backend = RecordingBackend()
    router = new_router(backend)
    bob_phone, bob_laptop, anne = connection("Bob"), connection("Bob"), connection("Anne")
    async with (
        router.attached(bob_phone),
        router.attached(bob_laptop),
        router.attached(anne),
    ):
        router.deliver("user.Bob", FRAME_TO_BOB.encode())
    assert list(bob_phone._queue) == [FRAME_TO_BOB]
    assert list(bob_laptop._queue) == [FRAME_TO_BOB]
    assert not anne._queue


async def test_concurrent_attach_and_detach_of_one_user_never_interleave_edges(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = RecordingBackend(delay=1.0, rng=random.Random(7))
    router = new_router(backend)
    rng = random.Random(11)

    async def visit() -> None:
        await trio.sleep(rng.uniform(0, 5))
        async with router.attached(connection("Bob")):
            # Whoever is attached is routed to: the key is held meanwhile.
            assert "user.Bob" in backend.held
            await trio.sleep(rng.uniform(0, 2))

    async with trio.open_nursery() as nursery:
        for _ in range(200):
            nursery.start_soon(visit)

    assert backend.most_in_flight == 1  # never two edges of one user at once
    kinds = [kind for kind, _ in backend.calls]
    assert kinds[0] == "subscribe"
    # Edges alternate: no subscribe without the unsubscribe before it, and back.
    assert all(a != b for a, b in itertools.pairwise(kinds))
    assert kinds[-1] == "unsubscribe"
    assert backend.held == set()
    assert not router.connections


async def test_a_detach_cancelled_from_outside_still_unsubscribes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = RecordingBackend(delay=3.0)
    router = new_router(backend)
    attached = trio.Event()

    async def hold() -> None:
        async with router.attached(connection("Bob")):
            attached.set()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold)
        await attached.wait()
        # The connection's task is cancelled (its socket died, the server stops ...).
        nursery.cancel_scope.cancel()

    # The broker answered the unsubscribe: it was not cut short by the cancel.
    assert backend.done == [("subscribe", "user.Bob"), ("unsubscribe", "user.Bob")]
    assert backend.held == set()
    assert not router.connections
    assert router.idle.is_set()


async def test_a_failed_subscribe_attaches_nothing_and_the_next_connection_subscribes_again() -> (
    None
):
    backend = RecordingBackend()
    backend.fail_subscribes = 1
    router = new_router(backend)

    with pytest.raises(SubscribeFailed):
        async with router.attached(connection("Bob")):
            pytest.fail("the block must not run when the subscribe failed")
    assert backend.calls == [("subscribe", "user.Bob")]  # and no unsubscribe of a key not held
    assert not router.connections
    assert router.idle.is_set()

    async with AsyncExitStack() as stack:
        await stack.enter_async_context(router.attached(connection("Bob")))
        assert backend.held == {"user.Bob"}
        assert len(router.connections) == 1
    assert backend.calls == [
        ("subscribe", "user.Bob"),
        ("subscribe", "user.Bob"),
        ("unsubscribe", "user.Bob"),
    ]
