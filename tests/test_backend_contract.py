"""The backend contract (triows.backend.Backend), written once, run on every backend/broker pair.

memory; amqp091 on RabbitMQ and GarageMQ; amqp10 on RabbitMQ; stomp on
RabbitMQ and ActiveMQ. Each test uses its own exchange, so runs sharing a
broker never see each other's messages. "Broker down" is shown to one backend
only, by closing the TCP proxy it connects through (tests/tcp_proxy.py) and
opening it again on the same port: the shared broker itself keeps running.
Per-backend files hold only what is specific to one protocol.
"""

from __future__ import annotations

import logging
import secrets
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing

from deploy.brokers import BROKERS, HOST, LOGIN, PASSCODE
from tests.brokers import require_broker
from tests.tcp_proxy import open_tcp_proxy
from triows.backend import (
    NOTE_KEY,
    Backend,
    BrokerUnavailable,
    Outcome,
    SessionDelivery,
    SessionQueue,
    Sessions,
    open_backend,
)
from triows.backends.broker_url import parse_broker_url
from triows.backends.supervisor import BrokerRejected, Supervised, rejection, run_supervised
from triows.cli import check_startup, main
from triows.process import free_port
from triows.settings import Settings, SettingsError

# Hang guards only; no test asserts on how long something took.
READY_TIMEOUT = 30
DELIVERY_TIMEOUT = 60


@dataclass(frozen=True)
class Case:
    """One backend on one broker."""

    backend: str
    broker: str | None = None  # tests/brokers.py's name; None: no broker (memory)
    port: int = 0
    url: str = ""  # with a {port} placeholder
    routes: bool = True  # publish tells ROUTED/UNROUTED (else always ACCEPTED)

    @property
    def id(self) -> str:
        return f"{self.backend}-{self.broker}" if self.broker else self.backend

    def settings(self, exchange: str, *, port: int | None = None, **overrides: object) -> Settings:
        values: dict[str, object] = {
            "backend": self.backend,
            "exchange": exchange,
            "instance_id": f"test-{secrets.token_hex(4)}",
            "reconnect_max_delay": 0.5,
            # The key contract (subscribe -> incoming); sessions have their own suite.
            "resume_window": 0,
        }
        if self.broker is not None:
            values["broker_url"] = self.url.format(port=self.port if port is None else port)
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    def outcome(self, held: bool) -> Outcome:
        if not self.routes:
            return Outcome.ACCEPTED
        return Outcome.ROUTED if held else Outcome.UNROUTED


def broker_case(name: str, *, routes: bool = True) -> Case:
    """The case of the broker table's ``name``; its URL keeps ``{port}`` for a proxy's."""
    broker = BROKERS[name]
    url = broker.url_format.format(login=LOGIN, passcode=PASSCODE, host=HOST, port="{port}")
    return Case(broker.backend, name, broker.port, url, routes=routes)


CASES = [
    Case("memory"),
    broker_case("rabbitmq"),
    broker_case("garagemq"),
    # RabbitMQ 3.x settles an unroutable AMQP 1.0 message "accepted".
    broker_case("rabbitmq-amqp10", routes=False),
    # STOMP cannot tell whether anyone holds a key.
    broker_case("rabbitmq-stomp", routes=False),
    broker_case("activemq", routes=False),
]
BROKER_CASES = [case for case in CASES if case.broker is not None]
# The backends (and brokers) that hold sessions (Backend.sessions).
SESSION_CASES = [
    Case("memory"),
    broker_case("rabbitmq"),
    broker_case("rabbitmq-amqp10", routes=False),
    broker_case("rabbitmq-stomp", routes=False),
]


@asynccontextmanager
async def open_ready(settings: Settings) -> AsyncIterator[Backend]:
    """Open the backend ``settings`` names and wait until it is ready."""
    async with open_backend(settings) as backend:
        with trio.fail_after(READY_TIMEOUT):
            await backend.wait_ready()
        yield backend


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
async def case(request: pytest.FixtureRequest) -> Case:
    chosen: Case = request.param
    if chosen.broker is not None:
        await require_broker(chosen.broker)
    return chosen


@pytest.fixture(params=BROKER_CASES, ids=[case.id for case in BROKER_CASES])
async def broker_case(request: pytest.FixtureRequest) -> Case:
    chosen: Case = request.param
    assert chosen.broker is not None
    await require_broker(chosen.broker)
    return chosen


@asynccontextmanager
async def sender_and_holder(
    case: Case, exchange: str, **overrides: object
) -> AsyncIterator[tuple[Backend, Backend]]:
    """Two instances on one exchange (one and the same for memory, which has no broker)."""
    async with AsyncExitStack() as stack:
        holder = await stack.enter_async_context(open_ready(case.settings(exchange, **overrides)))
        if case.broker is None:
            yield holder, holder
            return
        sender = await stack.enter_async_context(open_ready(case.settings(exchange)))
        yield sender, holder


async def receive(backend: Backend) -> tuple[str, bytes]:
    with trio.fail_after(DELIVERY_TIMEOUT):
        return await backend.incoming.receive()


async def wait_not_ready(backend: Backend) -> None:
    with trio.fail_after(READY_TIMEOUT):
        while backend.ready:  # noqa: ASYNC110 - the contract has no "not ready" event
            await trio.sleep(0.01)


# --- every backend -----------------------------------------------------------


async def test_a_subscribed_key_gets_each_published_body_verbatim(
    case: Case, exchange: str
) -> None:
    body = bytes(range(256)) + '{"é": "☃"}'.encode()
    async with sender_and_holder(case, exchange) as (sender, holder):
        await holder.subscribe("user.Bob")
        assert await sender.publish("user.Bob", body) == case.outcome(held=True)
        assert await receive(holder) == ("user.Bob", body)


async def test_a_key_nobody_holds_gets_nothing(case: Case, exchange: str) -> None:
    async with sender_and_holder(case, exchange) as (sender, holder):
        await holder.subscribe("user.Bob")
        assert await sender.publish("user.Nobody", b"lost") == case.outcome(held=False)
        await sender.publish("user.Bob", b"kept")
        assert await receive(holder) == ("user.Bob", b"kept")


async def test_many_keys_each_get_only_their_own_messages(case: Case, exchange: str) -> None:
    keys = [f"user.U{n}" for n in range(40)]
    async with sender_and_holder(case, exchange) as (sender, holder):
        for key in keys:
            await holder.subscribe(key)
        for key in keys:
            await sender.publish("user.Other", b"not held")
            assert await sender.publish(key, key.encode()) == case.outcome(held=True)
        received = [await receive(holder) for _ in keys]
        assert sorted(received) == sorted((key, key.encode()) for key in keys)


async def test_unsubscribe_stops_delivery_of_that_key_only(case: Case, exchange: str) -> None:
    async with sender_and_holder(case, exchange) as (sender, holder):
        await holder.subscribe("user.Anne")
        await holder.subscribe("user.Bob")
        await holder.unsubscribe("user.Anne")
        assert await sender.publish("user.Anne", b"gone") == case.outcome(held=False)
        await sender.publish("user.Bob", b"here")
        assert await receive(holder) == ("user.Bob", b"here")
        # Subscribing again after an unsubscribe works like the first time.
        await holder.subscribe("user.Anne")
        await sender.publish("user.Anne", b"back")
        assert await receive(holder) == ("user.Anne", b"back")


async def test_messages_of_one_sender_arrive_in_order_through_small_buffers(
    case: Case, exchange: str
) -> None:
    # Each publish waits for its confirm, which GarageMQ sends about 20 ms
    # late: fewer there, still many times the buffers below.
    count = 250 if case.broker == "garagemq" else 1000
    async with sender_and_holder(case, exchange, prefetch=8, incoming_queue=4) as (sender, holder):
        await holder.subscribe("user.Bob")
        received: list[bytes] = []

        async def receive_all() -> None:
            while len(received) < count:
                received.append((await receive(holder))[1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_all)
            for n in range(count):
                await sender.publish("user.Bob", b"%d" % n)
        assert received == [b"%d" % n for n in range(count)]


async def test_wait_ready_returns_once_ready_and_aclose_may_be_called_twice(
    case: Case, exchange: str
) -> None:
    async with open_backend(case.settings(exchange)) as backend:
        with trio.fail_after(READY_TIMEOUT):
            await backend.wait_ready()
        assert backend.ready
        await backend.subscribe("user.Bob")
        await backend.aclose()
        await backend.aclose()
        assert not backend.ready
        with pytest.raises(BrokerUnavailable):
            await backend.publish("user.Bob", b"after close")
    # ... and the context's own close on exit, a third one, is fine too.


# --- every broker backend -----------------------------------------------------


async def test_every_instance_holding_a_key_receives_each_message_once(
    broker_case: Case, exchange: str
) -> None:
    async with (
        open_ready(broker_case.settings(exchange)) as sender,
        open_ready(broker_case.settings(exchange)) as first,
        open_ready(broker_case.settings(exchange)) as second,
    ):
        await first.subscribe("user.Bob")
        await second.subscribe("user.Bob")
        await sender.publish("user.Bob", b"1")
        await sender.publish("user.Bob", b"2")
        for holder in (first, second):
            assert [await receive(holder), await receive(holder)] == [
                ("user.Bob", b"1"),
                ("user.Bob", b"2"),
            ]
        # Nothing more: a third message is the next each one gets.
        await sender.publish("user.Bob", b"3")
        assert await receive(first) == ("user.Bob", b"3")
        assert await receive(second) == ("user.Bob", b"3")


async def test_unavailable_while_the_broker_is_unreachable_then_ready_when_it_appears(
    broker_case: Case, exchange: str
) -> None:
    port = free_port()
    async with open_backend(broker_case.settings(exchange, port=port)) as holder:
        assert not holder.ready
        with pytest.raises(BrokerUnavailable):
            await holder.publish("user.Bob", b"{}")
        # Held while down, subscribed once connected.
        await holder.subscribe("user.Bob")
        async with (
            open_tcp_proxy(broker_case.port, port=port),
            open_ready(broker_case.settings(exchange)) as sender,
        ):
            with trio.fail_after(READY_TIMEOUT):
                await holder.wait_ready()
            assert await sender.publish("user.Bob", b"hello") == broker_case.outcome(held=True)
            assert await receive(holder) == ("user.Bob", b"hello")


async def test_a_reconnect_restores_exactly_the_held_keys(broker_case: Case, exchange: str) -> None:
    port = free_port()
    async with (
        open_ready(broker_case.settings(exchange)) as sender,
        open_backend(broker_case.settings(exchange, port=port)) as holder,
    ):
        async with open_tcp_proxy(broker_case.port, port=port):
            with trio.fail_after(READY_TIMEOUT):
                await holder.wait_ready()
            await holder.subscribe("user.Bob")
            await holder.subscribe("user.Gone")
        # The proxy is closed: the connection dropped and reconnects are refused.
        await wait_not_ready(holder)
        with pytest.raises(BrokerUnavailable):
            await holder.publish("user.Bob", b"{}")
        await holder.unsubscribe("user.Gone")
        await holder.subscribe("user.New")

        async with open_tcp_proxy(broker_case.port, port=port):
            with trio.fail_after(READY_TIMEOUT):
                await holder.wait_ready()
            assert await sender.publish("user.Gone", b"0") == broker_case.outcome(held=False)
            assert await sender.publish("user.Bob", b"1") == broker_case.outcome(held=True)
            assert await sender.publish("user.New", b"2") == broker_case.outcome(held=True)
            received = [await receive(holder), await receive(holder)]
            assert sorted(received) == [("user.Bob", b"1"), ("user.New", b"2")]


async def test_a_publish_once_every_node_of_the_list_is_lost_is_refused_not_held(
    broker_case: Case, exchange: str
) -> None:
    """Ready on the first node of its list, the backend loses it, and the other nodes
    refuse it: a publish meanwhile waits for the move only until every node was tried,
    then is refused, however long ``TRIOWS_PUBLISH_TIMEOUT`` is."""
    port = free_port()
    nodes = ",".join(broker_case.url.format(port=node) for node in (port, free_port(), free_port()))
    settings = broker_case.settings(exchange, broker_url=nodes, publish_timeout=3600.0)
    async with open_backend(settings) as holder:
        async with open_tcp_proxy(broker_case.port, port=port):
            with trio.fail_after(READY_TIMEOUT):
                await holder.wait_ready()
        # The proxy is closed: the connection dropped and every node refuses.
        await wait_not_ready(holder)
        with trio.fail_after(READY_TIMEOUT), pytest.raises(BrokerUnavailable):
            await holder.publish("user.Bob", b"{}")


# --- session queues (Backend.sessions) ------------------------------------------

SESSION_WINDOW = 30.0


@pytest.fixture(params=SESSION_CASES, ids=[case.id for case in SESSION_CASES])
async def session_case(request: pytest.FixtureRequest) -> Case:
    chosen: Case = request.param
    if chosen.broker is not None:
        await require_broker(chosen.broker)
    return chosen


class Collected:
    """What a session queue hands over, as its ``deliver`` callback sees it."""

    def __init__(self) -> None:
        self.deliveries: list[SessionDelivery] = []
        self._changed = trio.Event()

    def deliver(self, delivery: SessionDelivery) -> None:
        self.deliveries.append(delivery)
        self._changed.set()

    async def take(self, count: int) -> list[SessionDelivery]:
        """Wait until ``count`` more deliveries than taken before came; return those."""
        with trio.fail_after(DELIVERY_TIMEOUT):
            while len(self.deliveries) < count:
                self._changed = trio.Event()
                await self._changed.wait()
        taken, self.deliveries = self.deliveries[:count], self.deliveries[count:]
        return taken


def sessions_of(backend: Backend) -> Sessions:
    sessions = backend.sessions
    assert sessions is not None
    return sessions


async def open_queue(
    backend: Backend, name: str, collected: Collected, *, key: str = "user.Bob"
) -> SessionQueue:
    queue = await sessions_of(backend).open(name, key, collected.deliver, resume=False)
    assert queue is not None
    return queue


def bodies(deliveries: list[SessionDelivery]) -> list[tuple[str, bytes, bool]]:
    return [(d.key, d.body, d.redelivered) for d in deliveries]


@dataclass
class Pair:
    """Two instances with sessions on one exchange (one and the same for memory), and the
    name of a session that does not exist yet."""

    first: Backend
    second: Backend
    name: str

    async def open(self, collected: Collected, *, key: str = "user.Bob") -> SessionQueue:
        """A new session ``name`` on the first instance."""
        return await open_queue(self.first, self.name, collected, key=key)

    async def find(self, collected: Collected, *, name: str = "") -> SessionQueue | None:
        """Resume session ``name`` (or this pair's) on the second instance."""
        sessions = sessions_of(self.second)
        return await sessions.open(name or self.name, "user.Bob", collected.deliver, resume=True)

    async def resume(self, collected: Collected, *, name: str = "") -> SessionQueue:
        """The same, for a session that must still be there."""
        resumed = await self.find(collected, name=name)
        assert resumed is not None
        return resumed


@pytest.fixture
async def pair(session_case: Case, exchange: str) -> AsyncIterator[Pair]:
    settings = session_case.settings(exchange, resume_window=SESSION_WINDOW)
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(open_ready(settings))
        second = first
        if session_case.broker is not None:
            second = await stack.enter_async_context(open_ready(settings))
        yield Pair(first, second, session_name(exchange))


def session_name(exchange: str) -> str:
    return f"{exchange}.session.{secrets.token_hex(16)}"


async def test_a_session_queue_gets_the_messages_of_each_key_bound_in_order(pair: Pair) -> None:
    collected = Collected()
    queue = await pair.open(collected)
    await queue.bind("room.Lobby")
    await pair.second.publish("user.Bob", b"1")
    await pair.second.publish("room.Lobby", b"2")
    await pair.second.publish("user.Other", b"not bound")
    await pair.second.publish("user.Bob", b"3")
    got = await collected.take(3)
    assert bodies(got) == [
        ("user.Bob", b"1", False),
        ("room.Lobby", b"2", False),
        ("user.Bob", b"3", False),
    ]
    await queue.end()


async def test_an_unbound_key_is_no_longer_held(pair: Pair) -> None:
    collected = Collected()
    queue = await pair.open(collected)
    await queue.bind("room.Lobby")
    await queue.unbind("room.Lobby")
    await pair.second.publish("room.Lobby", b"left")
    await pair.second.publish("user.Bob", b"after")
    assert bodies(await collected.take(1)) == [("user.Bob", b"after", False)]
    await queue.end()


async def test_what_waited_while_nobody_consumed_is_counted_and_handed_over_on_resume(
    pair: Pair,
) -> None:
    queue = await pair.open(Collected())
    await queue.detach()
    for n in range(3):
        await pair.second.publish("user.Bob", b"%d" % n)
    collected = Collected()
    resumed = await pair.resume(collected)
    assert resumed.waiting == 3
    assert [d.body for d in await collected.take(3)] == [b"0", b"1", b"2"]
    await resumed.end()


async def test_deliveries_not_acked_come_back_in_order_flagged_to_a_resume_elsewhere(
    pair: Pair,
) -> None:
    collected = Collected()
    queue = await pair.open(collected)
    for n in range(4):
        await pair.second.publish("user.Bob", b"%d" % n)
    got = await collected.take(4)
    queue.ack(got[0].tag)
    await queue.detach()
    again = Collected()
    resumed = await pair.resume(again)
    assert bodies(await again.take(3)) == [
        ("user.Bob", b"1", True),
        ("user.Bob", b"2", True),
        ("user.Bob", b"3", True),
    ]
    await pair.second.publish("user.Bob", b"4")
    assert bodies(await again.take(1)) == [("user.Bob", b"4", False)]
    await resumed.end()


async def test_two_consumers_of_one_session_never_split_its_messages(pair: Pair) -> None:
    old, new = Collected(), Collected()
    first_queue = await pair.open(old)
    second_queue = await pair.resume(new)
    for n in range(3):
        await pair.first.publish("user.Bob", b"%d" % n)
    # One of them (the broker's single active consumer, or the newest
    # where the old one is taken over) gets all three, the other none.
    with trio.fail_after(DELIVERY_TIMEOUT):
        while len(old.deliveries) + len(new.deliveries) < 3:  # noqa: ASYNC110
            await trio.sleep(0.01)
    counts = sorted([len(old.deliveries), len(new.deliveries)])
    await first_queue.detach()
    await second_queue.end()
    assert counts == [0, 3]


async def test_release_gives_back_what_every_session_here_did_not_ack(pair: Pair) -> None:
    names = [f"{pair.name}.Anne", f"{pair.name}.Bob"]
    for name, user in zip(names, ("user.Anne", "user.Bob"), strict=True):
        collected = Collected()
        await open_queue(pair.first, name, collected, key=user)
        await pair.second.publish(user, user.encode())
        await collected.take(1)
    await sessions_of(pair.first).release()
    for name, user in zip(names, ("user.Anne", "user.Bob"), strict=True):
        again = Collected()
        resumed = await sessions_of(pair.second).open(name, user, again.deliver, resume=True)
        assert resumed is not None
        assert bodies(await again.take(1)) == [(user, user.encode(), True)]
        await resumed.end()


async def test_a_note_is_kept_in_the_queue_and_comes_back_on_the_note_key(pair: Pair) -> None:
    collected = Collected()
    queue = await pair.open(collected)
    await queue.note(b'{"rooms": ["Lobby"]}')
    (note,) = await collected.take(1)
    assert (note.key, note.body) == (NOTE_KEY, b'{"rooms": ["Lobby"]}')
    await queue.detach()  # the note left unacked
    again = Collected()
    resumed = await pair.resume(again)
    assert bodies(await again.take(1)) == [(NOTE_KEY, b'{"rooms": ["Lobby"]}', True)]
    await resumed.end()


async def test_end_deletes_the_queue_and_a_resume_then_finds_none(
    pair: Pair, session_case: Case
) -> None:
    queue = await pair.open(Collected())
    await pair.second.publish("user.Bob", b"never read")
    await queue.end()
    await queue.end()  # idempotent
    assert await pair.find(Collected()) is None
    # Nothing holds Bob's messages any more.
    assert await pair.second.publish("user.Bob", b"nobody") in (
        Outcome.UNROUTED,
        session_case.outcome(held=False),
    )


async def test_a_resume_of_a_session_that_never_was_finds_none(pair: Pair) -> None:
    assert await pair.find(Collected()) is None


async def test_a_queue_nobody_consumed_for_the_window_is_gone(
    session_case: Case, exchange: str
) -> None:
    window = 1.0
    settings = session_case.settings(exchange, resume_window=window)
    async with open_ready(settings) as backend:
        name = session_name(exchange)
        queue = await open_queue(backend, name, Collected())
        await queue.detach()
        # Well past the window: the broker's expiry (memory: checked at the next open).
        await trio.sleep(3 * window)
        assert (
            await sessions_of(backend).open(name, "user.Bob", Collected().deliver, resume=True)
            is None
        )


@pytest.mark.parametrize(
    "case",
    [case for case in SESSION_CASES if case.backend in ("amqp10", "stomp")],
    ids=[case.id for case in SESSION_CASES if case.backend in ("amqp10", "stomp")],
)
async def test_past_its_bound_a_rabbitmq_session_queue_drops_its_oldest_and_senders_carry_on(
    case: Case, exchange: str
) -> None:
    # RabbitMQ 3.x's STOMP and AMQP 1.0 plugins drop the publisher's whole
    # connection on the nack of a reject-publish queue: these backends bound
    # session queues with drop-head instead (backends/stomp_sessions.py).
    await require_broker(case.broker or "")
    settings = case.settings(exchange, resume_window=SESSION_WINDOW, session_max_messages=3)
    async with open_ready(settings) as sender, open_ready(settings) as holder:
        name = session_name(exchange)
        queue = await open_queue(holder, name, Collected())
        await queue.detach()
        for n in range(5):
            assert await sender.publish("user.Bob", b"%d" % n) == Outcome.ACCEPTED
        assert sender.ready
        collected = Collected()
        resumed = await sessions_of(holder).open(name, "user.Bob", collected.deliver, resume=True)
        assert resumed is not None
        assert [d.body for d in await collected.take(3)] == [b"2", b"3", b"4"]
        await resumed.end()


# --- start-up checks and the supervisor's error classes (no broker) ------------


@pytest.mark.parametrize(
    ("backend", "url"),
    [
        ("amqp091", "stomp://127.0.0.1"),
        ("amqp091", "amqp://127.0.0.1:notaport/"),
        ("amqp10", "http://127.0.0.1"),
        ("stomp", "amqp://127.0.0.1"),
        ("stomp", "stomp://127.0.0.1/?amqp_port=x"),
    ],
)
def test_a_malformed_broker_url_fails_the_start_up_check_with_one_line(
    backend: str, url: str
) -> None:
    settings = Settings(backend=backend, broker_url=url, bind=("127.0.0.1:8000",))
    with pytest.raises(SettingsError, match="TRIOWS_BROKER_URL") as failure:
        check_startup(settings)
    assert "\n" not in str(failure.value)


@pytest.mark.parametrize(
    ("backend", "urls", "named"),
    [
        (
            "amqp091",
            "amqp://127.0.0.1:5701/,amqp://127.0.0.1:notaport/",
            "'amqp://127.0.0.1:notaport/'",
        ),
        ("amqp091", "amqp://127.0.0.1:5701/,stomp://127.0.0.1:61702", "'stomp://127.0.0.1:61702'"),
        ("amqp10", "amqp://127.0.0.1:5701,http://127.0.0.1:5702", "'http://127.0.0.1:5702'"),
        (
            "stomp",
            "stomp://127.0.0.1:61701,stomp://127.0.0.1:61702/?amqp_port=x",
            "'stomp://127.0.0.1:61702' has an invalid amqp_port",
        ),
        ("stomp", "stomp://127.0.0.1:61701,,stomp://127.0.0.1:61703", "an empty entry"),
        (
            "amqp10",
            "amqps://127.0.0.1:5711,amqps://127.0.0.1:5712?cafile=/no/such/ca.pem",
            "'amqps://127.0.0.1:5712': cannot read its cafile",
        ),
    ],
)
def test_a_bad_url_in_a_broker_url_list_fails_the_start_up_with_one_line_naming_it(
    backend: str, urls: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", "--backend", backend, "--broker-url", urls]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("triows: error: TRIOWS_BROKER_URL")
    assert named in error


async def test_each_lost_or_refused_node_sends_the_next_attempt_to_the_next_node_of_the_list(
    autojump_clock: trio.testing.MockClock,
) -> None:
    nodes = ["scripted://127.0.0.1", "scripted://127.0.0.2", "scripted://127.0.0.3"]
    backend = ScriptedBackend(
        [
            ConnectionRefusedError("node 1 down"),
            BrokerRejected("tls", "node 2 certificate refused"),
            ConnectionResetError("node 3 reset"),
        ],
        nodes=nodes,
    )
    await backend.subscribe("user.Bob")
    async with run_supervised(backend):
        with trio.fail_after(READY_TIMEOUT):
            await backend.wait_ready()
    # Round the list, back to node 1, where the held key was restored.
    assert backend.nodes_tried == ["127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.1"]
    assert backend.restored == [["user.Bob"]]


def test_triows_serve_with_a_malformed_broker_url_exits_with_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["serve", "--backend", "amqp10", "--broker-url", "stomp://127.0.0.1"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert error.startswith("triows: error: TRIOWS_BROKER_URL")


def test_broker_timeout_is_its_own_setting_and_publish_timeout_the_confirms_only() -> None:
    settings = Settings.from_env({"TRIOWS_BROKER_TIMEOUT": "3", "TRIOWS_PUBLISH_TIMEOUT": "7"})
    assert (settings.broker_timeout, settings.publish_timeout) == (3, 7)
    assert settings.deprecations == []
    assert Settings().broker_timeout == Settings().publish_timeout == 10


def test_publish_timeout_alone_keeps_its_old_meaning_for_one_release_with_a_notice() -> None:
    settings = Settings.from_env({"TRIOWS_PUBLISH_TIMEOUT": "4"})
    assert settings.broker_timeout == 4
    assert len(settings.deprecations) == 1
    assert "TRIOWS_BROKER_TIMEOUT" in settings.deprecations[0]


def test_tls_verification_and_refusals_are_permanent_losses_are_not() -> None:
    verification = ssl.SSLCertVerificationError(1, "certificate verify failed")
    wrapped = ConnectionError("handshake failed")
    wrapped.__cause__ = verification
    assert rejection(verification) is not None
    assert rejection(wrapped) is not None
    assert rejection(BrokerRejected("authentication", "no")) is not None
    for transient in (ConnectionRefusedError(), OSError("All connection attempts failed")):
        assert rejection(transient) is None


def test_an_exception_chain_that_loops_is_classified_not_walked_forever() -> None:
    # Seen on a GarageMQ restart: the instance spun at full CPU in rejection().
    first, second = ConnectionError("reset"), OSError("closed")
    first.__context__, second.__context__ = second, first
    assert rejection(first) is None


class ScriptedBackend(Supervised[str]):
    """A protocol whose sessions fail as scripted: one error per connection attempt."""

    def __init__(
        self,
        failures: list[BaseException],
        settings: Settings | None = None,
        nodes: list[str] | None = None,
    ) -> None:
        settings = settings or Settings(backend="scripted", reconnect_max_delay=0.01)
        urls = nodes or ["scripted://127.0.0.1"]
        super().__init__(
            settings, [parse_broker_url(url, {"scripted": (1, False)}) for url in urls]
        )
        self.failures = failures
        self.attempts = 0
        self.nodes_tried: list[str] = []  # the node of each connection attempt
        self.done = trio.Event()
        self.slow_changes = False  # subscribe/unsubscribe never get an answer
        self.abandoned: list[str] = []
        # A subscribe of a key listed here waits until its event is set.
        self.held_back: dict[str, trio.Event] = {}
        self.restore_started = trio.Event()
        self.restore_may_end = trio.Event()
        self.restore_may_end.set()
        self.restored: list[list[str]] = []
        self.changed: list[str] = []  # "+key"/"-key", in the order the broker saw them

    async def _session(self, up: Callable[[str], Awaitable[None]]) -> None:
        self.attempts += 1
        self.nodes_tried.append(self._address.host)
        if self.failures:
            raise self.failures.pop(0)
        self.done.set()
        await up("connection")
        await trio.sleep_forever()

    async def _restore(self, connection: str, keys: list[str]) -> None:
        self.restore_started.set()
        await self.restore_may_end.wait()
        self.restored.append(keys)

    async def _subscribe_on(self, connection: str, key: str) -> None:
        if self.slow_changes:
            await trio.sleep_forever()
        if key in self.held_back:
            await self.held_back[key].wait()
        self.changed.append(f"+{key}")

    async def _unsubscribe_on(self, connection: str, key: str) -> None:
        if self.slow_changes:
            await trio.sleep_forever()
        self.changed.append(f"-{key}")

    async def _publish_on(self, connection: str, key: str, body: bytes) -> Outcome:
        return Outcome.ACCEPTED

    def _abandon(self, connection: str) -> None:
        self.abandoned.append(connection)

    async def _close(self, connection: str) -> None:
        return


class EventNames(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.names.append(record.getMessage())


async def test_a_permanent_failure_is_reported_once_and_retried_until_it_goes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    refused = BrokerRejected("authentication", "login refused", user="guest")
    backend = ScriptedBackend([refused, refused, refused, ConnectionRefusedError("down")])
    handler = EventNames()
    logging.getLogger("triows").addHandler(handler)
    try:
        async with run_supervised(backend):
            with trio.fail_after(READY_TIMEOUT):
                await backend.wait_ready()
    finally:
        logging.getLogger("triows").removeHandler(handler)
    events = handler.names
    assert events.count("broker_rejected") == 1
    assert events.count("broker_unavailable") == 1
    assert backend.attempts == 5


async def test_an_unexpected_error_in_a_session_ends_the_backend_and_so_the_instance(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = ScriptedBackend([ConnectionRefusedError("down"), ValueError("a bug")])
    with pytest.raises(BaseExceptionGroup) as raised:
        async with run_supervised(backend):
            await trio.sleep_forever()
    assert raised.group_contains(ValueError, match="a bug")


async def test_an_unsubscribe_cut_short_drops_the_connection_a_subscribe_does_not(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The broker may hold a binding the backend has forgotten: only the
    # reconnect's restore of exactly the held keys settles it.
    backend = ScriptedBackend([])
    async with run_supervised(backend):
        await backend.wait_ready()
        await backend.subscribe("user.Bob")
        await backend.unsubscribe("user.Bob")
        assert backend.abandoned == []
        backend.slow_changes = True
        with trio.move_on_after(1):
            await backend.subscribe("user.Anne")
        assert backend.abandoned == []  # held; the next change or connection settles it
        with trio.move_on_after(1):
            await backend.unsubscribe("user.Anne")
        assert backend.abandoned == ["connection"]


async def test_a_subscribe_waiting_for_the_broker_does_not_hold_up_other_keys() -> None:
    # One user's slow or churning subscription must not delay everyone's
    # connects and joins: only the changes of one key wait for each other.
    backend = ScriptedBackend([])
    async with run_supervised(backend):
        await backend.wait_ready()
        backend.held_back["user.Anne"] = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(backend.subscribe, "user.Anne")
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(READY_TIMEOUT):
                await backend.subscribe("user.Bob")
                await backend.unsubscribe("room.lobby")
            assert backend.changed == ["+user.Bob", "-room.lobby"]
            backend.held_back["user.Anne"].set()
        assert backend.changed[-1] == "+user.Anne"


async def test_changes_wait_for_a_restore_and_a_restore_for_changes_in_flight() -> None:
    # A restore reads the held keys and restores them on the new connection;
    # a change in between could be undone by it (an unsubscribe followed by
    # the restore's subscribe of the same key).
    backend = ScriptedBackend([ConnectionRefusedError("down")])
    backend.restore_may_end = trio.Event()
    await backend.subscribe("user.Anne")  # held before any connection
    async with run_supervised(backend), trio.open_nursery() as nursery:
        with trio.fail_after(READY_TIMEOUT):
            await backend.restore_started.wait()
        nursery.start_soon(backend.unsubscribe, "user.Anne")
        await trio.testing.wait_all_tasks_blocked()
        assert backend.changed == []  # waits for the restore
        backend.restore_may_end.set()
        with trio.fail_after(READY_TIMEOUT):
            await backend.wait_ready()
    assert backend.restored == [["user.Anne"]]
    assert backend.changed == ["-user.Anne"]


async def test_publish_timeout_set_alone_is_logged_as_deprecated_when_a_backend_opens() -> None:
    handler = EventNames()
    logging.getLogger("triows").addHandler(handler)
    try:
        ScriptedBackend([])  # the default settings: nothing to say
        assert "setting_deprecated" not in handler.names
        ScriptedBackend([], Settings.from_env({"TRIOWS_PUBLISH_TIMEOUT": "4"}))
    finally:
        logging.getLogger("triows").removeHandler(handler)
    assert handler.names.count("setting_deprecated") == 1
