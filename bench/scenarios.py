"""The scenarios, each selectable by name: direct, direct-ws, latency, idle, ceiling,
batch, scaleout, room, room-churn, presence.

One target (backend on broker) at a time: ``direct``, ``direct-ws``,
``latency``, ``batch`` and ``room`` share one pair of instances A and B
(fresh users each); ``idle`` gets a fresh instance of its own so that its
memory figure starts clean; ``ceiling`` opens two backends inside the load
generator, with no HTTP or WebSocket layer at all; ``scaleout`` starts
2, 4, 6 instances of its own, ``presence`` 2 and 6 (``bench/presence.py``).
Any failure becomes an error row, never a missing one; a scenario that does
not apply to a target (the memory backend across instances, triows-only
scenarios on the peer) is an ``n/a`` row.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import psutil
import trio
from prometheus_client.parser import text_string_to_metric_families

from bench.broker_memory import rabbitmq_memory, session_queues
from bench.cpu import CpuMeter, CpuWindow
from bench.peer import open_socketio, serve_peer
from bench.presence import Population, QueryTally, cpu_ms_per_query, holding_users, query_stream
from bench.tally import Tally
from bench.targets import (
    PEER_SCENARIOS,
    BrokerNotRunning,
    Target,
    broker_processes,
    ensure_broker,
    holding_broker,
    rotated_urls,
)
from bench.traffic import (
    OpenReceiver,
    Recorder,
    Schedule,
    WebSocketSender,
    batch_stream,
    post_stream,
    receive_into,
    room_stream,
    websocket_stream,
)
from deploy.brokers import RABBITMQ_CLUSTER_NODES
from triows.backend import Backend, Outcome, open_backend
from triows.client import SendConnection, open_events, open_send_connection
from triows.process import Instance, serve_instance
from triows.settings import Settings

SCENARIOS = (
    "direct",
    "direct-ws",
    "latency",
    "idle",
    "ceiling",
    "batch",
    "scaleout",
    "room",
    "room-churn",
    "presence",
)
# --matrix: batch needs a server that takes batches, scaleout is a run of its own.
MATRIX_SCENARIOS = ("direct", "direct-ws", "latency", "idle", "ceiling")
TRAFFIC_SCENARIOS = ("direct", "direct-ws", "latency", "batch", "room", "room-churn")

# Hang guards, not measurements.
SCENARIO_TIMEOUT = 180.0
READY_TIMEOUT = 30.0
READY_POLL = 0.05
# The drain after the last send: a message still missing this long after the
# last arrival is lost.
DRAIN_IDLE_TIMEOUT = 5.0
# Instance B's per-connection outbound queue: a backlog in the load generator's
# receivers must not turn into slow-consumer closes, which are not what is measured.
RECEIVER_SEND_QUEUE = 1_000_000
# Concurrent WebSocket handshakes while opening the idle connections.
IDLE_CONNECT_CONCURRENCY = 64
# room-churn: users joining and leaving the room (one on A, one on B), each at this pace.
CHURNERS = 2
CHURN_CYCLES_PER_S = 10.0
# presence: opening thousands of users takes minutes, not the traffic scenarios' 180 s.
PRESENCE_TIMEOUT = 1200.0
# presence: the bench's queries all come from one dev-mode caller, whose pace
# (TRIOWS_PRESENCE_RATE, 5 a second per user) would otherwise answer most with 429.
PRESENCE_UNPACED = "1000000"
PRESENCE_BROKER_TIMEOUT = "60"


@dataclass(frozen=True)
class Options:
    """How long and how hard each scenario runs (``--quick``: briefly, to prove it works)."""

    quick: bool = False
    duration: float = 10.0
    warmup: float = 1.0
    concurrency: int = 16
    receivers: int = 8
    ws_window: int = 1
    latency_share: float = 0.20
    latency_rate: float = 100.0  # msg/s when no direct figure of the same target exists
    idle_connections: int = 5000
    idle_window: float = 5.0
    batch_size: int = 100
    scaleout_instances: tuple[int, ...] = (2, 4, 6)
    presence_instances: tuple[int, ...] = (2, 6)
    presence_users: int = 10_000
    presence_room_size: int = 100
    presence_query_rate: float = 200.0
    presence_holders: int = 4

    @classmethod
    def quick_options(cls) -> Options:
        return cls(
            quick=True,
            duration=0.5,
            warmup=0.2,
            idle_connections=100,
            idle_window=0.5,
            scaleout_instances=(2, 3),
            presence_instances=(2,),
            presence_users=200,
            presence_room_size=20,
            presence_query_rate=50.0,
            presence_holders=1,
        )


def _row(target: Target, scenario: str, **figures: Any) -> dict[str, Any]:
    return {
        "target": target.name,
        "backend": target.backend,
        "broker": target.family,
        "scenario": scenario,
        **figures,
    }


def error_row(target: Target, scenario: str, error: str) -> dict[str, Any]:
    return _row(target, scenario, status="error", error=error)


def not_applicable_row(target: Target, scenario: str, reason: str) -> dict[str, Any]:
    return _row(target, scenario, status="n/a", error=reason)


def _open_receiver(target: Target) -> OpenReceiver:
    return open_socketio if target.server == "peer" else open_events


def _cpu_figures(window: CpuWindow, delivered: int) -> dict[str, Any]:
    return {
        "cpu_seconds": {role: _round(spent) for role, spent in window.seconds.items()},
        "cpu_per_1000": {
            role: _round(spent) for role, spent in window.per_thousand(delivered).items()
        },
        "loadgen_cpu_share": round(window.loadgen_share, 3),
        # Cores' worth of CPU that processes outside this run used meanwhile.
        "other_cpu_cores": round(window.other / window.wall, 2) if window.wall else None,
        "loadgen_saturated": window.loadgen_saturated,
    }


def _server_figures(window: CpuWindow, delivered: int) -> dict[str, Any]:
    """Each instance's CPU (% of one core) and all instances' CPU per delivered message."""
    instances = {
        role: spent
        for role, spent in window.seconds.items()
        if role.startswith("instance_") and spent is not None
    }
    total = sum(instances.values())
    return {
        "instance_cpu_percent": {
            role: round(100 * spent / window.wall, 1) if window.wall else None
            for role, spent in instances.items()
        },
        "server_cpu_ms_per_message": round(1000 * total / delivered, 4) if delivered else None,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _instance_env(exchange: str, **extra: str) -> dict[str, str]:
    return {"TRIOWS_EXCHANGE": exchange, **extra}


@asynccontextmanager
async def _instances(
    target: Target, exchange: str, count: int, **env: str
) -> AsyncIterator[list[Instance]]:
    """Start ``count`` ready instances of ``target`` (one after the other if it must)."""
    async with AsyncExitStack() as stack:
        instances: list[Instance] = []
        for index in range(count):
            # On a cluster, instance i starts on node i (round the list).
            broker_url = rotated_urls(target.broker_url, index)
            serving = (
                serve_peer(broker_url=broker_url, channel=exchange)
                if target.server == "peer"
                else serve_instance(
                    target.backend,
                    broker_url=broker_url or None,
                    env=_instance_env(exchange, **dict(target.env), **env),
                )
            )
            instance = await stack.enter_async_context(serving)
            if target.fragile:
                await instance.wait_ready(READY_TIMEOUT)
            instances.append(instance)
        for instance in instances:
            await instance.wait_ready(READY_TIMEOUT)
        yield instances


class Pair:
    """Instances A (senders) and B (receivers); the memory backend has one for both.

    ``idle``: more instances of the same cluster that hold no users (``scaleout``);
    their CPU roles are ``instance_c``, ``instance_d``, ...
    """

    def __init__(
        self, target: Target, a: Instance, b: Instance, idle: Sequence[Instance] = ()
    ) -> None:
        self.target = target
        self.a = a
        self.b = b
        self.idle = list(idle)

    @property
    def instance_count(self) -> int:
        return (1 if self.a is self.b else 2) + len(self.idle)

    def meter(self) -> CpuMeter:
        roles: dict[str, list[psutil.Process]] = {
            "instance_a": [psutil.Process(self.a.process.pid)],
            "instance_b": [] if self.a is self.b else [psutil.Process(self.b.process.pid)],
            "broker": broker_processes(self.target),
        }
        for index, instance in enumerate(self.idle):
            roles[f"instance_{chr(ord('c') + index)}"] = [psutil.Process(instance.process.pid)]
        return CpuMeter(roles)


@asynccontextmanager
async def open_pair(target: Target, exchange: str) -> AsyncIterator[Pair]:
    count = 1 if target.single_instance else 2
    # Only B's queue is raised: A holds no receivers.
    async with _instances(target, exchange, count, TRIOWS_SEND_QUEUE=str(RECEIVER_SEND_QUEUE)) as (
        instances
    ):
        yield Pair(target, instances[0], instances[-1])


async def run_traffic(
    pair: Pair, scenario: str, options: Options, rate: float | None
) -> dict[str, Any]:
    """``direct``, ``direct-ws`` or (with ``rate``) ``latency`` on a running pair."""
    tag = secrets.token_hex(3)
    receivers = [f"r{index}-{tag}" for index in range(options.receivers)]
    recorder = Recorder()
    opener = _open_receiver(pair.target)
    async with trio.open_nursery() as receiving, AsyncExitStack() as senders:
        for index, user in enumerate(receivers):
            await receiving.start(receive_into, pair.b.base_url, index, user, recorder, opener)
        clients: list[WebSocketSender] = []
        connections: list[SendConnection] = []
        batches: list[SendConnection] = []
        for stream in range(options.concurrency):
            if scenario == "direct-ws":
                user = f"sender{stream}-{tag}"
                # triows' own /events, or the peer's socket.io client (its `send` event).
                opening = opener(pair.a.base_url, user=user)
                clients.append(await senders.enter_async_context(opening))
            elif scenario == "batch":
                opened_batch = open_send_connection(pair.a.base_url)
                batches.append(await senders.enter_async_context(opened_batch))
            else:
                opened = open_send_connection(pair.a.base_url)
                connections.append(await senders.enter_async_context(opened))

        async def phase(duration: float, phase_rate: float | None) -> Tally:
            recorder.tally = tally = Tally()
            schedule = Schedule(duration, phase_rate)
            async with trio.open_nursery() as sending:
                for stream in range(options.concurrency):
                    if scenario == "direct-ws":
                        sending.start_soon(
                            websocket_stream,
                            clients[stream],
                            stream,
                            receivers,
                            tally,
                            schedule,
                            options.ws_window,
                        )
                    elif scenario == "batch":
                        sending.start_soon(
                            batch_stream,
                            batches[stream],
                            stream,
                            receivers,
                            tally,
                            schedule,
                            options.batch_size,
                        )
                    else:
                        sending.start_soon(
                            post_stream, connections[stream], stream, receivers, tally, schedule
                        )
            await tally.drain(DRAIN_IDLE_TIMEOUT)
            return tally

        # Warm-up: connections pooled, code paths hot; its figures are dropped.
        await phase(options.warmup, rate)
        meter = pair.meter()
        meter.start()
        tally = await phase(options.duration, rate)
        window = meter.stop()
        receiving.cancel_scope.cancel()
    summary = tally.summary()
    if scenario == "batch" and summary["failed_sends"] and not summary["delivered"]:
        reasons = "; ".join(sorted(summary["failed_sends"]))
        return error_row(pair.target, scenario, f"no batch was taken: {reasons}")
    figures: dict[str, Any] = {
        "status": "ok",
        **summary,
        **_cpu_figures(window, summary["delivered"]),
        "params": {
            "duration": options.duration,
            "concurrency": options.concurrency,
            "receivers": options.receivers,
            "instances": pair.instance_count,
        },
        **_server_figures(window, summary["delivered"]),
    }
    if rate is not None:
        figures["params"]["rate"] = round(rate, 1)
    if scenario == "direct-ws":
        figures["params"]["ws_window"] = options.ws_window
    if scenario == "batch":
        figures["params"]["batch_size"] = options.batch_size
    return _row(pair.target, scenario, **figures)


async def churn_room(
    base_url: str,
    user: str,
    room: str,
    cycles: list[int],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``user`` (who gets presence events) joins ``room`` and leaves it again,
    ``CHURN_CYCLES_PER_S`` times a second, until cancelled; ``cycles[0]`` counts."""
    async with open_events(base_url, user=user, presence=True) as client:
        task_status.started()
        schedule = Schedule(float("inf"), CHURN_CYCLES_PER_S)
        while await schedule.next_send():
            for action, answer in (("join", "joined"), ("leave", "left")):
                await (client.join if action == "join" else client.leave)(room, ref=action)
                while (frame := await client.receive()).get("ref") != action:
                    pass  # the room's messages and presence events meanwhile
                if frame["type"] != answer:
                    raise RuntimeError(f"{user} could not {action} {room}: {frame}")
            cycles[0] += 1


async def presence_outcomes(pair: Pair) -> dict[str, float]:
    """``triows_presence_events`` by outcome, summed over the pair's instances (``/metrics``)."""
    totals: dict[str, float] = {}
    for instance in [pair.a] if pair.a is pair.b else [pair.a, pair.b]:
        async with open_send_connection(instance.base_url) as connection:
            _, body = await connection.get("/metrics")
        for family in text_string_to_metric_families(body.decode()):
            if family.name != "triows_presence_events":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    outcome = sample.labels["outcome"]
                    totals[outcome] = totals.get(outcome, 0.0) + sample.value
    return totals


async def run_room(pair: Pair, options: Options, *, churn: bool = False) -> dict[str, Any]:
    """One sender ``POST``ing to a room on A whose members are spread over A and B (half each).

    Each message must reach every member once, in the sender's order; the
    figures are deliveries per second (one per member) and the fan-out latency
    (send to the last member's arrival). ``churn`` (``room-churn``): the
    members ask for presence events (``?presence=1``) and ``CHURNERS`` more
    users (one on A, one on B) join and leave the room meanwhile.
    """
    tag = secrets.token_hex(3)
    room = f"bench-{tag}"
    members = options.receivers
    recorder = Recorder()
    opener = partial(open_events, presence=True) if churn else open_events
    cycles = [0]
    async with trio.open_nursery() as receiving:
        for index in range(members):
            instance = pair.a if index % 2 else pair.b
            await receiving.start(
                partial(
                    receive_into,
                    instance.base_url,
                    index,
                    f"m{index}-{tag}",
                    recorder,
                    opener,
                    room=room,
                )
            )
        for index in range(CHURNERS if churn else 0):
            instance = pair.a if index % 2 else pair.b
            await receiving.start(churn_room, instance.base_url, f"c{index}-{tag}", room, cycles)

        async def phase(duration: float) -> Tally:
            recorder.tally = tally = Tally(fanout=members)
            await room_stream(pair.a.base_url, 0, room, tally, Schedule(duration))
            await tally.drain(DRAIN_IDLE_TIMEOUT)
            return tally

        await phase(options.warmup)
        meter = pair.meter()
        meter.start()
        cycles_before, events_before = cycles[0], recorder.presence_events
        tally = await phase(options.duration)
        window = meter.stop()
        churned, events = cycles[0] - cycles_before, recorder.presence_events - events_before
        outcomes = await presence_outcomes(pair) if churn else {}
        receiving.cancel_scope.cancel()
    summary = tally.summary()
    figures: dict[str, Any] = {
        "status": "ok",
        **summary,
        **_cpu_figures(window, summary["delivered"]),
        "params": {
            "duration": options.duration,
            "senders": 1,
            "members": members,
            "instances": pair.instance_count,
        },
        **_server_figures(window, summary["delivered"]),
    }
    if churn:
        figures["params"]["churners"] = CHURNERS
        figures["churn_cycles_per_s"] = round(churned / window.wall, 1)
        # Presence frames the members got in the measured window (none with events off).
        figures["presence_events"] = events
        # What the instances did with each join/leave edge, over the whole run (warm-up too).
        figures["presence_outcomes"] = outcomes
        figures["server_cpu_cores"] = round(
            sum(spent for role, spent in window.seconds.items() if role.startswith("instance_"))
            / window.wall,
            3,
        )
    return _row(pair.target, "room-churn" if churn else "room", **figures)


async def run_idle(target: Target, exchange: str, options: Options) -> dict[str, Any]:
    """N idle WebSockets (distinct users) on one fresh instance: RSS per connection, idle CPU."""
    count = options.idle_connections
    tag = secrets.token_hex(3)
    opener = _open_receiver(target)
    on_rabbitmq = target.family in ("rabbitmq", "rabbitmq-cluster")
    # A cluster's memory is its three nodes' together; its queues, as node 1 lists them.
    nodes = RABBITMQ_CLUSTER_NODES if target.family == "rabbitmq-cluster" else (None,)
    async with _instances(target, exchange, 1) as (instance,):
        server = psutil.Process(instance.process.pid)
        rss_before = server.memory_info().rss
        broker_before = await rabbitmq_memory(nodes) if on_rabbitmq else None
        connected = 0
        all_connected = trio.Event()
        handshakes = trio.Semaphore(IDLE_CONNECT_CONCURRENCY)

        async def hold(index: int) -> None:
            nonlocal connected
            await handshakes.acquire()
            released = False
            try:
                async with opener(instance.base_url, user=f"idle{index}-{tag}"):
                    handshakes.release()
                    released = True
                    connected += 1
                    if connected == count:
                        all_connected.set()
                    await trio.sleep_forever()
            finally:
                if not released:
                    handshakes.release()

        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            for index in range(count):
                nursery.start_soon(hold, index)
            await all_connected.wait()
            connect_seconds = trio.current_time() - started
            meter = CpuMeter({"instance_a": [server], "broker": broker_processes(target)})
            meter.start()
            await trio.sleep(options.idle_window)
            window = meter.stop()
            rss_after = server.memory_info().rss
            broker_after = await rabbitmq_memory(nodes) if on_rabbitmq else None
            queues = await session_queues(exchange, nodes[0]) if on_rabbitmq else None
            # Measured; now the fastest way down. A graceful close of thousands of
            # sockets (each one a broker unsubscribe) takes minutes on amqp10.
            # GarageMQ hangs when a consuming connection just drops: SIGTERM it.
            if target.fragile:
                instance.terminate()
            else:
                instance.process.kill()
            nursery.cancel_scope.cancel()
    instance_cpu = window.seconds["instance_a"] or 0.0
    broker_cpu = window.seconds.get("broker")
    return _row(
        target,
        "idle",
        status="ok",
        connections=count,
        connect_per_s=round(count / connect_seconds, 1),
        rss_before_mib=round(rss_before / 2**20, 1),
        rss_after_mib=round(rss_after / 2**20, 1),
        rss_kib_per_connection=round((rss_after - rss_before) / 1024 / count, 2),
        idle_cpu_percent=round(100 * instance_cpu / window.wall, 2),
        broker_idle_cpu_percent=(
            None
            if broker_cpu is None or not target.broker
            else round(100 * broker_cpu / window.wall, 2)
        ),
        # The broker's memory (erlang:memory(total)) grown per idle connection, and the
        # run's session queues it held then (RabbitMQ only; the node is shared).
        broker_kib_per_connection=(
            None
            if broker_before is None or broker_after is None
            else round((broker_after - broker_before) / 1024 / count, 2)
        ),
        broker_memory_mib=(
            None
            if broker_before is None or broker_after is None
            else [round(broker_before / 2**20, 1), round(broker_after / 2**20, 1)]
        ),
        session_queues=None if queues is None else queues[0],
        # What the node's list_queues says each session queue's process uses.
        broker_queue_kib_per_session=(
            None if not queues or not queues[0] else round(queues[1] / 1024 / queues[0], 2)
        ),
        params={"connections": count, "idle_window": options.idle_window},
    )


async def _wait_ready(backend: Backend) -> None:
    # The backend contract has no readiness event; readiness is a property.
    with trio.fail_after(READY_TIMEOUT):
        while not backend.ready:  # noqa: ASYNC110
            await trio.sleep(READY_POLL)


async def run_ceiling(target: Target, exchange: str, options: Options) -> dict[str, Any]:
    """The broker round trip through the backend alone: publish on one connection, consume on
    another, inside the load generator, with no HTTP or WebSocket layer."""
    tag = secrets.token_hex(3)
    settings = Settings(
        backend=target.backend,
        broker_url=target.broker_url,
        exchange=exchange,
        instance_id=f"bench-ceiling-pub-{tag}",
        log_level="WARNING",
        # The backend's key contract (subscribe, then incoming): no session queues.
        resume_window=0,
    )
    keys = [f"user.c{index}-{tag}" for index in range(options.receivers)]
    async with AsyncExitStack() as stack:
        publisher = await stack.enter_async_context(open_backend(settings))
        await _wait_ready(publisher)
        if target.single_instance:
            consumer = publisher
        else:
            # On a cluster the consumer starts on the next node: its messages
            # cross from node to node.
            consumer_settings = replace(
                settings,
                instance_id=f"bench-ceiling-sub-{tag}",
                broker_url=rotated_urls(target.broker_url, 1),
            )
            consumer = await stack.enter_async_context(open_backend(consumer_settings))
            await _wait_ready(consumer)
        for key in keys:
            await consumer.subscribe(key)
        recorder = Recorder()

        async def consume() -> None:
            receiver_of = {key: index for index, key in enumerate(keys)}
            async for key, body in consumer.incoming:
                recorder.tally.arrive(receiver_of[key], json.loads(body))

        async def publish_stream(stream: int, tally: Tally, schedule: Schedule) -> None:
            number = 0
            while await schedule.next_send():
                body = json.dumps({"s": stream, "n": number, "t": tally.sending()}).encode()
                outcome = await publisher.publish(keys[(stream + number) % len(keys)], body)
                if outcome is Outcome.UNROUTED:
                    tally.fail("unrouted")
                else:
                    tally.confirm(stream, number)
                number += 1

        async def phase(duration: float) -> Tally:
            recorder.tally = tally = Tally()
            schedule = Schedule(duration)
            async with trio.open_nursery() as publishing:
                for stream in range(options.concurrency):
                    publishing.start_soon(publish_stream, stream, tally, schedule)
            await tally.drain(DRAIN_IDLE_TIMEOUT)
            return tally

        async with trio.open_nursery() as consuming:
            consuming.start_soon(consume)
            await phase(options.warmup)
            meter = CpuMeter({"broker": broker_processes(target)})
            meter.start()
            tally = await phase(options.duration)
            window = meter.stop()
            consuming.cancel_scope.cancel()
    summary = tally.summary()
    return _row(
        target,
        "ceiling",
        status="ok",
        **summary,
        **_cpu_figures(window, summary["delivered"]),
        params={"duration": options.duration, "concurrency": options.concurrency},
    )


async def _guarded(
    target: Target, scenario: str, run: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Run one scenario under a hang guard; any failure becomes its error row."""
    try:
        with trio.fail_after(SCENARIO_TIMEOUT):
            return await run()
    # A benchmark reports every failure as a row instead of stopping the matrix;
    # the traceback goes to stderr so the cause can be found.
    except Exception as error:
        traceback.print_exc()
        return error_row(target, scenario, _describe(error))


def _describe(error: BaseException) -> str:
    if isinstance(error, BaseExceptionGroup):
        return "; ".join(sorted({_describe(inner) for inner in error.exceptions}))
    if isinstance(error, trio.TooSlowError):
        return "timed out (a hang guard fired: see the traceback on stderr)"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


async def run_target(
    target: Target,
    scenarios: list[str],
    options: Options,
    *,
    rates: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Every selected scenario on one target, in a fixed order; one row per scenario."""
    try:
        await trio.to_thread.run_sync(ensure_broker, target)
    except BrokerNotRunning as error:
        return [error_row(target, scenario, str(error)) for scenario in scenarios]
    async with holding_broker(target):
        return await _run_scenarios(target, scenarios, options, rates or {})


async def _run_scenarios(
    target: Target, scenarios: list[str], options: Options, rates: dict[str, float]
) -> list[dict[str, Any]]:
    exchange = f"triows-bench-{secrets.token_hex(4)}"
    rows: list[dict[str, Any]] = []
    if target.server == "peer":
        rows += [
            not_applicable_row(target, scenario, "a triows scenario: the peer has no such path")
            for scenario in scenarios
            if scenario not in PEER_SCENARIOS
        ]
        scenarios = [scenario for scenario in scenarios if scenario in PEER_SCENARIOS]
    traffic = [scenario for scenario in TRAFFIC_SCENARIOS if scenario in scenarios]
    if traffic:
        direct_rate: float | None = rates.get(target.name)
        try:
            async with open_pair(target, exchange) as pair:
                for scenario in traffic:
                    rate = None
                    if scenario == "latency":
                        rate = (direct_rate or 0.0) * options.latency_share or options.latency_rate
                    run = partial(run_traffic, pair, scenario, options, rate)
                    if scenario in ("room", "room-churn"):
                        run = partial(run_room, pair, options, churn=scenario == "room-churn")
                    row = await _guarded(target, scenario, run)
                    if scenario == "direct" and row["status"] == "ok":
                        direct_rate = row["msg_per_s"]
                    rows.append(row)
        # Instances that cannot start (or stop cleanly) turn the rest into error rows.
        except Exception as error:
            traceback.print_exc()
            done = {row["scenario"] for row in rows}
            rows += [
                error_row(target, scenario, f"instances failed: {_describe(error)}")
                for scenario in traffic
                if scenario not in done
            ]
    if "idle" in scenarios:
        rows.append(await _guarded(target, "idle", partial(run_idle, target, exchange, options)))
    if "ceiling" in scenarios:
        run_ceiling_here = partial(run_ceiling, target, exchange, options)
        rows.append(await _guarded(target, "ceiling", run_ceiling_here))
    if "scaleout" in scenarios:
        rows += await run_scaleout(target, exchange, options)
    if "presence" in scenarios:
        rows += await run_presence(target, exchange, options)
    return rows


async def run_scaleout(target: Target, exchange: str, options: Options) -> list[dict[str, Any]]:
    """``direct`` across N instances for each N: senders on the first, receivers on the second,
    the rest running without users. One row per N, each with a fresh cluster."""
    if target.single_instance:
        return [not_applicable_row(target, "scaleout", "one process: nothing to scale out")]
    rows = []
    for count in options.scaleout_instances:

        async def run(count: int = count) -> dict[str, Any]:
            async with _instances(
                target,
                f"{exchange}-n{count}",
                count,
                TRIOWS_SEND_QUEUE=str(RECEIVER_SEND_QUEUE),
            ) as instances:
                pair = Pair(target, instances[0], instances[1], instances[2:])
                return await run_traffic(pair, "scaleout", options, None)

        row = await _guarded(target, "scaleout", run)
        row["instances"] = count
        rows.append(row)
    return rows


def _progress(text: str) -> None:
    """A line on stderr while a long scenario runs (and a mark a profiler can wait for)."""
    print(f"bench:   {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


async def run_presence(target: Target, exchange: str, options: Options) -> list[dict[str, Any]]:
    """Presence queries across N idle-loaded instances for each N (``bench/presence.py``)."""
    counts = (1,) if target.single_instance else options.presence_instances
    rows = []
    for count in counts:
        run = partial(_presence_on, target, f"{exchange}-p{count}", options, count)
        try:
            with trio.fail_after(PRESENCE_TIMEOUT):
                row = await run()
        except Exception as error:  # as _guarded, with a longer hang guard
            traceback.print_exc()
            row = error_row(target, "presence", _describe(error))
        row["instances"] = count
        rows.append(row)
    return rows


async def _presence_on(
    target: Target, exchange: str, options: Options, count: int
) -> dict[str, Any]:
    population = Population(
        f"p{secrets.token_hex(3)}-", options.presence_users, options.presence_room_size
    )
    env = {
        "TRIOWS_PRESENCE_RATE": PRESENCE_UNPACED,
        "TRIOWS_PRESENCE_BURST": PRESENCE_UNPACED,
        # One connection per user, no session queue: 10,000 users open in minutes, not tens.
        "TRIOWS_RESUME_WINDOW": dict(target.env).get("TRIOWS_RESUME_WINDOW", "0"),
        # Thousands of binds at once on a shared broker: a batch's round trip outlasts the
        # default, the instance drops its connection and binds everything again.
        "TRIOWS_BROKER_TIMEOUT": PRESENCE_BROKER_TIMEOUT,
    }
    async with _instances(target, exchange, count, **env) as instances:
        processes = [psutil.Process(instance.process.pid) for instance in instances]
        roles: dict[str, list[psutil.Process]] = {
            f"instance_{chr(ord('a') + index)}": [process]
            for index, process in enumerate(processes)
        }
        roles["broker"] = broker_processes(target)
        ws_urls = [instance.base_url.replace("http", "ws", 1) for instance in instances]
        try:
            async with holding_users(
                ws_urls, population, options.presence_holders
            ) as connect_seconds:

                async def phase(duration: float) -> QueryTally:
                    # Connections of its own: the idle window outlasts Hypercorn's keep-alive.
                    async with AsyncExitStack() as stack:
                        connections = [
                            await stack.enter_async_context(
                                open_send_connection(instances[stream % count].base_url)
                            )
                            for stream in range(options.concurrency)
                        ]
                        tally = QueryTally()
                        schedule = Schedule(duration, options.presence_query_rate)
                        async with trio.open_nursery() as asking:
                            for stream, connection in enumerate(connections):
                                asking.start_soon(
                                    query_stream, connection, stream, population, tally, schedule
                                )
                        tally.ended = time.perf_counter()
                    return tally

                _progress(f"presence: {count} instances, {population.users} users open")
                await phase(options.warmup)
                meter = CpuMeter(roles)
                meter.start()
                await trio.sleep(options.duration)
                idle = meter.stop()
                _progress(f"presence: {count} instances, the measured queries start")
                meter = CpuMeter(roles)
                meter.start()
                tally = await phase(options.duration)
                busy = meter.stop()
        finally:
            # Measured; now the fastest way down (a graceful close of 10,000 sockets
            # is 10,000 broker unsubscribes).
            for instance in instances:
                if target.fragile:
                    instance.terminate()
                else:
                    instance.process.kill()
    summary = tally.summary()

    def per_query(roles: list[str]) -> float | None:
        spent = [busy.seconds.get(role) for role in roles]
        rested = [idle.seconds.get(role) for role in roles]
        if None in spent or None in rested:
            return None
        value = cpu_ms_per_query(
            sum(s for s in spent if s is not None),
            busy.wall,
            sum(r for r in rested if r is not None),
            idle.wall,
            summary["queries"],
        )
        return None if value is None else round(value, 3)

    instance_roles = [role for role in roles if role.startswith("instance_")]
    idle_instances = sum(idle.seconds.get(role) or 0.0 for role in instance_roles)
    return _row(
        target,
        "presence",
        status="ok",
        **summary,
        users=population.users,
        rooms=population.rooms,
        room_size=population.room_size,
        connect_per_s=round(population.users / connect_seconds, 1),
        server_cpu_ms_per_query=per_query(instance_roles),
        broker_cpu_ms_per_query=per_query(["broker"]) if roles["broker"] else None,
        idle_instances_cpu_percent=round(100 * idle_instances / idle.wall, 1),
        instance_cpu_percent={
            role: round(100 * (busy.seconds.get(role) or 0.0) / busy.wall, 1)
            for role in instance_roles
        },
        loadgen_cpu_share=round(busy.loadgen_share, 3),
        other_cpu_cores=round(busy.other / busy.wall, 2) if busy.wall else None,
        params={
            "duration": options.duration,
            "query_rate": options.presence_query_rate,
            "concurrency": options.concurrency,
            "holders": options.presence_holders,
            "env": env,
        },
    )
