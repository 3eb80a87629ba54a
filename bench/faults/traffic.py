"""Receivers and paced senders over a cluster, and the clock of a fault's phases."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed, HandshakeError

from bench.faults.cluster import Cluster, Node
from bench.faults.options import HTTP_TIMEOUT, LANE_RATE, POLL, STEP_TIMEOUT
from triows.client import open_events


def now() -> float:
    return trio.current_time()


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
    detail: str = ""  # a refusal's problem detail, as the instance gave it


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
        # Labels: every send to this instance, every receiver's socket on that
        # one (directly, reconnecting there), instead of both through HAProxy.
        self.send_to: str | None = None
        self.receive_on: str | None = None

    def stop_sending(self) -> None:
        self._sending = False

    def open_socket(self, user: str) -> Socket | None:
        for sock in reversed(self.sockets):
            if sock.user == user and sock.closed is None:
                return sock
        return None

    async def receiver(self, user: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        pinned = self.pinned.get(user)
        on = pinned or self.receive_on
        url = self.cluster.nodes[on].base_url if on else self.cluster.lb_url
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
        url = self.cluster.nodes[self.send_to].base_url if self.send_to else self.cluster.lb_url
        while self._sending:
            await trio.sleep_until(next_at)
            if not self._sending:
                return
            phase, t0 = self.phase, now()
            body = {"to": user, "from": "faults", "message": {"s": seq, "l": lane}}
            record = Send(user, seq, t0, t0, phase, 0, lane=lane)
            try:
                response = await http.post(f"{url}/send", json=body)
                record.status = response.status_code
                if response.status_code == 202:
                    record.outcome = response.json().get("status", "")
                elif response.status_code == 503:
                    record.from_lb = "problem+json" not in response.headers.get("content-type", "")
                    if not record.from_lb:
                        record.detail = str(response.json().get("detail", ""))[:120]
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
