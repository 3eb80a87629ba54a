"""The chat page in a real browser, against three instances behind HAProxy.

(And, for the session a page resumes, two instances behind a TCP proxy that
the test points at one and then the other.)

Headless Chromium from Debian's ``chromium`` package (installed here with
apt-get if it is missing; Playwright never downloads a browser of its own)
driven by Playwright's synchronous Python API. The cluster is
:func:`triows.cluster.open_cluster` on free ports (amqp091 on RabbitMQ), held
by a Trio run in a thread of its own, so the tests themselves are plain
functions that drive the browser and ask that thread to SIGTERM an instance.

Every step is read from the page through the hooks its header comment
documents (``#state``, ``#instance``, ``#reconnects``, ``#room-list``,
``#log`` entries with their data attributes). Screenshots of each step go to
``tests/artifacts/browser/`` (not committed; the path is printed).
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urlsplit

import httpx
import pytest
import trio
from playwright.sync_api import (
    Browser,
    Locator,
    Page,
    WebSocketRoute,
    expect,
    sync_playwright,
)

from tests.brokers import require_broker
from tests.e2e import TARGETS_BY_NAME, ready_instances, unique_exchange
from tests.tcp_proxy import TcpProxy, open_tcp_proxy
from triows.client import open_client
from triows.cluster import debian_executable, open_cluster
from triows.process import Instance, free_port, serve_instance

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts" / "browser"
# Hang guards only (milliseconds for Playwright, seconds for the cluster).
STEP_TIMEOUT_MS = 30_000
CLUSTER_TIMEOUT = 180
POLL_MS = 20
# HAProxy balances WebSockets by leastconn, so Bob's first page lands on an
# instance without Anne's socket; if it did not, more pages are opened (each
# replacing the last) until one does, at most this many.
PAGE_ATTEMPTS = 5

expect.set_options(timeout=STEP_TIMEOUT_MS)


Held = TypeVar("Held")


@contextmanager
def held_in_a_thread(
    open_it: Callable[[trio.lowlevel.TrioToken], AbstractAsyncContextManager[Held]],
) -> Iterator[Held]:
    """What ``open_it`` opens, held by a Trio run in a thread of its own, for the block."""
    handed: queue.Queue[Held | BaseException] = queue.Queue()
    failures: list[BaseException] = []
    stop: trio.Event | None = None
    token: trio.lowlevel.TrioToken | None = None

    async def hold() -> None:
        nonlocal stop, token
        try:
            stop, token = trio.Event(), trio.lowlevel.current_trio_token()
            async with open_it(token) as held:
                handed.put(held)
                await stop.wait()
        except BaseException as error:  # handed to the test's thread, raised there
            failures.append(error)
            handed.put(error)

    thread = threading.Thread(target=trio.run, args=(hold,), name="held", daemon=True)
    thread.start()
    got = handed.get(timeout=CLUSTER_TIMEOUT)
    if isinstance(got, BaseException):
        thread.join()
        raise got
    assert stop is not None and token is not None
    try:
        yield got
    finally:
        # The run may have ended already (what it held failed): then there is nothing to stop.
        with suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(stop.set, trio_token=token)
        thread.join(CLUSTER_TIMEOUT)
    if failures:
        raise failures[0]


@dataclass
class RunningCluster:
    """A cluster held by a Trio run in another thread; ``url`` is HAProxy's."""

    url: str
    # The instance id each instance reports in its hello, to the instance.
    instances: dict[str, Instance]
    trio_token: trio.lowlevel.TrioToken

    def terminate(self, instance_id: str) -> None:
        """SIGTERM the instance whose hello names ``instance_id`` (it drains, closing with 1012)."""
        trio.from_thread.run_sync(self.instances[instance_id].terminate, trio_token=self.trio_token)


@asynccontextmanager
async def open_running_cluster(token: trio.lowlevel.TrioToken) -> AsyncIterator[RunningCluster]:
    """Brokers, three instances on free ports and HAProxy."""
    await require_broker("rabbitmq")
    front, ports = free_port(), [free_port() for _ in range(3)]
    env = {"TRIOWS_EXCHANGE": unique_exchange()}
    async with open_cluster(front_port=front, instance_ports=ports, env=env) as cluster:
        instances = {await _instance_id(i.base_url): i for i in cluster.instances}
        yield RunningCluster(cluster.url, instances, token)


@dataclass
class GatedPair:
    """Instances A and B (amqp091 on RabbitMQ); the pages' origin, ``url``, is a proxy to B.

    The proxy is the load balancer a test steers: after B has drained and gone,
    a page's reconnects fail until :meth:`point_at_a`.
    """

    url: str
    a: Instance
    b: Instance
    proxy: TcpProxy
    trio_token: trio.lowlevel.TrioToken

    def drain_b(self) -> None:
        """SIGTERM B (it drains, closing its sockets with 1012) and wait until it exited."""
        trio.from_thread.run(self._drain_b, trio_token=self.trio_token)

    async def _drain_b(self) -> None:
        self.b.terminate()
        with trio.fail_after(CLUSTER_TIMEOUT):
            await self.b.process.wait()

    def point_at_a(self) -> None:
        """Forward the proxy's new connections to A."""
        port = urlsplit(self.a.base_url).port
        assert port is not None
        trio.from_thread.run_sync(
            setattr, self.proxy, "target_port", port, trio_token=self.trio_token
        )


@asynccontextmanager
async def open_gated_pair(token: trio.lowlevel.TrioToken) -> AsyncIterator[GatedPair]:
    target = TARGETS_BY_NAME["amqp091-rabbitmq"]
    await require_broker(target.broker)
    async with ready_instances(target, 2) as (a, b):
        port = urlsplit(b.base_url).port
        assert port is not None
        async with open_tcp_proxy(port) as proxy:
            yield GatedPair(f"http://127.0.0.1:{proxy.port}", a, b, proxy, token)


async def _instance_id(base_url: str) -> str:
    """The id an instance says in its hello (a throwaway socket straight to it)."""
    async with open_client(base_url, user="probe") as probe:
        assert probe.instance is not None
        return probe.instance


def chromium_path() -> str:
    """``/usr/bin/chromium``, installed from Debian's ``chromium`` package if it is missing."""
    if shutil.which("chromium") is None and shutil.which("apt-get") is not None:
        # A fresh machine may have no package lists yet.
        subprocess.run(["apt-get", "update", "-q"], check=True)
    return debian_executable("chromium")


@contextmanager
def launch_chromium(*extra_args: str) -> Iterator[Browser]:
    """Headless Debian Chromium (Playwright sync API) with ``CHROMIUM_ARGS`` + ``extra_args``."""
    executable = chromium_path()
    # trio_asyncio (imported by the amqp091 backend's tests) installs an event
    # loop policy whose loops run inside Trio; Playwright's sync API needs a
    # plain asyncio loop of its own, so it gets the default policy meanwhile.
    trio_policy = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        with sync_playwright() as playwright:
            args = [*CHROMIUM_ARGS, *extra_args]
            browser = playwright.chromium.launch(executable_path=executable, args=args)
            yield browser
            browser.close()
    finally:
        asyncio.set_event_loop_policy(trio_policy)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with launch_chromium() as browser:
        yield browser


@pytest.fixture
def cluster() -> Iterator[RunningCluster]:
    with held_in_a_thread(open_running_cluster) as running:
        yield running


@pytest.fixture
def gated_pair() -> Iterator[GatedPair]:
    with held_in_a_thread(open_gated_pair) as pair:
        yield pair


@pytest.fixture
def shots(request: pytest.FixtureRequest, browser: Browser) -> Iterator[Shots]:
    """The test's screenshots; at its end (pass or fail) one of each page still open too."""
    folder = ARTIFACTS / request.node.name
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    taken = Shots(folder)
    yield taken
    for context in browser.contexts:
        for page in context.pages:
            taken.take(page, f"end-{page.locator('#me').inner_text()}")
        context.close()
    print(f"browser test screenshots: {folder}")


class Shots:
    """Screenshots of the steps of one test, numbered in order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.count = 0

    def take(self, page: Page, name: str) -> None:
        self.count += 1
        page.screenshot(path=self.folder / f"{self.count:02d}-{name}.png", full_page=True)


# What the page shows, read through its documented hooks.


def open_page(browser: Browser, url: str, user: str, rooms: tuple[str, ...] = ()) -> Page:
    """A page of its own (a fresh browser context) connected as ``user``, joining ``rooms``."""
    context = browser.new_context(viewport={"width": 900, "height": 760})
    page = context.new_page()
    query = urlencode([("user", user), ("autoconnect", "1"), *(("room", r) for r in rooms)])
    page.goto(f"{url}/?{query}")
    shows(page, page.locator('#state[data-state="connected"]'))
    expect(page.locator("#me")).to_have_text(user)
    for room in rooms:
        shows(page, room_item(page, room).and_(page.locator('[data-state="joined"]')))
    return page


def shows(page: Page, wanted: Locator) -> None:
    """Wait until the page shows ``wanted``; fail at once, saying why, if it closes instead."""
    closed = page.locator('#state[data-state="closed"]')
    expect(wanted.or_(closed).first).to_be_visible()
    if closed.count():
        raise AssertionError(f"{page.locator('#me').inner_text()}'s page: {closed.inner_text()}")


def instance_of(page: Page) -> str:
    return page.locator("#instance").inner_text()


def room_item(page: Page, room: str) -> Locator:
    return page.locator(f'#room-list li[data-room="{room}"]')


def received(page: Page, sender: str, text: str, room: str = "") -> Locator:
    """The log entries of messages ``text`` from ``sender`` (direct unless ``room``)."""
    return page.locator(
        f'#log .entry[data-kind="message"][data-from="{sender}"][data-room="{room}"]',
        has_text=text,
    )


def delivered_back(page: Page, text: str, room: str = "") -> Locator:
    """The page's own entries of ``text`` that came back to it (a room it is in, a note to self)."""
    return page.locator(
        f'#log .entry[data-kind="sent"][data-room="{room}"][data-delivered="true"]', has_text=text
    )


def send(page: Page, to: str, text: str) -> None:
    """Type into the send form and submit it; wait for the page to show the ack's status."""
    page.locator("#to").fill(to)
    page.locator("#text").fill(text)
    page.locator("#send-button").click()
    sent = page.locator('#log .entry[data-kind="sent"]', has_text=text)
    # amqp091 on RabbitMQ confirms that a connection received it: "routed".
    expect(sent).to_contain_text("(routed)")


def pages_on_two_instances(
    browser: Browser, url: str, rooms: tuple[str, ...] = ()
) -> tuple[Page, Page]:
    """Anne's and Bob's pages, on different instances (each page says which)."""
    anne = open_page(browser, url, "Anne", rooms)
    for attempt in range(1, PAGE_ATTEMPTS + 1):
        bob = open_page(browser, url, "Bob", rooms)
        if instance_of(bob) != instance_of(anne):
            print(f"Bob's page reached another instance than Anne's at attempt {attempt}")
            return anne, bob
        bob.context.close()
    raise AssertionError(f"{PAGE_ATTEMPTS} pages of Bob all landed on Anne's instance")


def drain_bobs_instance(cluster: RunningCluster, bob: Page, rooms: tuple[str, ...] = ()) -> None:
    """SIGTERM the instance of Bob's page; the page reconnects through HAProxy elsewhere."""
    drained = instance_of(bob)
    cluster.terminate(drained)
    expect(bob.locator("#reconnects")).to_have_text("1")
    expect(bob.locator("#state")).to_have_attribute("data-state", "connected")
    now_on = instance_of(bob)
    assert now_on != drained
    assert now_on in cluster.instances
    reconnected = bob.locator('#log .entry[data-kind="reconnected"]')
    expect(reconnected).to_have_count(1)
    expect(reconnected).to_contain_text(f"reconnected to instance {now_on} (was {drained})")
    for room in rooms:
        expect(room_item(bob, room)).to_have_attribute("data-state", "joined")
        expect(
            bob.locator('#log .entry[data-kind="system"]', has_text=f"re-joined #{room}")
        ).to_have_count(1)


def test_direct_messages_reach_bobs_page_before_and_after_its_instance_drains(
    browser: Browser, cluster: RunningCluster, shots: Shots
) -> None:
    anne, bob = pages_on_two_instances(browser, cluster.url)
    send(anne, "Bob", "hi Bob")
    expect(received(bob, "Anne", "hi Bob")).to_have_count(1)
    shots.take(anne, "anne-sent")
    shots.take(bob, "bob-received")

    drain_bobs_instance(cluster, bob)
    shots.take(bob, "bob-reconnected")

    send(anne, "Bob", "after the drain")
    expect(received(bob, "Anne", "after the drain")).to_have_count(1)
    expect(received(bob, "Anne", "hi Bob")).to_have_count(1)
    shots.take(bob, "bob-received-after-the-drain")
    # Nothing was for Anne: her page shows no message, and never reconnected.
    expect(anne.locator('#log .entry[data-kind="message"]')).to_have_count(0)
    expect(anne.locator("#reconnects")).to_have_text("0")


def test_room_messages_reach_every_member_page_and_the_room_is_rejoined_after_a_drain(
    browser: Browser, cluster: RunningCluster, shots: Shots
) -> None:
    rooms = ("general",)
    anne, bob = pages_on_two_instances(browser, cluster.url, rooms)
    send(anne, "#general", "hello general")
    # Every member connection receives a room message, the sender's own included:
    # her page marks its own entry delivered rather than show the message twice.
    expect(received(bob, "Anne", "hello general", room="general")).to_have_count(1)
    expect(delivered_back(anne, "hello general", room="general")).to_have_count(1)
    send(anne, "Bob", "hi Bob")
    expect(received(bob, "Anne", "hi Bob")).to_have_count(1)
    shots.take(anne, "anne-room-and-direct")
    shots.take(bob, "bob-room-and-direct")

    drain_bobs_instance(cluster, bob, rooms)
    shots.take(bob, "bob-reconnected-and-rejoined")

    send(anne, "#general", "general, after the drain")
    expect(received(bob, "Anne", "general, after the drain", room="general")).to_have_count(1)
    expect(delivered_back(anne, "general, after the drain", room="general")).to_have_count(1)
    send(anne, "Bob", "Bob, after the drain")
    expect(received(bob, "Anne", "Bob, after the drain")).to_have_count(1)
    # Each room message reached each page once: none twice across the reconnect.
    expect(bob.locator('#log .entry[data-kind="message"][data-room="general"]')).to_have_count(2)
    expect(anne.locator('#log .entry[data-room="general"]')).to_have_count(2)
    expect(bob.locator('#log .entry[data-kind="message"][data-room=""]')).to_have_count(2)
    shots.take(anne, "anne-after-the-drain")
    shots.take(bob, "bob-after-the-drain")


def post_to_bob(http: httpx.Client, instance: Instance, text: str) -> dict[str, Any]:
    """Anne's ``POST /send`` to Bob (dev mode); the 202's body."""
    response = http.post(
        f"{instance.base_url}/send", json={"to": "Bob", "from": "Anne", "message": text}
    )
    assert response.status_code == 202, response.text
    body: dict[str, Any] = response.json()
    return body


def test_the_page_shows_every_message_sent_while_its_instance_drained_once_after_resuming(
    browser: Browser, gated_pair: GatedPair, shots: Shots
) -> None:
    pair = gated_pair
    bob = open_page(browser, pair.url, "Bob")
    drained = instance_of(bob)
    with httpx.Client(timeout=STEP_TIMEOUT_MS / 1000) as http:
        assert post_to_bob(http, pair.a, "before the drain")["status"] == "routed"
        expect(received(bob, "Anne", "before the drain")).to_have_count(1)

        pair.drain_b()
        # B is gone and the proxy still points at it: the page keeps trying.
        expect(bob.locator("#state")).to_have_attribute("data-state", "reconnecting")
        gap = [post_to_bob(http, pair.a, f"during the gap {n}") for n in range(5)]
        assert [answer["status"] for answer in gap] == ["queued"] * len(gap)
        shots.take(bob, "bob-away")

        pair.point_at_a()
        expect(bob.locator("#reconnects")).to_have_text("1")
        reconnected = bob.locator('#log .entry[data-kind="reconnected"]')
        expect(reconnected).to_have_count(1)
        expect(reconnected).to_contain_text(f"(was {drained}); session resumed, 5 missed")
        expect(reconnected).to_have_attribute("data-resumed", "true")
        for n, answer in enumerate(gap):
            entry = received(bob, "Anne", f"during the gap {n}")
            expect(entry).to_have_count(1)
            expect(entry).to_have_attribute("data-id", answer["id"])
        live = post_to_bob(http, pair.a, "after the resume")
        assert live["status"] == "routed"
        expect(received(bob, "Anne", "after the resume")).to_have_count(1)
    # Every message once, in the order sent: none twice across the resume.
    expect(bob.locator('#log .entry[data-kind="message"]')).to_have_count(len(gap) + 2)
    texts = bob.locator('#log .entry[data-kind="message"]').evaluate_all(
        "entries => entries.map((entry) => entry.lastChild.textContent)"
    )
    assert texts == [
        "before the drain",
        *(f"during the gap {n}" for n in range(len(gap))),
        "after the resume",
    ]
    shots.take(bob, "bob-resumed")


def connections_open(http: httpx.Client, instance: Instance) -> float:
    text = http.get(f"{instance.base_url}/metrics").text
    line = next(line for line in text.splitlines() if line.startswith("triows_connections_open "))
    return float(line.split()[1])


def test_a_reload_of_the_page_resumes_its_session_and_its_rooms(
    browser: Browser, shots: Shots
) -> None:
    with held_in_a_thread(lambda _: serve_instance("memory")) as server:
        bob = open_page(browser, server.base_url, "Bob", ("general",))
        page_url = bob.url
        with httpx.Client(timeout=STEP_TIMEOUT_MS / 1000) as http:
            assert post_to_bob(http, server, "before the reload")["status"] == "routed"
            expect(received(bob, "Anne", "before the reload")).to_have_count(1)
            # Leaving the page closes its socket with 1001 ("going away"): the session waits.
            bob.goto("about:blank")
            while connections_open(http, server) != 0:
                pass
            away = post_to_bob(http, server, "while reloading")
            assert away["status"] == "queued"
            room = http.post(
                f"{server.base_url}/send",
                json={"room": "general", "from": "Anne", "message": "general, while reloading"},
            )
            assert room.status_code == 202
            bob.goto(page_url)
            shows(bob, bob.locator('#state[data-state="connected"]'))
            connected = bob.locator('#log .entry[data-kind="system"]', has_text="connected as Bob")
            expect(connected).to_contain_text("session resumed, 2 missed")
            expect(received(bob, "Anne", "while reloading")).to_have_attribute(
                "data-id", away["id"]
            )
            expect(received(bob, "Anne", "general, while reloading", room="general")).to_have_count(
                1
            )
            # The room came back with the session: joined by the server, not by the page.
            expect(room_item(bob, "general")).to_have_attribute("data-state", "joined")
            live = http.post(
                f"{server.base_url}/send",
                json={"room": "general", "from": "Anne", "message": "general, live"},
            )
            assert live.json()["status"] == "routed"
            expect(received(bob, "Anne", "general, live", room="general")).to_have_count(1)
            # Nothing of before the reload came again.
            expect(bob.locator('#log .entry[data-kind="message"]')).to_have_count(3)
            shots.take(bob, "bob-after-the-reload")


# The page's own reconnect logic, with the server played by the test (Playwright
# routes the page's WebSocket), so that what the page shows while it re-joins can
# be held still and looked at: no cluster, and no dependence on rooms in the server.

STATIC = Path(__file__).resolve().parent.parent / "triows" / "static"
PAGE = STATIC / "chat.html"
ORIGIN = "http://chat.test"
# The longest delay before the module's first reconnect (its backoffInitialMs).
FIRST_BACKOFF_MAX_MS = 250


class ScriptedServer:
    """Each connection of the page says hello from instance ``one``, ``two``...; joins held.

    The page asks who is in each room it joined: answered at once, Bob alone.
    """

    def __init__(self) -> None:
        self.sockets: list[WebSocketRoute] = []
        self.joins: list[tuple[WebSocketRoute, dict[str, Any]]] = []
        self.presence_asked: list[str] = []

    def accept(self, socket: WebSocketRoute) -> None:
        self.sockets.append(socket)
        names = ("one", "two", "three")
        hello = {"type": "hello", "user": "Bob", "instance": names[len(self.sockets) - 1]}
        socket.send(json.dumps({**hello, "protocol": 1}))
        socket.on_message(lambda text: self.received(socket, json.loads(text)))

    def received(self, socket: WebSocketRoute, frame: dict[str, Any]) -> None:
        if frame["type"] == "presence":
            self.presence_asked.append(frame["room"])
            answer = {"room": frame["room"], "users": ["Bob"], "complete": True, "truncated": False}
            socket.send(json.dumps({"type": "presence", "ref": frame["ref"], **answer}))
            return
        assert frame["type"] == "join", frame
        self.joins.append((socket, frame))

    def answer_joins(self) -> None:
        for socket, frame in self.joins:
            socket.send(json.dumps({"type": "joined", "room": frame["room"], "ref": frame["ref"]}))
        self.joins.clear()


def scripted_page(browser: Browser, server: ScriptedServer) -> Page:
    """The chat page and its module at ``ORIGIN``, its sockets played by ``server``."""
    page = browser.new_context().new_page()
    page.route(f"{ORIGIN}/**", lambda route: route.fulfill(path=PAGE, content_type="text/html"))
    page.route(
        f"{ORIGIN}/triows.js",
        lambda route: route.fulfill(path=STATIC / "triows.js", content_type="text/javascript"),
    )
    page.route_web_socket(re.compile(r"/events\?user=Bob&presence=1$"), server.accept)
    return page


def until(page: Page, condition: Callable[[], bool]) -> None:
    """Let Playwright deliver the page's frames to the handlers until ``condition`` holds."""
    for _ in range(STEP_TIMEOUT_MS // POLL_MS):
        if condition():
            return
        page.wait_for_timeout(POLL_MS)
    raise AssertionError("the page did not send what was expected")


def test_the_page_marks_its_rooms_rejoining_until_the_new_connection_joined_them(
    browser: Browser, shots: Shots
) -> None:
    server = ScriptedServer()
    page = scripted_page(browser, server)
    page.goto(f"{ORIGIN}/?user=Bob&autoconnect=1&room=general")
    expect(page.locator("#instance")).to_have_text("one")
    expect(room_item(page, "general")).to_have_count(0)
    until(page, lambda: len(server.joins) == 1)
    assert server.joins[0][1]["room"] == "general"
    server.answer_joins()
    expect(room_item(page, "general")).to_have_attribute("data-state", "joined")

    server.sockets[0].close(code=1012, reason="instance draining")
    expect(page.locator("#instance")).to_have_text("two")
    expect(page.locator("#reconnects")).to_have_text("1")
    # Connected again, the join sent and not answered yet: the room is not joined.
    expect(room_item(page, "general")).to_have_attribute("data-state", "rejoining")
    rejoined = page.locator('#log .entry[data-kind="system"]', has_text="re-joined #general")
    expect(rejoined).to_have_count(0)
    shots.take(page, "rejoining")
    until(page, lambda: len(server.joins) == 1)
    assert server.joins[0][1]["room"] == "general"
    assert server.joins[0][0] is server.sockets[1]
    server.answer_joins()
    expect(room_item(page, "general")).to_have_attribute("data-state", "joined")
    expect(rejoined).to_have_count(1)
    # Presence events are not replayed: the page asked who is in the room again.
    until(page, lambda: server.presence_asked == ["general", "general"])
    expect(page.locator('#online li[data-room="general"]')).to_have_attribute("data-users", "Bob")
    shots.take(page, "rejoined")


@pytest.mark.parametrize(("code", "why"), [(4401, "token expired"), (4001, "slow consumer")])
def test_the_page_stops_and_says_why_on_a_close_code_that_is_not_transient(
    browser: Browser, code: int, why: str
) -> None:
    server = ScriptedServer()
    page = scripted_page(browser, server)
    page.goto(f"{ORIGIN}/?user=Bob&autoconnect=1")
    expect(page.locator("#instance")).to_have_text("one")
    server.sockets[0].close(code=code, reason="")
    expect(page.locator("#state")).to_have_attribute("data-state", "closed")
    expect(page.locator("#state")).to_have_text(f"closed ({code} {why})")
    expect(page.locator('#log .entry[data-kind="error"]', has_text=why)).to_have_count(1)
    # Stopped for good: no second connection, even after twice the longest first backoff.
    page.wait_for_timeout(2 * FIRST_BACKOFF_MAX_MS)
    assert len(server.sockets) == 1
    expect(page.locator("#connect")).to_be_enabled()
    page.context.close()


# Points of the leave button's outline (its rounded corners, sampled every 5
# degrees) outside the inner edge of its room's pill border (a rounded
# rectangle): a button drawn across the pill's border; 0.5 px of slack.
POINTS_OUTSIDE_THE_PILL = """item => {
  const button = item.querySelector("button.leave");
  const outer = item.getBoundingClientRect(), box = button.getBoundingClientRect();
  const border = parseFloat(getComputedStyle(item).borderTopWidth);
  const pill = {left: outer.left + border, top: outer.top + border,
                right: outer.right - border, bottom: outer.bottom - border};
  const radius = (element, rect) => Math.min(
    parseFloat(getComputedStyle(element).borderTopRightRadius), rect.width / 2, rect.height / 2);
  const pillRadius = radius(item, outer) - border, buttonRadius = radius(button, box);
  const inside = (x, y) => Math.hypot(
    Math.max(pill.left + pillRadius - x, 0, x - (pill.right - pillRadius)),
    Math.max(pill.top + pillRadius - y, 0, y - (pill.bottom - pillRadius))) <= pillRadius + 0.5;
  const corners = [[box.right - buttonRadius, box.top + buttonRadius, -90],
                   [box.right - buttonRadius, box.bottom - buttonRadius, 0],
                   [box.left + buttonRadius, box.bottom - buttonRadius, 90],
                   [box.left + buttonRadius, box.top + buttonRadius, 180]];
  const outside = [];
  for (const [x, y, from] of corners) {
    for (let angle = from; angle <= from + 90; angle += 5) {
      const radians = angle * Math.PI / 180;
      const point = [x + buttonRadius * Math.cos(radians), y + buttonRadius * Math.sin(radians)];
      if (!inside(...point)) outside.push(point.map(Math.round));
    }
  }
  return outside;
}"""


def test_the_leave_button_lies_inside_its_room_pill(browser: Browser, shots: Shots) -> None:
    server = ScriptedServer()
    page = scripted_page(browser, server)
    page.goto(f"{ORIGIN}/?user=Bob&autoconnect=1&room=general")
    until(page, lambda: len(server.joins) == 1)
    server.answer_joins()
    item = room_item(page, "general")
    expect(item).to_have_attribute("data-state", "joined")
    shots.take(page, "room-pill")
    assert item.evaluate(POINTS_OUTSIDE_THE_PILL) == []
