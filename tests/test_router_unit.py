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
from triows.protocol import CLOSE_DRAINING, user_key
from triows.router import MARKER_USER_PREFIX, Router
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

    # Without sessions: subscribed keys' messages come on ``incoming``.
    sessions = None

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
        if key not in self.held:
            return Outcome.UNROUTED
        await self._send.send((key, body))  # handed back, as the broker would
        return Outcome.ROUTED

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


# Connections whose subscribe is still waiting for the broker when a drain begins.
ATTACHES_IN_FLIGHT = 16
USER_SUBSCRIBE_SECONDS = 5.0


class SlowUserSubscribes(RecordingBackend):
    """A user key's subscribe takes :data:`USER_SUBSCRIBE_SECONDS`; the drain's marker's
    (this instance's own key) is answered at once."""

    async def subscribe(self, key: str) -> None:
        if not key.startswith(user_key(MARKER_USER_PREFIX)):
            await trio.sleep(USER_SUBSCRIBE_SECONDS)
        await super().subscribe(key)


async def hold_until_closed(router: Router, held: Connection) -> None:
    """What a socket does: stay attached until the instance closes the connection."""
    async with router.attached(held):
        with trio.CancelScope() as reading:
            held.read_under(reading)  # closing the connection cancels this
            await trio.sleep_forever()


async def test_a_drain_releases_and_closes_every_connection_whose_subscribe_was_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = SlowUserSubscribes()
    router = new_router(backend)
    attaching = [connection(f"u{n}") for n in range(ATTACHES_IN_FLIGHT)]
    async with trio.open_nursery() as sockets:
        sockets.start_soon(router.run)  # hands the drain's marker back
        for held in attaching:
            sockets.start_soon(hold_until_closed, router, held)
        await trio.testing.wait_all_tasks_blocked()
        assert not router.connections  # every subscribe waits for the broker
        # The drain, as the app runs it: release, then close what is attached.
        await router.release_all(timeout=60)
        held_after_release = set(backend.held)
        for attached in router.connections:
            attached.close(CLOSE_DRAINING, "instance draining, reconnect")
        with trio.move_on_after(60):
            await router.idle.wait()
        # What the drain leaves: the broker still routing here, sockets open.
        held_after_drain = set(backend.held)
        still_open = [held.user for held in attaching if held.close_code is None]
        sockets.cancel_scope.cancel()
    assert (held_after_release, held_after_drain, still_open) == (set(), set(), [])
    assert all(held.close_code == CLOSE_DRAINING for held in attaching)


async def test_a_connection_attaching_once_drained_is_closed_without_a_subscribe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = RecordingBackend()
    router = new_router(backend)
    await router.release_all(timeout=60)
    calls_of_the_drain = list(backend.calls)
    late = connection("Late")
    with trio.fail_after(60):
        await hold_until_closed(router, late)
    assert late.close_code == CLOSE_DRAINING
    assert backend.calls == calls_of_the_drain
