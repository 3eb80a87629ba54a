"""Bad days, measured: broker faults, drain and death under load, dead clients and churn.

One *case* is one fault on one target (a backend on a broker, as in
``bench/targets.py``). Each case runs real processes: two ``triows serve``
instances behind an HAProxy generated from ``deploy/haproxy.cfg`` (same
settings, the ports this run chose), each instance reaching its broker
through a :class:`bench.faults_proxy.FaultProxy` of its own, so that a
network fault hits one instance only. Receivers (one socket per user) connect
through HAProxy and reconnect through it when closed; the instance each one
landed on is taken from its ``hello``. A sender loop per user POSTs ``/send``
through HAProxy at a fixed overall rate, one request at a time per user, so
each user's messages have an order.

Every message sent is accounted, per phase of its sending (``before``,
``during`` and ``after`` the fault): 2xx (``routed``/``accepted``) and
delivered, 2xx but never delivered (*2xx-but-lost*; of those, how many while
the recipient had a socket open over the whole request), refused (503 from an
instance, 503 from HAProxy, 404, a transport error), duplicated, reordered,
and delivered although refused. Recovery times run from the fault's end to
the first delivery of a message sent after it, and to ``/readyz`` 200 on
every surviving instance. Times are reported, never asserted.

``python -m bench.faults`` runs cases and writes ``bench/results/faults.json``
(merged by case, so runs accumulate) and ``bench/results/faults.md``;
``nox -s faults`` runs the full set. ``tests/test_faults.py`` runs short
versions and asserts the guarantees (never times).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psutil
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from bench.faults_proxy import FaultProxy, open_fault_proxy
from bench.targets import TARGETS, Target, ensure_broker
from deploy.brokers import ACTIVEMQ_DIR, BROKERS, RUN_DIR, SCRIPT, SCRIPT_NAME
from triows.client import open_events
from triows.process import Instance, free_port, serve_instance, wait_for_status
from triows.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"

# When bench/results/matrix.json has no direct rate for a target.
ASSUMED_DIRECT_RATE = 300.0
DEFAULT_RATE_SHARE = 0.30
POLL = 0.05
# Hang guards for the after phase (until recovered) and for the last deliveries.
SETTLE_TIMEOUT = 60.0
DELIVERY_TIMEOUT = 10.0
# The death case's user connected to instance A only, directly, never reconnecting.
PINNED_USER = "pinned-a"
# What one sender loop (one request at a time, through HAProxy) is asked to
# carry, in messages/s; more loops per user make up a higher rate.
LANE_RATE = 8
# Hang guards only.
STEP_TIMEOUT = 60.0
OUTAGE_TIMEOUT = 300.0
HTTP_TIMEOUT = 20.0
DEFAULT_CLOSE_TIMEOUT = Settings().close_timeout
# The "expires" of deploy/brokers.py's triows-amqp10-orphans policy on
# ^amq\.gen- queues (RabbitMQ 3.x keeps a receiver link's queue after detach).
AMQP10_ORPHAN_EXPIRES = 60.0

BROKER_FAULTS = ("outage", "kill", "close", "drop", "halfopen", "slow")
INSTANCE_FAULTS = ("drain", "death")
FAULTS = BROKER_FAULTS + INSTANCE_FAULTS


@dataclass
class Options:
    """What one case runs with; the defaults are the full run's."""

    rate: float | None = None  # messages/s over all users; None: 30 % of the direct rate
    users: int = 8
    before: float = 5.0
    duration: float = 10.0  # how long an outage or a slow network lasts
    stall: float = 25.0  # how long a half-open cut lasts (must exceed heartbeat detection)
    instant_window: float = 5.0  # the "during" phase of an instantaneous fault
    after: float = 10.0
    grace: float = 5.0  # after the last send, how long deliveries may still arrive
    heartbeat: int = 5  # TRIOWS_HEARTBEAT for every instance
    # TRIOWS_QUEUE_EXPIRES (amqp091): an outage of one instance's broker path
    # loses nothing while it is shorter than about this plus heartbeat detection.
    queue_expires: float = Settings().queue_expires
    latency: float = 0.2  # the slow network's added one-way delay per direction
    kill_down: float = 2.0  # how long a SIGKILLed broker stays dead before its restart
    # How long the death and churn cases wait for the broker to forget what it
    # held: on AMQP 1.0/RabbitMQ 3.x until the orphan policy expires the
    # links' queues, plus heartbeat detection and the broker's expiry timer.
    forget_timeout: float = AMQP10_ORPHAN_EXPIRES + 30.0
    # TRIOWS_PING_INTERVAL for every instance: a vanished client is cut within
    # about twice this (TCP keepalive / TCP_USER_TIMEOUT, triows/cli.py).
    ping_interval: float = 2.0


def direct_rate(target: Target) -> float:
    """The target's ``direct`` rate from the last bench matrix, else an assumed one."""
    try:
        rows = json.loads((RESULTS_DIR / "matrix.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return ASSUMED_DIRECT_RATE
    for row in rows:
        if row.get("target") == target.name and row.get("scenario") == "direct":
            return float(row.get("msg_per_s") or ASSUMED_DIRECT_RATE)
    return ASSUMED_DIRECT_RATE


def now() -> float:
    return trio.current_time()


# ------------------------------------------------------------------ brokers


async def run_script(*args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, str(SCRIPT), *args], capture_stdout=True, capture_stderr=True, check=False
    )


async def run_script_checked(*args: str) -> None:
    result = await run_script(*args)
    if result.returncode != 0:
        raise RuntimeError(
            f"{SCRIPT_NAME} {' '.join(args)}: {result.stderr.decode(errors='replace').strip()}"
        )


@asynccontextmanager
async def outage_lock(target: Target) -> AsyncIterator[None]:
    """Hold the broker family's outage lock exclusively, as tests/brokers.py's outage does."""
    fd = os.open(BROKERS[target.broker].lock_path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        await trio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX, abandon_on_cancel=True)
        yield
    finally:
        os.close(fd)


def broker_family(target: Target) -> str:
    """The name ``outage-begin`` takes for the target's broker (its family's)."""
    return BROKERS[target.broker].outage_name or target.family


async def rabbitmqctl(*args: str) -> str:
    result = await trio.run_process(
        ["rabbitmqctl", "-q", *args], capture_stdout=True, capture_stderr=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {result.stderr.decode().strip()}")
    return result.stdout.decode()


def spawned_pid(name: str) -> int:
    return int((RUN_DIR / name / f"{name}.pid").read_text().split()[0])


# ------------------------------------------------------------------ cluster


@dataclass
class Node:
    label: str
    instance_id: str
    instance: Instance
    proxy: FaultProxy
    log: Path

    @property
    def process(self) -> trio.Process:
        return self.instance.process

    @property
    def base_url(self) -> str:
        return self.instance.base_url


@dataclass
class Cluster:
    target: Target
    exchange: str
    nodes: dict[str, Node]
    lb_url: str
    tmp: Path
    stopped: set[str] = field(default_factory=set)  # labels a fault stopped on purpose

    def label_of(self, instance_id: str) -> str:
        for node in self.nodes.values():
            if node.instance_id == instance_id:
                return node.label
        return "?"


def haproxy_config(servers: dict[str, int]) -> str:
    """``deploy/haproxy.cfg`` with this run's instances (the bind comes from the environment)."""
    text = HAPROXY_CFG.read_text()
    text = re.sub(r"^\s*server .*\n", "", text, flags=re.M)
    lines = "".join(f"    server {name} 127.0.0.1:{p} check\n" for name, p in servers.items())
    return text.rstrip("\n") + "\n" + lines


def broker_url_via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    netloc_new = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
    return urlunsplit(parts._replace(netloc=netloc_new))


@asynccontextmanager
async def open_cluster(
    target: Target, opts: Options, *, env: dict[str, str] | None = None
) -> AsyncIterator[Cluster]:
    """Two ready instances, each through its own fault proxy to the broker, behind HAProxy.

    The broker must be running (``deploy/brokers.py start``; the CLI does that).
    """
    broker_port = urlsplit(target.broker_url).port or 5672
    exchange = f"triows-faults-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="triows-faults-") as tmp_name:
        tmp = Path(tmp_name)
        nodes: dict[str, Node] = {}
        both_ready = trio.Event()

        async def hold_node(label: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            instance_id = f"faults-{label}-{secrets.token_hex(3)}"
            log = tmp / f"{label}.log"
            with log.open("wb") as log_file:
                async with (
                    open_fault_proxy(broker_port) as proxy,
                    serve_instance(
                        target.backend,
                        broker_url=broker_url_via(target.broker_url, proxy.port),
                        env={
                            "TRIOWS_EXCHANGE": exchange,
                            "TRIOWS_INSTANCE_ID": instance_id,
                            "TRIOWS_RECONNECT_MAX": "1",
                            "TRIOWS_HEARTBEAT": str(opts.heartbeat),
                            "TRIOWS_QUEUE_EXPIRES": str(opts.queue_expires),
                            "TRIOWS_PING_INTERVAL": str(opts.ping_interval),
                            "TRIOWS_LOG_LEVEL": "INFO",
                            **(env or {}),
                        },
                        stderr=log_file.fileno(),
                    ) as instance,
                ):
                    await instance.wait_ready(STEP_TIMEOUT)
                    nodes[label] = Node(label, instance_id, instance, proxy, log)
                    if len(nodes) == 2:
                        both_ready.set()
                    task_status.started()
                    await trio.sleep_forever()

        async with AsyncExitStack() as stack:
            holders = await stack.enter_async_context(trio.open_nursery())
            stack.callback(holders.cancel_scope.cancel)
            for label in ("a", "b"):
                if target.fragile:
                    # One after the other, each ready before the next (GarageMQ, see tests/e2e.py).
                    await holders.start(hold_node, label)
                else:
                    holders.start_soon(hold_node, label)
            with trio.fail_after(STEP_TIMEOUT * 2):
                await both_ready.wait()
            nodes = {label: nodes[label] for label in ("a", "b")}
            lb_port = free_port()
            cfg = tmp / "haproxy.cfg"
            cfg.write_text(
                haproxy_config({n.label: urlsplit(n.base_url).port or 0 for n in nodes.values()})
            )
            nursery = await stack.enter_async_context(trio.open_nursery())
            haproxy: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    ["haproxy", "-db", "-f", str(cfg)],
                    env={**os.environ, "TRIOWS_HAPROXY_BIND": f"127.0.0.1:{lb_port}"},
                    check=False,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            try:
                lb_url = f"http://127.0.0.1:{lb_port}"
                await wait_for_status(f"{lb_url}/readyz", 200, STEP_TIMEOUT)
                yield Cluster(target, exchange, nodes, lb_url, tmp)
            finally:
                haproxy.terminate()
                nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ traffic


@dataclass
class Send:
    user: str
    seq: int
    t0: float
    t1: float
    phase: str
    status: int  # 0: transport error
    outcome: str = ""  # routed / accepted for a 2xx
    from_lb: bool = False  # a 503 HAProxy gave itself (no instance in rotation)
    lane: int = 0  # which of the user's sender loops: order is per (user, lane)


@dataclass
class Socket:
    user: str
    instance: str  # label
    opened: float
    closed: float | None = None
    code: int | None = None


class Traffic:
    """Receivers and paced senders over a cluster, recording everything."""

    def __init__(self, cluster: Cluster, rate: float, users: int) -> None:
        self.cluster = cluster
        self.rate = rate
        self.users = [f"u{n}" for n in range(users)]
        self.pinned: dict[str, str] = {}  # user -> label: connected there directly, no reconnect
        self.phase = "before"
        self.sends: list[Send] = []
        # user -> (lane, seq, received at), in the order the user's sockets got them
        self.receipts: dict[str, list[tuple[int, int, float]]] = defaultdict(list)
        # Sender loops per user: each sends one request at a time, so enough of
        # them to reach the rate at the latency a loaded machine gives.
        self.lanes = max(1, -(-int(rate) // (users * LANE_RATE)))
        self.sockets: list[Socket] = []
        self.connect_failures = 0
        self.errors: list[str] = []  # the first few unexpected 5xx answers
        self.ready: dict[str, list[tuple[float, int]]] = defaultdict(list)
        self._sending = True

    def stop_sending(self) -> None:
        self._sending = False

    def open_socket(self, user: str) -> Socket | None:
        for sock in reversed(self.sockets):
            if sock.user == user and sock.closed is None:
                return sock
        return None

    async def receiver(self, user: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        pinned = self.pinned.get(user)
        url = self.cluster.nodes[pinned].base_url if pinned else self.cluster.lb_url
        started = False
        while True:
            try:
                async with open_events(url, user=user) as events:
                    sock = Socket(user, self.cluster.label_of(events.hello["instance"]), now())
                    self.sockets.append(sock)
                    if not started:
                        started = True
                        task_status.started()
                    try:
                        while True:
                            frame = await events.receive()
                            if frame.get("type") == "message":
                                body = frame["message"]
                                self.receipts[user].append((body["l"], body["s"], now()))
                    except ConnectionClosed as closed:
                        sock.code = int(closed.reason.code) if closed.reason else 1005
                    finally:
                        sock.closed = now()
            except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError):
                self.connect_failures += 1
            if pinned:
                if not started:
                    task_status.started()
                return
            await trio.sleep(0.1)

    async def sender(self, http: httpx.AsyncClient, user: str, lane: int) -> None:
        loops = len(self.all_users) * self.lanes
        interval = loops / self.rate
        seq = 0
        index = self.all_users.index(user) * self.lanes + lane
        next_at = now() + interval * index / loops
        while self._sending:
            await trio.sleep_until(next_at)
            if not self._sending:
                return
            phase, t0 = self.phase, now()
            body = {"to": user, "from": "faults", "message": {"s": seq, "l": lane}}
            record = Send(user, seq, t0, t0, phase, 0, lane=lane)
            try:
                response = await http.post(f"{self.cluster.lb_url}/send", json=body)
                record.status = response.status_code
                if response.status_code == 202:
                    record.outcome = response.json().get("status", "")
                elif response.status_code == 503:
                    record.from_lb = "problem+json" not in response.headers.get("content-type", "")
                elif (
                    response.status_code >= 500
                    # HAProxy's own 502/504 for a request its instance died on
                    # is counted (status_502), not an error: nobody could answer.
                    and not (
                        response.status_code in (502, 504)
                        and "problem+json" not in response.headers.get("content-type", "")
                    )
                    and len(self.errors) < 5
                ):
                    self.errors.append(f"{response.status_code} {response.text[:300]}")
            except httpx.HTTPError:
                pass
            record.t1 = now()
            self.sends.append(record)
            seq += 1
            next_at = max(next_at + interval, now())

    async def watch_ready(self, http: httpx.AsyncClient, node: Node) -> None:
        last = None
        while node.process.returncode is None:
            try:
                status = (await http.get(f"{node.base_url}/readyz", timeout=2.0)).status_code
            except httpx.HTTPError:
                status = 0
            if status != last:
                self.ready[node.label].append((now(), status))
                last = status
            await trio.sleep(POLL)

    @property
    def all_users(self) -> list[str]:
        return self.users + list(self.pinned)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=len(self.all_users) * self.lanes + 4)
        async with (
            httpx.AsyncClient(timeout=HTTP_TIMEOUT, limits=limits) as http,
            httpx.AsyncClient(timeout=HTTP_TIMEOUT) as probes,
            trio.open_nursery() as nursery,
        ):
            for node in self.cluster.nodes.values():
                nursery.start_soon(self.watch_ready, probes, node)
            with trio.fail_after(STEP_TIMEOUT):
                for user in self.all_users:
                    await nursery.start(self.receiver, user)
            for user in self.all_users:
                for lane in range(self.lanes):
                    nursery.start_soon(self.sender, http, user, lane)
            try:
                yield
            finally:
                nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ accounting


def connected_over(sockets: list[Socket], user: str, t0: float, t1: float) -> Socket | None:
    """The socket of ``user`` open over the whole of ``[t0, t1]``, if any."""
    for sock in sockets:
        if sock.user == user and sock.opened <= t0 and (sock.closed is None or sock.closed >= t1):
            return sock
    return None


def account(traffic: Traffic) -> dict[str, dict[str, int]]:
    """Per phase: what became of every message sent."""
    received: dict[tuple[str, int], int] = defaultdict(int)
    # Order is promised for confirmed messages (DESIGN §6.2). A message whose
    # sender was refused (say, its publish timed out on a silent broker path)
    # may still reach the broker later, after later ones: that is counted
    # apart, as ``late_without_2xx``, not as a reordering.
    confirmed = {(send.user, send.lane, send.seq) for send in traffic.sends if send.status == 202}
    reordered = late_without_2xx = 0
    for user, seqs in traffic.receipts.items():
        highest: dict[int, int] = defaultdict(lambda: -1)
        for lane, seq, _ in seqs:
            received[(user, lane, seq)] += 1
            if received[(user, lane, seq)] == 1 and (user, lane, seq) in confirmed:
                if seq < highest[lane]:
                    reordered += 1
                highest[lane] = max(highest[lane], seq)
            elif received[(user, lane, seq)] == 1 and seq < highest[lane]:
                late_without_2xx += 1
    phases: dict[str, dict[str, int]] = {}
    for send in traffic.sends:
        row = phases.setdefault(send.phase, defaultdict(int))
        count = received.get((send.user, send.lane, send.seq), 0)
        row["sent"] += 1
        if send.status == 202:
            row[f"2xx_{send.outcome}"] += 1
            if count:
                row["delivered"] += 1
            else:
                row["2xx_lost"] += 1
                # Where the recipient's socket was when the request came in.
                at_send = connected_over(traffic.sockets, send.user, send.t0, send.t0)
                row[f"2xx_lost_on_{at_send.instance if at_send else 'none'}"] += 1
                sock = connected_over(traffic.sockets, send.user, send.t0, send.t1)
                if sock is not None:
                    row["2xx_lost_while_connected"] += 1
                    row[f"2xx_lost_while_connected_on_{sock.instance}"] += 1
        elif send.status == 503:
            row["refused_503_lb" if send.from_lb else "refused_503"] += 1
        elif send.status == 404:
            row["refused_404"] += 1
        elif send.status == 0:
            row["transport_error"] += 1
        else:
            row[f"status_{send.status}"] += 1
        if count > 1:
            row["duplicated"] += 1
        if count and send.status != 202:
            row["delivered_without_2xx"] += 1
    total: dict[str, int] = defaultdict(int)
    for row in phases.values():
        for key, value in row.items():
            total[key] += value
    total["reordered"] = reordered
    if late_without_2xx:
        total["late_without_2xx"] = late_without_2xx
    return {**{k: dict(v) for k, v in phases.items()}, "total": dict(total)}


def recovery(traffic: Traffic, fault_end: float, alive: list[str]) -> dict[str, float | None]:
    """Seconds from ``fault_end`` to the first delivery sent after it, and to all-ready."""
    sent_at = {(s.user, s.lane, s.seq): s.t0 for s in traffic.sends}
    firsts = [
        t
        for user, seqs in traffic.receipts.items()
        for lane, seq, t in seqs
        if sent_at.get((user, lane, seq), -1.0) >= fault_end
    ]
    first_delivery = round(min(firsts) - fault_end, 3) if firsts else None
    ready_at: list[float] = []
    for label in alive:
        transitions = traffic.ready.get(label, [])
        if not transitions or transitions[-1][1] != 200:
            return {"first_delivery_s": first_delivery, "all_ready_s": None}
        ready_at.append(max(transitions[-1][0], fault_end))
    all_ready = round(max(ready_at) - fault_end, 3) if ready_at else None
    return {"first_delivery_s": first_delivery, "all_ready_s": all_ready}


def users_resumed(traffic: Traffic, since: float) -> set[str]:
    """The users who got a message sent at or after ``since``."""
    sent_at = {(s.user, s.lane, s.seq): s.t0 for s in traffic.sends}
    return {
        user
        for user, seqs in traffic.receipts.items()
        if any(sent_at.get((user, lane, seq), -1.0) >= since for lane, seq, _ in seqs)
    }


def recovered(traffic: Traffic, fault_end: float, alive: list[str], pinned_404: bool) -> bool:
    """Every user got a message sent after the fault, every surviving instance is ready,
    and (``pinned_404``) a send to a user who was only on the dead instance got a 404."""
    if not set(traffic.users) <= users_resumed(traffic, fault_end):
        return False
    for label in alive:
        transitions = traffic.ready.get(label, [])
        if not transitions or transitions[-1][1] != 200:
            return False
    if pinned_404:
        return any(
            s.user in traffic.pinned and s.status == 404 and s.t0 >= fault_end
            for s in traffic.sends
        )
    return True


async def wait_delivered(traffic: Traffic, timeout: float) -> None:
    """Wait (at most ``timeout``) until every message answered 2xx has been received."""
    with trio.move_on_after(timeout):
        while True:
            received = {
                (user, lane, seq)
                for user, seqs in traffic.receipts.items()
                for lane, seq, _ in seqs
            }
            if all((s.user, s.lane, s.seq) in received for s in traffic.sends if s.status == 202):
                return
            await trio.sleep(0.1)


def first_404(traffic: Traffic, since: float) -> float | None:
    """Seconds from ``since`` to the first 404 for a pinned user (one only on the dead instance)."""
    answered = [
        s.t1
        for s in traffic.sends
        if s.user in traffic.pinned and s.status == 404 and s.t0 >= since
    ]
    return round(min(answered) - since, 3) if answered else None


def sessions_lost(cluster: Cluster) -> dict[str, list[str]]:
    """Per instance, why each lost broker session ended, as logged (first 100 chars)."""
    reasons: dict[str, list[str]] = {}
    for label, node in cluster.nodes.items():
        for line in node.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            # backends.supervisor via triows.backoff: one line per lost session.
            if isinstance(entry, dict) and entry.get("event") == "broker_unavailable":
                reasons.setdefault(label, []).append(str(entry.get("error"))[:100])
    return reasons


def log_tails(cluster: Cluster, lines: int = 15) -> dict[str, list[str]]:
    """The last warnings and errors each instance logged."""
    tails = {}
    for label, node in cluster.nodes.items():
        logged = node.log.read_text(errors="replace").splitlines()
        # Long lines are tracebacks: their end says what went wrong.
        tails[label] = [
            line if len(line) <= 800 else f"{line[:300]} ... {line[-500:]}"
            for line in logged
            if '"info"' not in line
        ][-lines:]
    return tails


def sent_rate(traffic: Traffic) -> float:
    """The rate the senders achieved (they fall behind when requests are slow)."""
    times = [send.t0 for send in traffic.sends]
    return round(len(times) / (max(times) - min(times)), 1) if len(times) > 1 else 0.0


def first_unready(traffic: Traffic, label: str, since: float) -> float | None:
    """Seconds from ``since`` to the first non-200 ``/readyz`` of ``label``."""
    for t, status in traffic.ready.get(label, []):
        if t >= since and status != 200:
            return round(t - since, 3)
    return None


def process_stats(node: Node) -> dict[str, float]:
    proc = psutil.Process(node.process.pid)
    return {"rss_mib": round(proc.memory_info().rss / 2**20, 1), "fds": proc.num_fds()}


# ------------------------------------------------------------------ faults


@dataclass
class Clock:
    """When the fault began and ended, and what its phases were."""

    traffic: Traffic
    begin: float = 0.0
    end: float = 0.0
    during_until: float = 0.0

    def began(self) -> None:
        self.begin = now()
        self.traffic.phase = "during"

    def ended(self, *, window: float = 0.0) -> None:
        """The fault is over; the ``during`` phase lasts ``window`` more seconds."""
        self.end = now()
        self.during_until = self.end + window


FaultRun = Callable[[Cluster, Traffic, Clock, Options], Awaitable[dict[str, Any]]]


async def fault_outage(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """The broker stopped gracefully for ``opts.duration`` seconds, then started."""
    target = cluster.target
    if target.family == "garagemq":
        # The script has no outage for GarageMQ; stop/start is the same (its own process).
        clock.began()
        await run_script_checked("stop", "garagemq")
        await trio.sleep(opts.duration)
        await run_script_checked("start", "garagemq")
        clock.ended()
        return {"how": "deploy/brokers.py stop garagemq; sleep; start garagemq"}
    family = broker_family(target)
    async with outage_lock(target):
        clock.began()
        await run_script_checked("outage-begin", family)
        try:
            await trio.sleep(opts.duration)
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(OUTAGE_TIMEOUT):
                await run_script_checked("outage-end", family)
        clock.ended()
    return {"how": f"deploy/brokers.py outage-begin {family}; sleep; outage-end {family}"}


async def fault_kill(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """SIGKILL the broker process, restart it after ``opts.kill_down`` s."""
    target = cluster.target
    name = target.broker
    if target.family == "garagemq":
        pid = spawned_pid(name)
        clock.began()
        os.kill(pid, signal.SIGKILL)
        await trio.sleep(opts.kill_down)
        await run_script_checked("start", name)
        clock.ended()
        return {"how": f"kill -KILL {pid} ({name}); deploy/brokers.py start {name}"}
    # RabbitMQ and ActiveMQ: under their outage lock, which brokers.py start
    # would take; outage-end brings them back (RabbitMQ: boots the node, with
    # the plugins and policies it keeps on disk).
    family = broker_family(target)
    async with outage_lock(target):
        if target.family == "rabbitmq":  # its Erlang VM, asked of the node itself
            pid = int((await rabbitmqctl("eval", "os:getpid().")).strip().strip('"'))
        else:
            pid = spawned_pid(name)
        clock.began()
        os.kill(pid, signal.SIGKILL)
        await trio.sleep(opts.kill_down)
        with trio.CancelScope(shield=True), trio.fail_after(OUTAGE_TIMEOUT):
            await run_script_checked("outage-end", family)
        clock.ended()
    return {"how": f"kill -KILL {pid} ({name}); deploy/brokers.py outage-end {family}"}


class NotPossible(Exception):
    """This fault cannot be provoked on this target here; the message says why."""


async def rabbitmq_connection_pids(ports: list[int], backend: str) -> list[str]:
    # STOMP connections are listed by their own command; ``connection`` is the
    # pid of the connection the plugin opened inside the broker for it.
    if backend == "stomp":
        out = await rabbitmqctl("list_stomp_connections", "connection", "peer_port")
    else:
        out = await rabbitmqctl("list_connections", "pid", "peer_port")
    pids = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit() and int(fields[1]) in ports:
            pids.append(fields[0])
    return pids


async def fault_close(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """The broker closes instance A's connection (``rabbitmqctl close_connection``)."""
    if cluster.target.family != "rabbitmq":
        raise NotPossible(
            f"{cluster.target.family} has no command-line tool here that closes one client "
            "connection (ActiveMQ: JMX is not exposed by this setup; GarageMQ: none); "
            "the 'drop' row closes it at TCP level instead"
        )
    if cluster.target.backend == "amqp10":
        raise NotPossible(
            "RabbitMQ 3.10 lists AMQP 1.0 connections (list_amqp10_connections) without "
            "their peer port, so one instance's connection cannot be told apart from other "
            "clients' on this shared broker; the 'drop' row closes it at TCP level instead"
        )
    node = cluster.nodes["a"]
    pids = await rabbitmq_connection_pids(node.proxy.upstream_ports, cluster.target.backend)
    if not pids:
        raise RuntimeError(
            f"rabbitmqctl lists no connection from ports {node.proxy.upstream_ports}"
        )
    clock.began()
    for pid in pids:
        await rabbitmqctl("close_connection", pid, "triows fault harness")
    clock.ended(window=opts.instant_window)
    return {
        "how": 'rabbitmqctl close_connection "<pid>" reason (pid by peer_port)',
        "closed": len(pids),
    }


async def fault_drop(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """Instance A's broker connection closed at TCP level (the proxy closes both sides)."""
    clock.began()
    cluster.nodes["a"].proxy.cut()
    clock.ended(window=opts.instant_window)
    return {"how": "proxy closes instance A's broker connection (FIN both ways)"}


async def fault_halfopen(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """Instance A's path to the broker goes silent (no FIN, no RST) for ``opts.stall`` s."""
    proxy = cluster.nodes["a"].proxy
    clock.began()
    proxy.stall()
    await trio.sleep(opts.stall)
    proxy.resume()
    clock.ended()
    return {
        "how": f"proxy stops forwarding A<->broker for {opts.stall:g} s without closing",
        "heartbeat_s": opts.heartbeat,
        "a_unready_after_s": first_unready(traffic, "a", clock.begin),
    }


async def fault_slow(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """Both instances' broker paths delay every chunk by ``opts.latency`` s each way."""
    clock.began()
    for node in cluster.nodes.values():
        node.proxy.delay = opts.latency
    await trio.sleep(opts.duration)
    for node in cluster.nodes.values():
        node.proxy.delay = 0.0
    clock.ended()
    return {"how": f"proxy adds {opts.latency * 1000:g} ms each way for {opts.duration:g} s"}


async def fault_drain(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """SIGTERM instance A under traffic; it drains and exits."""
    node = cluster.nodes["a"]
    on_a = [s.user for s in traffic.sockets if s.instance == "a" and s.closed is None]
    unready: float | None = None
    # When each /readyz that answered 200 was asked, since SIGTERM.
    ready_asked: list[float] = []

    async def poll_readyz() -> None:
        # Back to back, not every POLL: the first socket may close within milliseconds.
        nonlocal unready
        async with httpx.AsyncClient(timeout=2.0) as http:
            while unready is None:
                asked = now()
                try:
                    status = (await http.get(f"{node.base_url}/readyz")).status_code
                except httpx.HTTPError:
                    status = 0
                if status != 200:
                    unready = now()
                else:
                    ready_asked.append(asked)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poll_readyz)
        await trio.sleep(0.2)  # the poller's connection is open and polling
        clock.began()
        cluster.stopped.add("a")
        node.instance.terminate()
        with trio.fail_after(STEP_TIMEOUT):
            await node.process.wait()
        clock.ended()
        nursery.cancel_scope.cancel()
    exit_s = round(clock.end - clock.begin, 3)
    closes = [s for s in traffic.sockets if s.instance == "a" and s.closed is not None]
    first_close = min((s.closed for s in closes if s.closed), default=None)
    return {
        "how": "kill -TERM <instance A>",
        "exit_code": node.process.returncode,
        "exit_s": exit_s,
        "sockets_on_a": len(on_a),
        "close_codes": sorted({s.code for s in closes if s.code is not None}),
        "readyz_503_before_first_close": (
            None if unready is None or first_close is None else unready <= first_close
        ),
        # Decidable from outside, whatever the latencies: a /readyz asked after a
        # client had already seen its socket closed, answered 200 all the same.
        "readyz_200_after_first_close": (
            first_close is not None and any(asked > first_close for asked in ready_asked)
        ),
        "readyz_503_s": None if unready is None else round(unready - clock.begin, 3),
        "first_close_s": None if first_close is None else round(first_close - clock.begin, 3),
    }


async def broker_side_count(cluster: Cluster, instance_id: str) -> dict[str, int] | None:
    """What the broker holds for instance ``instance_id`` and for the exchange (RabbitMQ only)."""
    if cluster.target.family != "rabbitmq":
        return None
    queues = await rabbitmqctl("list_queues", "name")
    bindings = [
        line.split("\t")
        for line in (await rabbitmqctl("list_bindings", "source_name", "routing_key")).splitlines()
    ]
    ours = [fields for fields in bindings if fields[0] == cluster.exchange]
    return {
        "queue": sum(1 for line in queues.split() if instance_id in line),
        "bindings": len(ours),
        # The pinned user of the death case is subscribed on instance A only.
        "pinned_bindings": sum(1 for fields in ours if fields[-1] == f"user.{PINNED_USER}"),
    }


async def bound_keys(cluster: Cluster) -> set[str] | None:
    """The routing keys bound on the cluster's exchange (RabbitMQ only, else None)."""
    if cluster.target.family != "rabbitmq":
        return None
    listed = await rabbitmqctl("list_bindings", "source_name", "routing_key")
    return {
        fields[-1]
        for fields in (line.split("\t") for line in listed.splitlines())
        if fields[0] == cluster.exchange
    }


# The line ActiveMQ's TopicRegion logs (INFO) when it drops a durable
# subscription offline for longer than offlineDurableSubscriberTimeout
# (deploy/activemq/activemq.xml); no management port is open to ask instead.
ACTIVEMQ_LOG = ACTIVEMQ_DIR / "activemq.log"
ACTIVEMQ_EXPIRED = "Destroying durable subscriber due to inactivity: DurableTopicSubscription-"


def activemq_log_size() -> int:
    try:
        return ACTIVEMQ_LOG.stat().st_size
    except OSError:
        return 0


def activemq_expired(instance_id: str, since: int) -> dict[str, int]:
    """A's durable subscriptions that ActiveMQ's log says expired after byte ``since``.

    The STOMP backend's client-id and subscription names both begin with
    ``triows.<instance id>.``; a subscription name ends with its key.
    """
    with open(ACTIVEMQ_LOG, "rb") as log:
        log.seek(since)
        text = log.read().decode(errors="replace")
    ours = [
        line for line in text.splitlines() if f"{ACTIVEMQ_EXPIRED}triows.{instance_id}." in line
    ]
    return {
        "expired": len(ours),
        "pinned_expired": sum(1 for line in ours if f".user.{PINNED_USER}," in line),
    }


async def fault_death(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """SIGKILL instance A under traffic; the broker must forget what it held for A."""
    node = cluster.nodes["a"]
    before = await broker_side_count(cluster, node.instance_id)
    log_start = activemq_log_size()
    clock.began()
    cluster.stopped.add("a")
    node.process.kill()
    await node.process.wait()
    clock.ended(window=opts.instant_window)
    forgotten_s = None
    after = before
    if cluster.target.family == "activemq" and ACTIVEMQ_LOG.exists():
        # Offline durable subscriptions expire after 30 s, checked every 5 s.
        with trio.move_on_after(opts.forget_timeout):
            while True:
                after = activemq_expired(node.instance_id, log_start)
                if after["pinned_expired"]:
                    forgotten_s = round(now() - clock.begin, 3)
                    break
                await trio.sleep(0.5)
    if before is not None:
        with trio.move_on_after(opts.forget_timeout):
            while True:
                after = await broker_side_count(cluster, node.instance_id)
                assert after is not None
                if after["queue"] == 0 and after["pinned_bindings"] == 0:
                    forgotten_s = round(now() - clock.begin, 3)
                    break
                await trio.sleep(0.2)
    return {
        "how": "kill -KILL <instance A>",
        "broker_before": before,
        "broker_after": after,
        "broker_forgot_s": forgotten_s,
    }


FAULT_RUNS: dict[str, FaultRun] = {
    "outage": fault_outage,
    "kill": fault_kill,
    "close": fault_close,
    "drop": fault_drop,
    "halfopen": fault_halfopen,
    "slow": fault_slow,
    "drain": fault_drain,
    "death": fault_death,
}


async def run_case(target: Target, fault: str, opts: Options) -> dict[str, Any]:
    """One fault on one target under steady traffic; the accounting and times as a dict."""
    rate = opts.rate or round(direct_rate(target) * DEFAULT_RATE_SHARE, 1)
    started = time.time()
    async with open_cluster(target, opts) as cluster:
        traffic = Traffic(cluster, rate, opts.users)
        if fault == "death":
            traffic.pinned[PINNED_USER] = "a"
        async with traffic.running():
            await trio.sleep(opts.before)
            before_sockets = {
                label: sum(1 for s in traffic.sockets if s.closed is None and s.instance == label)
                for label in cluster.nodes
            }
            clock = Clock(traffic)
            try:
                details = await FAULT_RUNS[fault](cluster, traffic, clock, opts)
            except NotPossible as why:
                return {
                    "target": target.name,
                    "fault": fault,
                    "status": "not possible",
                    "why": str(why),
                }
            if clock.during_until > now():
                await trio.sleep_until(clock.during_until)
            traffic.phase = "after"
            await trio.sleep(opts.after)
            alive = [label for label in cluster.nodes if label not in cluster.stopped]
            # The after phase lasts until the system has recovered (or a hang
            # guard), so that what is counted never depends on how fast that was.
            waiting_for_404 = fault == "death" and target.backend == "amqp091"
            settled_after = now()
            with trio.move_on_after(SETTLE_TIMEOUT):
                while not recovered(traffic, clock.end, alive, waiting_for_404):  # noqa: ASYNC110
                    await trio.sleep(POLL)
            settled_after = round(now() - settled_after, 3)
            traffic.stop_sending()
            await trio.sleep(opts.grace)
            await wait_delivered(traffic, DELIVERY_TIMEOUT)
            if fault == "death":
                details["pinned_first_404_s"] = first_404(traffic, clock.begin)
            exited = {
                label: cluster.nodes[label].process.returncode
                for label in alive
                if cluster.nodes[label].process.returncode is not None
            }
            closed_sockets = [
                {
                    "user": s.user,
                    "instance": s.instance,
                    "code": s.code,
                    "at_s": round(s.closed - clock.begin, 3),
                }
                for s in traffic.sockets
                if s.closed is not None and s.closed >= clock.begin
            ]
            stats = {
                label: process_stats(cluster.nodes[label]) for label in alive if label not in exited
            }
            sent_at = {(s.user, s.lane, s.seq): s.t0 for s in traffic.sends}
            resumed = sorted(
                user
                for user, seqs in traffic.receipts.items()
                if any(sent_at.get((user, lane, seq), -1.0) >= clock.end for lane, seq, _ in seqs)
            )
            resumed_all = set(traffic.users) <= set(resumed)
            return {
                "target": target.name,
                "fault": fault,
                "status": "ok",
                "rate": rate,
                "sent_per_s": sent_rate(traffic),
                "lanes": traffic.lanes,
                "options": asdict(opts),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
                "fault_s": round(clock.end - clock.begin, 3),
                "after_extended_s": settled_after,
                "sockets_before": before_sockets,
                "unexpected_exits": exited,
                "sockets_closed": closed_sockets,
                "connect_failures": traffic.connect_failures,
                "accounting": account(traffic),
                # Users (HAProxy-connected; pinned ones are gone with their instance)
                # that got a message sent after the fault's end: subscriptions restored.
                "users": len(traffic.users),
                "users_resumed": len([u for u in resumed if u in traffic.users]),
                "recovery": recovery(traffic, clock.end, alive),
                "instances": stats,
                "details": details,
                "errors": traffic.errors,
                # What the instances logged, kept when something went wrong.
                "log_tail": (
                    log_tails(cluster) if traffic.errors or exited or not resumed_all else {}
                ),
                "sessions_lost": sessions_lost(cluster),
            }


# ------------------------------------------------------------------ churn, fanout, dead clients


async def run_fanout(target: Target, sockets: int, messages: int, opts: Options) -> dict[str, Any]:
    """One user with ``sockets`` sockets on instance B; messages POSTed to A reach each socket."""
    async with (
        open_cluster(target, opts) as cluster,
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http,
    ):
        b = cluster.nodes["b"]
        counts: list[list[int]] = []
        async with trio.open_nursery() as nursery:
            opened = trio.Semaphore(0)
            done = trio.Event()

            async def holder(index: int) -> None:
                got: list[int] = []
                counts.append(got)
                async with open_events(b.base_url, user="many") as events:
                    opened.release()
                    while len(got) < messages:
                        frame = await events.receive()
                        if frame.get("type") == "message":
                            got.append(frame["message"]["s"])
                    await done.wait()

            for index in range(sockets):
                nursery.start_soon(holder, index)
            with trio.fail_after(STEP_TIMEOUT * 2):
                for _ in range(sockets):
                    await opened.acquire()
            statuses = []
            for seq in range(messages):
                response = await http.post(
                    f"{cluster.nodes['a'].base_url}/send",
                    json={"to": "many", "from": "faults", "message": {"s": seq}},
                )
                statuses.append(response.status_code)
            with trio.move_on_after(STEP_TIMEOUT):
                while sum(len(c) for c in counts) < sockets * messages:  # noqa: ASYNC110
                    await trio.sleep(POLL)
            done.set()
            nursery.cancel_scope.cancel()
        complete = sum(1 for c in counts if c == list(range(messages)))
        return {
            "target": target.name,
            "fault": "fanout",
            "status": "ok",
            "sockets": sockets,
            "messages": messages,
            "sends_2xx": statuses.count(202),
            "sockets_complete_in_order": complete,
            "frames_received": sum(len(c) for c in counts),
            "instance_b": process_stats(b),
        }


async def settled_stats(cluster: Cluster) -> dict[str, Any]:
    await trio.sleep(1.0)
    stats: dict[str, Any] = {label: process_stats(node) for label, node in cluster.nodes.items()}
    side = await broker_side_count(cluster, "-")
    if side is not None:
        stats["broker_bindings"] = side["bindings"]
    return stats


# Cycles between two RSS samples of the churn case.
CHURN_SAMPLE_CYCLES = 1000


async def run_churn(
    target: Target, cycles: int, opts: Options, concurrency: int = 20
) -> dict[str, Any]:
    """``cycles`` connect/disconnect cycles over both instances (users u0..u9, many sockets)."""
    async with open_cluster(target, opts) as cluster:
        urls = [node.base_url for node in cluster.nodes.values()]

        # Warm up first: the first connections allocate what later ones reuse.
        async def cycle(n: int) -> None:
            async with open_events(urls[n % 2], user=f"u{n % 10}"):
                pass

        for n in range(min(50, cycles)):
            await cycle(n)
        baseline = await settled_stats(cluster)
        failures = 0
        limiter = trio.CapacityLimiter(concurrency)

        async def limited(n: int) -> None:
            nonlocal failures
            async with limiter:
                try:
                    await cycle(n)
                except (OSError, HandshakeError, ConnectionClosed):
                    failures += 1

        # RSS after every CHURN_SAMPLE_CYCLES cycles: a leak per cycle shows as
        # a slope that one before/after pair (allocator noise) cannot show.
        samples: dict[str, list[tuple[int, float]]] = {label: [] for label in cluster.nodes}
        with trio.fail_after(max(600.0, cycles * 0.2)):
            for start in range(0, cycles, CHURN_SAMPLE_CYCLES):
                async with trio.open_nursery() as nursery:
                    for n in range(start, min(cycles, start + CHURN_SAMPLE_CYCLES)):
                        nursery.start_soon(limited, n)
                for label, node in cluster.nodes.items():
                    done = min(cycles, start + CHURN_SAMPLE_CYCLES)
                    samples[label].append((done, process_stats(node)["rss_mib"]))
        # Settle: the last unsubscribes reach the broker. On AMQP 1.0 a
        # detached link's queue (and its binding) goes only when the expiry
        # policy removes it (AMQP10_ORPHAN_EXPIRES): wait for that, bounded.
        await trio.sleep(2.0)
        settled = await settled_stats(cluster)
        started = now()
        with trio.move_on_after(opts.forget_timeout):
            while settled.get("broker_bindings", 0) > baseline.get("broker_bindings", 0):
                await trio.sleep(1.0)
                settled = await settled_stats(cluster)
        bindings_settled_s = round(now() - started, 1)
        alive = all(node.process.returncode is None for node in cluster.nodes.values())
        return {
            "target": target.name,
            "fault": "churn",
            "status": "ok",
            "cycles": cycles,
            "failures": failures,
            "alive": alive,
            "baseline": baseline,
            "settled": settled,
            "bindings_settled_s": bindings_settled_s,
            "rss_samples": samples,
            "rss_slope_kib_per_1000_cycles": {
                label: rss_slope(points) for label, points in samples.items()
            },
        }


def rss_slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares growth of RSS in KiB per 1,000 cycles over ``(cycles, rss_mib)``
    samples, the first (warm-up) left out; None with fewer than three left."""
    points = points[1:]
    if len(points) < 3:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
    return round(slope * 1000 * 1024, 1)


# What is sent to the dead clients meanwhile: a few of these fill the tight
# proxy's window, after which the instance's writes to the silent socket
# wait, as they would towards a vanished peer.
DEAD_CLIENT_PADDING = "x" * 8192


def dead_client_wait(opts: Options) -> float:
    """How long a vanished client may go unnoticed before giving up (a hang guard).

    Written to, the silent socket is cut by the instance's write deadline
    (TRIOWS_CLOSE_TIMEOUT, default 5 s; measured: 7-8 s to the broker's 404,
    whatever the ping interval) or by TCP_USER_TIMEOUT (twice the ping
    interval); idle, by TCP keepalive after the ping interval plus 3 probes
    (twice the interval). The idle path cannot be shown through a loopback
    proxy: the proxy's kernel answers the probes. Three times the larger bound
    leaves room for a loaded machine.
    """
    return 3 * max(DEFAULT_CLOSE_TIMEOUT, 2 * opts.ping_interval)


async def run_dead_client(target: Target, opts: Options, wait: float) -> dict[str, Any]:
    """A client whose socket goes silent (half-open) and one whose process is killed.

    Both are connected to instance B directly, the first through a proxy that
    stalls. Reports how long until the broker reports each user offline (404
    on ``routed`` targets) and whether that happened within ``wait`` seconds.
    """
    async with (
        open_cluster(target, opts) as cluster,
        httpx.AsyncClient(timeout=HTTP_TIMEOUT) as http,
    ):
        b = cluster.nodes["b"]
        b_port = urlsplit(b.base_url).port or 0
        result: dict[str, Any] = {"target": target.name, "fault": "dead-client", "status": "ok"}
        async with open_fault_proxy(b_port, tight=True) as proxy, trio.open_nursery() as nursery:
            ready = trio.Event()

            async def silent_client() -> None:
                async with open_events(f"http://127.0.0.1:{proxy.port}", user="ghost"):
                    ready.set()
                    await trio.sleep_forever()

            nursery.start_soon(silent_client)
            await ready.wait()
            killed = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-c",
                    "import sys,trio;from triows.client import open_events\n"
                    "async def m():\n"
                    f"  async with open_events({b.base_url!r}, user='killed'):\n"
                    "    print('open', flush=True); await trio.sleep_forever()\n"
                    "trio.run(m)",
                ],
                stdout=subprocess.PIPE,
            )
            assert killed.stdout is not None
            await killed.stdout.receive_some(10)
            for user in ("ghost", "killed"):
                response = await http.post(
                    f"{cluster.nodes['a'].base_url}/send", json={"to": user, "message": "x"}
                )
                result[f"{user}_before"] = response.status_code
            start = now()
            proxy.stall()
            killed.kill()
            await killed.wait()
            gone: dict[str, float | None] = {"ghost": None, "killed": None}
            # Released: the broker says offline (404, amqp091) or, on RabbitMQ,
            # holds no binding for the user's key any more (every backend there).
            observable = target.backend == "amqp091" or target.family == "rabbitmq"
            result["release_observable"] = observable
            with trio.move_on_after(wait if observable else 0):
                while any(v is None for v in gone.values()):
                    keys = await bound_keys(cluster)
                    for user in gone:
                        if gone[user] is None:
                            response = await http.post(
                                f"{cluster.nodes['a'].base_url}/send",
                                json={"to": user, "message": DEAD_CLIENT_PADDING},
                            )
                            unbound = keys is not None and f"user.{user}" not in keys
                            if response.status_code == 404 or unbound:
                                gone[user] = round(now() - start, 3)
                    await trio.sleep(0.2)
            result["half_open_released_s"] = gone["ghost"]
            result["killed_released_s"] = gone["killed"]
            result["waited_s"] = wait
            result["alive"] = all(n.process.returncode is None for n in cluster.nodes.values())
            proxy.resume()
            nursery.cancel_scope.cancel()
        return result


# ------------------------------------------------------------------ results


def merge_results(
    rows: list[dict[str, Any]], path: Path = RESULTS_DIR / "faults.json"
) -> list[dict[str, Any]]:
    """Merge ``rows`` into ``path`` by (target, fault); return all rows."""
    try:
        existing = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError):
        existing = []
    keyed = {(r["target"], r["fault"]): r for r in existing}
    for row in rows:
        keyed[(row["target"], row["fault"])] = row
    merged = sorted(keyed.values(), key=lambda r: (r["target"], FAULT_ORDER.get(r["fault"], 99)))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"suite": "triows-faults", "rows": merged}, indent=1) + "\n")
    (path.with_suffix(".md")).write_text(markdown(merged))
    return merged


FAULT_ORDER = {name: n for n, name in enumerate((*FAULTS, "dead-client", "churn", "fanout"))}


def _fmt(value: Any) -> str:
    return "-" if value is None else str(value)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Fault runs (bench/faults.py)",
        "",
        "Per case: messages 2xx / delivered / 2xx-but-lost (of which while the recipient "
        "was connected) / refused (503 instance, 503 HAProxy, 404, transport error) / "
        "duplicated / reordered, over the whole run; `during` = sent while the fault lasted. "
        "Recovery: seconds from the fault's end to the first delivery of a message sent "
        "after it, and to /readyz 200 on every surviving instance.",
        "",
        "| target | fault | rate msg/s asked / sent | 2xx | delivered | 2xx-but-lost (connected) | "
        "refused during: 503 / lb503 / 404 / err | dup | reord | first delivery s | all ready s | "
        "alive | notes | command |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|---|",
    ]
    for row in rows:
        command = f"`python -m bench.faults --target {row['target']} --fault {row['fault']}`"
        if row["status"] != "ok":
            lines.append(
                f"| {row['target']} | {row['fault']} | | | | | | | | | | | "
                f"{row['status']}: {row.get('why', '')} | {command} |"
            )
            continue
        if row["fault"] in ("fanout", "churn", "dead-client"):
            lines.append(
                f"| {row['target']} | {row['fault']} | | | | | | | | | | "
                f"{_fmt(row.get('alive', True))} | {_extra_notes(row)} | {command} |"
            )
            continue
        total = row["accounting"]["total"]
        recovered = row["recovery"]
        during = row["accounting"].get("during", {})
        two = total.get("2xx_routed", 0) + total.get("2xx_accepted", 0)
        refused = " / ".join(
            str(during.get(k, 0))
            for k in ("refused_503", "refused_503_lb", "refused_404", "transport_error")
        )
        lines.append(
            f"| {row['target']} | {row['fault']} | {row['rate']:g} / {row.get('sent_per_s', 0):g} "
            f"| {two} "
            f"| {total.get('delivered', 0)} "
            f"| {total.get('2xx_lost', 0)} ({total.get('2xx_lost_while_connected', 0)}) "
            f"| {refused} | {total.get('duplicated', 0)} | {total.get('reordered', 0)} "
            f"| {_fmt(recovered['first_delivery_s'])} | {_fmt(recovered['all_ready_s'])} | "
            f"{'yes' if not row['unexpected_exits'] else 'NO ' + str(row['unexpected_exits'])} | "
            f"{_extra_notes(row)} | {command} |"
        )
    return "\n".join(lines) + "\n"


def _extra_notes(row: dict[str, Any]) -> str:
    fault = row["fault"]
    if fault == "fanout":
        return (
            f"{row['sockets']} sockets x {row['messages']} msgs: "
            f"{row['sockets_complete_in_order']} "
            f"sockets got all in order; RSS {row['instance_b']['rss_mib']} MiB"
        )
    if fault == "churn":
        b, s = row["baseline"], row["settled"]
        parts = [f"{row['cycles']} cycles, {row['failures']} failed"]
        for label in ("a", "b"):
            parts.append(
                f"{label}: fds {b[label]['fds']}→{s[label]['fds']}, "
                f"RSS {b[label]['rss_mib']}→{s[label]['rss_mib']} MiB"
            )
        if "broker_bindings" in s:
            parts.append(f"bindings {b['broker_bindings']}→{s['broker_bindings']}")
        for label, slope in row.get("rss_slope_kib_per_1000_cycles", {}).items():
            if slope is not None:
                parts.append(f"{label}: RSS {slope:+} KiB per 1,000 cycles")
        return "; ".join(parts)
    if fault == "dead-client":
        if not row.get("release_observable", True):
            return "release not observable here (STOMP on ActiveMQ: no 404, no binding list)"
        return (
            f"killed client released after {_fmt(row['killed_released_s'])} s; half-open client "
            f"after {_fmt(row['half_open_released_s'])} s (waited {row['waited_s']} s)"
        )
    details = row.get("details", {})
    closed = row.get("sockets_closed", [])
    notes = [f"sockets closed: {len(closed)}"]
    codes = sorted({c["code"] for c in closed if c["code"] is not None})
    if codes:
        notes[-1] += f" (codes {codes})"
    for key in (
        "exit_code",
        "exit_s",
        "readyz_503_before_first_close",
        "a_unready_after_s",
        "broker_forgot_s",
        "pinned_first_404_s",
        "heartbeat_s",
    ):
        if key in details:
            notes.append(f"{key}={_fmt(details[key])}")
    return "; ".join(notes)


# ------------------------------------------------------------------ CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.faults", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--target", action="append", choices=[t for t in TARGETS if t != "memory"])
    parser.add_argument(
        "--fault", action="append", choices=[*FAULTS, "dead-client", "churn", "fanout"]
    )
    parser.add_argument(
        "--rate", type=float, help="messages/s over all users (default 30 %% of direct)"
    )
    parser.add_argument("--quick", action="store_true", help="short phases (seconds each)")
    parser.add_argument("--cycles", type=int, default=10_000, help="churn cycles")
    parser.add_argument("--sockets", type=int, default=1000, help="fanout sockets")
    parser.add_argument(
        "--dead-client-wait", type=float, default=None, help="default: from the ping interval"
    )
    return parser.parse_args(argv)


def ci_options() -> Options:
    """The shortest phases that still show each fault (tests/test_faults.py)."""
    return Options(
        rate=30.0,
        users=4,
        before=1.0,
        duration=3.0,
        # Longer than aiormq's detection of a silent broker, (heartbeat + 1) * 3 s.
        stall=12.0,
        instant_window=1.5,
        after=2.0,
        grace=1.0,
        # 2 s, not 1: at 1 s AMQP 1.0 sessions timed out on their own (local
        # idle timeout) while this shared VM ran at a quarter of its speed.
        heartbeat=2,
        # Outlasts the half-open stall (the broker drops the silent connection
        # within seconds, the path heals after ``stall``).
        queue_expires=20.0,
        kill_down=1.0,
        forget_timeout=35.0,
    )


def quick_options(rate: float | None = None) -> Options:
    # aiormq notices a silent peer after (heartbeat + 1) * 3 s: 6 s at 1 s.
    return Options(
        rate=rate or 40.0,
        users=4,
        before=2.0,
        duration=4.0,
        stall=9.0,
        instant_window=2.0,
        after=4.0,
        grace=3.0,
        heartbeat=1,
        kill_down=1.0,
    )


async def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    opts = quick_options(args.rate) if args.quick else Options(rate=args.rate)
    targets = args.target or [t for t in TARGETS if t != "memory"]
    faults = args.fault or [*FAULTS, "dead-client", "churn", "fanout"]
    for name in targets:
        target = TARGETS[name]
        ensure_broker(target)
        for fault in faults:
            print(f"faults: {name} {fault} ...", file=sys.stderr, flush=True)
            try:
                if fault == "fanout":
                    row = await run_fanout(target, args.sockets, 20, opts)
                elif fault == "churn":
                    row = await run_churn(target, args.cycles, opts)
                elif fault == "dead-client":
                    row = await run_dead_client(
                        target, opts, args.dead_client_wait or dead_client_wait(opts)
                    )
                else:
                    row = await run_case(target, fault, opts)
            except Exception as error:
                if os.environ.get("TRIOWS_FAULTS_RAISE"):
                    raise
                row = {"target": name, "fault": fault, "status": "error", "why": repr(error)[:300]}
            print(json.dumps(row)[:2000], file=sys.stderr, flush=True)
            merge_results([row])


if __name__ == "__main__":
    trio.run(main)
