"""Instances on a three-node RabbitMQ cluster (``deploy/brokers.py start rabbitmq-cluster``).

``TRIOWS_BROKER_URL`` lists the three nodes; each instance connects to the
first of its list and, when it loses that node, moves to the next one and
restores its subscriptions there. Here instance A lists node 1 first and B
node 2, so Bob's socket on B and Anne's send to A cross the cluster; then
node 2 goes down (its outage lock held) and B must carry Bob on. Nodes are
also SIGKILLed and shut down whole, and booted again (they rejoin the
cluster), and an instance is held in the middle of a move.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from deploy.brokers import (
    BROKERS,
    CLUSTER_CA,
    RABBITMQ_CLUSTER_UNNAMED_HOST,
    SCRIPT,
    cluster_node,
    cluster_nodes,
    running_cluster_nodes,
)
from tests.brokers import broker_outage, cluster_urls, require_broker
from tests.e2e import POLL_INTERVAL, RECONNECT_MAX, STEP_TIMEOUT, unique_exchange
from tests.tcp_proxy import open_tcp_proxy
from tests.test_amqp091_backend import Rejections
from tests.test_session_resume import Received, events_url, sender
from triows.backend import open_backend
from triows.backends.broker_url import rotated_broker_urls
from triows.client import EventsClient, open_events, post_send
from triows.process import Instance, free_port, serve_instance
from triows.settings import Settings

pytestmark = pytest.mark.broker

BACKENDS = ("amqp091", "amqp10", "stomp")
# Hang guards: the cluster's start (a cold one boots three nodes); a node's outage.
CLUSTER_START_TIMEOUT = 600
OUTAGE_TIMEOUT = 120
# How long a send is given to reach an instance before the test lets its move
# end (not a bound on anything: a send that waits for the move passes however
# long this is; one refused at once fails).
MOVE_SEND_LEAD = 0.5


@pytest.fixture(scope="module", autouse=True)
def cluster_started() -> None:
    """Start the cluster once for the module, through the broker table (a no-op if it runs)."""
    started = subprocess.run(
        [sys.executable, str(SCRIPT), "start", "rabbitmq-cluster"],
        capture_output=True,
        text=True,
        timeout=CLUSTER_START_TIMEOUT,
        check=False,
    )
    assert started.returncode == 0, started.stderr


@asynccontextmanager
async def instances_on_nodes(
    backend: str,
    first_nodes: tuple[int, ...],
    *,
    tls: bool = False,
    env: dict[str, str] | None = None,
) -> AsyncIterator[list[Instance]]:
    """One ready instance per entry of ``first_nodes``, each listing that node (0-based) first."""
    urls = cluster_urls(backend, tls=tls)  # type: ignore[arg-type]
    env = {
        "TRIOWS_EXCHANGE": unique_exchange(),
        "TRIOWS_RECONNECT_MAX": RECONNECT_MAX,
        **(env or {}),
    }
    async with AsyncExitStack() as stack:
        instances = []
        for first in first_nodes:
            instance = await stack.enter_async_context(
                serve_instance(backend, broker_url=rotated_broker_urls(urls, first), env=env)
            )
            await instance.wait_ready(STEP_TIMEOUT)
            instances.append(instance)
        yield instances


async def send_until_received(
    http: httpx.AsyncClient, via: Instance, bob: EventsClient, tag: str
) -> dict[str, object]:
    """Anne sends ``tag N`` to Bob through ``via`` until Bob gets one; return that frame.

    While an instance moves to another node some sends are refused (503) or
    reach nobody yet; the first one Bob gets shows delivery has resumed.
    """
    received: dict[str, object] = {}
    async with trio.open_nursery() as nursery:

        async def keep_sending() -> None:
            count = 0
            while True:
                count += 1
                await post_send(http, via.base_url, "Bob", f"{tag} {count}", sender="Anne")
                await trio.sleep(POLL_INTERVAL * 4)

        nursery.start_soon(keep_sending)
        while True:
            frame = await bob.receive()
            if str(frame.get("message", "")).startswith(f"{tag} "):
                received = frame
                break
        nursery.cancel_scope.cancel()
    return received


@pytest.mark.parametrize("backend", BACKENDS)
async def test_bob_on_node_2_gets_annes_send_to_node_1_and_again_after_node_2_goes(
    backend: str,
) -> None:
    await require_broker("rabbitmq-cluster")
    async with (
        instances_on_nodes(backend, (0, 1)) as (a, b),
        httpx.AsyncClient() as http,
        open_events(b.base_url, user="Bob") as bob,
    ):
        with trio.fail_after(STEP_TIMEOUT):
            before = await send_until_received(http, a, bob, "before")
        assert before["from"] == "Anne"

        with trio.fail_after(OUTAGE_TIMEOUT):
            async with broker_outage("rabbitmq-cluster-2"):
                # B lost node 2: it moves to node 3 (the next in its list),
                # restores Bob's subscription there, and delivery resumes
                # while node 2 is still down; Bob's socket never closed.
                during = await send_until_received(http, a, bob, "during")
                assert bob.close_code is None
        assert during["from"] == "Anne"
        assert b.process.returncode is None


# Cluster nodes by the table's names, and their Erlang names.
NODE_1, NODE_2 = "rabbitmq-cluster-1", "rabbitmq-cluster-2"


def erlang_name(node: str) -> str:
    return cluster_node(BROKERS[node]).name


async def rabbitmqctl(node: str, *args: str) -> str:
    result = await trio.run_process(
        ["rabbitmqctl", "-q", "-n", erlang_name(node), *args], capture_stdout=True
    )
    return result.stdout.decode()


async def kill_node(node: str) -> None:
    """SIGKILL the node's Erlang VM: its OS closes every connection, nothing is said."""
    pid = int((await rabbitmqctl(node, "eval", "os:getpid().")).strip().strip('"'))
    os.kill(pid, signal.SIGKILL)


async def stop_node(node: str) -> None:
    """Shut the whole node down (``rabbitmqctl stop``: its Erlang VM exits)."""
    await rabbitmqctl(node, "stop")


async def running_nodes() -> list[str]:
    """The nodes node 3 sees running in its cluster."""
    return await trio.to_thread.run_sync(running_cluster_nodes, cluster_nodes()[2])


@pytest.mark.parametrize(
    ("node", "take_down", "under"),
    [
        pytest.param(NODE_1, kill_node, 0, id="sending-node-killed"),
        pytest.param(NODE_2, stop_node, 1, id="receiving-node-restarted"),
    ],
)
async def test_a_node_taken_down_and_booted_again_rejoins_and_annes_sends_go_on(
    node: str, take_down: Callable[[str], Awaitable[None]], under: int
) -> None:
    """Anne sends through A (node 1 first), Bob listens on B (node 2 first). Node 1, A's,
    is SIGKILLed, or node 2, B's, is shut down whole: the instance on it moves to the next
    node of its list and Anne's sends reach Bob again; the node boots again, rejoins the
    cluster, and nothing needs it to."""
    await require_broker("rabbitmq-cluster")
    async with (
        instances_on_nodes("amqp091", (0, 1)) as instances,
        httpx.AsyncClient() as http,
        open_events(instances[1].base_url, user="Bob") as bob,
    ):
        a = instances[0]
        with trio.fail_after(STEP_TIMEOUT):
            await send_until_received(http, a, bob, "before")
        with trio.fail_after(OUTAGE_TIMEOUT):
            async with broker_outage(node, take_down=partial(take_down, node)):
                during = await send_until_received(http, a, bob, "during")
            # Booted with its data, it synced with the running nodes before
            # opening its listeners (outage-end waits for those).
            assert erlang_name(node) in await running_nodes()
            after = await send_until_received(http, a, bob, "after")
        assert during["from"] == after["from"] == "Anne"
        assert bob.close_code is None
        assert instances[under].process.returncode is None


async def test_quorum_sessions_lose_nothing_when_the_node_under_their_instance_dies() -> None:
    """Sessions on, their queues quorum queues (replicated over the three nodes). Bob on
    B (node 2 first), a sender POSTing to A every few milliseconds; node 2 is SIGKILLed,
    then booted again. B moves to node 3 and consumes Bob's queue there: no send is
    refused, and every message reaches Bob's one socket exactly once, in the order sent,
    ``seq`` consecutive."""
    await require_broker("rabbitmq-cluster")
    received = Received()
    sessions = {"TRIOWS_RESUME_WINDOW": "120", "TRIOWS_QUEUE_TYPE": "quorum"}
    async with (
        instances_on_nodes("amqp091", (0, 1), env=sessions) as (a, b),
        httpx.AsyncClient(timeout=OUTAGE_TIMEOUT) as http,
        open_websocket_url(events_url(b.base_url, "Bob")) as socket,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(received.read, socket)
        done = trio.Event()
        with trio.fail_after(OUTAGE_TIMEOUT):
            await received.until(lambda: bool(received.hellos))
            nursery.start_soon(sender, http, a.base_url, received, done)
            await received.until(lambda: len(received.frames) >= 50)
            async with broker_outage(NODE_2, take_down=partial(kill_node, NODE_2)):
                # Delivery goes on while node 2 is down.
                count = len(received.frames)
                await received.until(lambda: len(received.frames) >= count + 50)
            done.set()
            wanted = {message_id for status, message_id in received.outcomes if status == 202}
            await received.until(lambda: wanted <= {frame["id"] for frame in received.frames})
            await trio.sleep(0.5)  # a duplicate would come now
        nursery.cancel_scope.cancel()
    # Bob's queue stayed routable (classic: its one copy on node 2, sends 404 until B
    # has declared a new one).
    assert [status for status, _ in received.outcomes if status != 202] == []
    ids = [frame["id"] for frame in received.frames]
    assert len(ids) == len(set(ids)), "a message came twice"
    assert ids == [message_id for _, message_id in received.outcomes if message_id is not None]
    assert [frame["seq"] for frame in received.frames] == list(range(1, len(ids) + 1))
    assert len(received.hellos) == 1  # the socket stayed open


def via_port(url: str, port: int) -> str:
    """``url`` with its port replaced by ``port`` (a proxy's, in front of that node)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{host}:{port}"))


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_send_through_an_instance_moving_to_another_node_waits_for_it_and_reaches_bob(
    backend: str,
) -> None:
    """Node 2 goes while B is on it; B's next node (3) answers only once the test lets it,
    through a proxy that holds B's connection: the send Anne makes through B meanwhile
    waits for B to be ready on node 3 and is delivered, instead of being refused (503)."""
    await require_broker("rabbitmq-cluster")
    urls = cluster_urls(backend).split(",")  # type: ignore[arg-type]
    # Without sessions: Bob's key bound to B's queue, which moves with B.
    env = {
        "TRIOWS_EXCHANGE": unique_exchange(),
        "TRIOWS_RECONNECT_MAX": RECONNECT_MAX,
        "TRIOWS_RESUME_WINDOW": "0",
    }
    proxy_port = free_port()
    b_urls = ",".join([urls[1], via_port(urls[2], proxy_port), urls[0]])
    async with (
        open_tcp_proxy(urlsplit(urls[2]).port or 0, port=proxy_port) as node_3,
        serve_instance(backend, broker_url=",".join(urls), env=env) as a,
        serve_instance(backend, broker_url=b_urls, env=env) as b,
        httpx.AsyncClient(timeout=OUTAGE_TIMEOUT) as http,
    ):
        await a.wait_ready(STEP_TIMEOUT)
        await b.wait_ready(STEP_TIMEOUT)
        async with open_events(b.base_url, user="Bob") as bob:
            with trio.fail_after(STEP_TIMEOUT):
                await send_until_received(http, a, bob, "before")
            node_3.hold()
            with trio.fail_after(OUTAGE_TIMEOUT):
                async with broker_outage("rabbitmq-cluster-2"):
                    # B lost node 2 and is connecting to node 3: moving.
                    await node_3.wait_someone_held()
                    response: httpx.Response | None = None

                    async def send_while_moving() -> None:
                        nonlocal response
                        response = await post_send(
                            http, b.base_url, "Bob", "while B moves", sender="Anne"
                        )

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(send_while_moving)
                        # Time for the request to reach B (before the fix it
                        # was answered 503 at once; it must wait instead).
                        await trio.sleep(MOVE_SEND_LEAD)
                        node_3.release()
                    assert response is not None
                    assert response.status_code == 202, response.text
                    # (Sends of "before" may still be on their way.)
                    while (await bob.receive()).get("message") != "while B moves":
                        pass


class BackendEvents(logging.Handler):
    """The names of the ``triows`` log events, in order; ``back`` is set by a
    ``broker_ready`` that follows a ``broker_not_ready``."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.fields: list[dict[str, object]] = []
        self.back = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        name = record.getMessage()
        self.names.append(name)
        self.fields.append(getattr(record, "fields", {}))
        if name == "broker_ready" and "broker_not_ready" in self.names:
            self.back.set()


@pytest.mark.parametrize("backend", ["amqp091", "amqp10"])
async def test_new_queues_are_taken_on_the_same_connection_when_their_node_is_gone(
    backend: str,
) -> None:
    """The node holding the backend's queues goes; on the next node they are out of
    reach (their home node is down), and the backend declares new ones for that same
    connection, which is then ready: no reconnect for the replacement. (While the
    node shuts down, a first attempt elsewhere may fail for other reasons.)"""
    await require_broker("rabbitmq-cluster")
    urls = cluster_urls(backend).split(",")  # type: ignore[arg-type]
    settings = Settings(
        backend=backend,
        broker_url=rotated_broker_urls(",".join(urls), 1),
        exchange=unique_exchange(),
        reconnect_max_delay=float(RECONNECT_MAX),
        resume_window=0,  # the key contract: subscribe, then incoming
    )
    events = BackendEvents()
    logger = logging.getLogger("triows")
    level = logger.level
    logger.addHandler(events)
    logger.setLevel(logging.INFO)  # broker_ready and broker_not_ready are INFO
    try:
        async with open_backend(settings) as opened:
            with trio.fail_after(STEP_TIMEOUT):
                await opened.wait_ready()
                await opened.subscribe("user.Bob")
            with trio.fail_after(OUTAGE_TIMEOUT):
                async with broker_outage("rabbitmq-cluster-2"):
                    await events.back.wait()
                    # Bob's key is bound again, on the new queue.
                    await opened.publish("user.Bob", b"after the move")
                    assert await opened.incoming.receive() == ("user.Bob", b"after the move")
    finally:
        logger.setLevel(level)
        logger.removeHandler(events)
    moved = events.names[events.names.index("broker_not_ready") :]
    logged = list(zip(events.names, events.fields, strict=True))
    assert moved.count("broker_queue_replaced") == 1, logged
    replaced = moved.index("broker_queue_replaced")
    assert moved[replaced + 1] == "broker_ready", logged


# TLS: every node also listens with TLS, on a certificate of the script's CA
# (SAN localhost and 127.0.0.1), and on 127.0.0.2, a host the certificate does
# not name. The URLs pass the CA as ``?cafile=``.

# A CA bundle that did not sign the nodes' certificate (the system's).
OTHER_CA = "/etc/ssl/certs/ca-certificates.crt"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_instances_on_the_tls_listeners_verify_the_ca_and_carry_annes_message(
    backend: str,
) -> None:
    await require_broker("rabbitmq-cluster")
    async with (
        instances_on_nodes(backend, (0, 1), tls=True) as (a, b),
        httpx.AsyncClient() as http,
        open_events(b.base_url, user="Bob") as bob,
    ):
        with trio.fail_after(STEP_TIMEOUT):
            frame = await send_until_received(http, a, bob, "over TLS")
        assert frame["from"] == "Anne"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("wrong", "refusal"),
    [
        pytest.param("ca", "self-signed certificate", id="wrong-ca"),
        pytest.param("host", "not valid for '127.0.0.2'", id="wrong-host"),
    ],
)
async def test_a_wrong_ca_or_host_name_is_refused_with_one_broker_rejected_line(
    backend: str, wrong: str, refusal: str
) -> None:
    await require_broker("rabbitmq-cluster")
    url = cluster_urls(backend, tls=True).split(",")[0]  # type: ignore[arg-type]
    if wrong == "ca":
        url = url.replace(str(CLUSTER_CA), OTHER_CA)
    else:
        url = url.replace("@localhost:", f"@{RABBITMQ_CLUSTER_UNNAMED_HOST}:")
    settings = Settings(
        backend=backend, broker_url=url, exchange=unique_exchange(), reconnect_max_delay=0.1
    )
    rejections = Rejections()
    logger = logging.getLogger("triows")
    logger.addHandler(rejections)
    try:
        async with open_backend(settings) as opened:
            with trio.fail_after(STEP_TIMEOUT):
                await rejections.seen.wait()
            # Several retries later: alive, not ready, and still one line.
            await trio.sleep(settings.reconnect_max_delay * 5)
            assert not opened.ready
    finally:
        logger.removeHandler(rejections)
    assert len(rejections.fields) == 1
    assert rejections.fields[0]["kind"] == "tls"
    assert refusal in str(rejections.fields[0]["error"])
