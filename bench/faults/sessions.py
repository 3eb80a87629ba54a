"""Continuity for sessions: instance B drained or SIGKILLed, or the broker node under B
lost, under traffic.

Two instances (``open_cluster``; the users and the sender talk to the
instances directly, not through HAProxy). ``users`` users each hold one
``/events`` socket with a URL list ``[B, A]``: the first connection lands on
B; when it ends, the user reconnects down the list with the real resume
protocol (``?session=<token>&last=<seq>-<id>`` of the last message frame it
saw), so a B that no longer answers leaves A. One sequential sender POSTs
``/send`` to A every ``SEND_EVERY`` seconds, to each user in turn.

Every message is accounted per user: sent, refused (non-2xx or a transport
error), 2xx but never delivered, delivered twice to the one user (across its
connections), and the answers' outcomes (``routed``, ``queued``). Times run
from the signal to each user's first ``hello`` after it that says
``"resumed": true``. A backend whose ``hello`` says ``"resumable": false``
runs the same case, and its row says so: its users reconnect afresh.

On a cluster target (``session-node-kill``, ``session-node-restart``) B
stays; the RabbitMQ node under it is SIGKILLed or shut down whole, then
booted again (:mod:`bench.faults.broker`), while every session queue is a
quorum queue (``TRIOWS_QUEUE_TYPE=quorum``, replicated over the three
nodes). B moves to the next node of its list and consumes the sessions'
queues again there; the users' sockets stay open. Their row says how long
any user went without a delivery from the fault's start.
"""

from __future__ import annotations

import itertools
import json
import signal
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import h11
import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from bench.broker_memory import session_queues
from bench.faults.broker import NODE_NAME, kill_node, restart_node
from bench.faults.cluster import Cluster, log_tails, open_cluster
from bench.faults.options import STEP_TIMEOUT, Options
from bench.faults.traffic import now
from bench.targets import Target
from triows.client import open_send_connection

RESUME_FAULTS = ("resume-drain", "resume-kill")
SIGNALS = {"resume-drain": signal.SIGTERM, "resume-kill": signal.SIGKILL}
# A cluster target only: the node under B lost, the sessions' queues quorum queues.
NODE_FAULTS = {"session-node-kill": kill_node, "session-node-restart": restart_node}
SESSION_NODE_FAULTS = tuple(NODE_FAULTS)
QUORUM_SESSIONS = {"TRIOWS_RESUME_WINDOW": "120", "TRIOWS_QUEUE_TYPE": "quorum"}

USERS = 20
SEND_EVERY = 0.005
# Sequential senders that share the pace (see send_steadily).
SENDER_LANES = 4
# Pause between two connection attempts of one user (each URL of its list tried in turn).
RETRY_PAUSE = 0.05
# After the last send: how long a duplicate may still come.
DUPLICATE_WINDOW = 1.0
# Hang guard for the last deliveries.
DELIVERY_TIMEOUT = 20.0


def events_url(base_url: str, user: str, token: str | None, cursor: str | None) -> str:
    url = base_url.replace("http://", "ws://") + f"/events?user={user}"
    if token is not None:
        url += f"&session={token}"
        if cursor is not None:
            url += f"&last={cursor}"
    return url


@dataclass
class Hello:
    at: float
    instance: str
    resumable: bool
    resumed: bool | None
    missed: int | None


@dataclass
class SessionUser:
    """One user's connections, down its URL list, resuming with its token and cursor."""

    name: str
    urls: list[str]
    hellos: list[Hello] = field(default_factory=list)
    # Message ids in the order they arrived, across connections, when, and their seq.
    ids: list[str] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    token: str | None = None
    cursor: str | None = None
    attempts: int = 0
    opened: trio.Event = field(default_factory=trio.Event)

    async def run(self) -> None:
        """Connect, read until the socket ends, reconnect down the list; forever."""
        while True:
            for base_url in self.urls:
                self.attempts += 1
                try:
                    url = events_url(base_url, self.name, self.token, self.cursor)
                    async with open_websocket_url(url) as socket:
                        await self._read(socket, base_url)
                except (OSError, HandshakeError, ConnectionClosed, trio.BrokenResourceError):
                    pass
                await trio.sleep(RETRY_PAUSE)

    async def _read(self, socket: Any, base_url: str) -> None:
        hello = json.loads(await socket.get_message())
        self.hellos.append(
            Hello(
                now(),
                base_url,
                bool(hello.get("resumable")),
                hello.get("resumed"),
                hello.get("missed"),
            )
        )
        if hello.get("session"):
            self.token = hello["session"]
        self.opened.set()
        while True:
            frame = json.loads(await socket.get_message())
            if frame.get("type") == "message":
                self.ids.append(frame["id"])
                self.arrived.append(now())
                if "seq" in frame:
                    self.seqs.append(frame["seq"])
                    self.cursor = f"{frame['seq']}-{frame['id']}"


@dataclass
class Sent:
    user: str
    t0: float
    status: int  # 0: transport error
    outcome: str = ""
    message_id: str | None = None


async def send_steadily(
    a_url: str, users: list[SessionUser], sent: list[Sent], stop: trio.Event
) -> None:
    """POST to A every ``SEND_EVERY`` s overall, each user's messages from one lane.

    ``SENDER_LANES`` lanes, each one request at a time over its own keep-alive
    connection, share the users (lane ``i`` sends to users ``i``, ``i + lanes``,
    ...), so that every user's messages have an order while the pace holds on
    a machine that answers one request in more than ``SEND_EVERY``.
    """
    async with trio.open_nursery() as nursery:
        for lane in range(SENDER_LANES):
            mine = users[lane::SENDER_LANES]
            offset = SEND_EVERY * lane
            nursery.start_soon(_send_lane, a_url, mine, sent, stop, offset)


async def _send_lane(
    a_url: str, users: list[SessionUser], sent: list[Sent], stop: trio.Event, offset: float
) -> None:
    interval = SEND_EVERY * SENDER_LANES
    n = 0
    next_at = now() + offset
    while not stop.is_set():
        await trio.sleep_until(next_at)
        try:
            async with open_send_connection(a_url) as connection:
                while not stop.is_set():
                    user = users[n % len(users)]
                    record = Sent(user.name, now(), 0)
                    sent.append(record)
                    n += 1
                    status, body = await connection.send(user.name, {"n": n}, sender="faults")
                    record.status = status
                    if 200 <= status < 300:
                        answer = json.loads(body)
                        record.outcome = answer.get("status", "")
                        record.message_id = answer.get("id")
                    next_at = max(next_at + interval, now())
                    await trio.sleep_until(next_at)
        except (OSError, h11.RemoteProtocolError, trio.BrokenResourceError):
            next_at = now() + interval  # a new connection for the next one


def account(users: list[SessionUser], sent: list[Sent]) -> dict[str, Any]:
    """What became of every message sent: 2xx, refused, lost, duplicated, out of order."""
    statuses = Counter(record.status for record in sent)
    outcomes = Counter(record.outcome for record in sent if record.outcome)
    by_user = {user.name: user for user in users}
    lost = duplicated = reordered = seq_gaps = 0
    for user in users:
        counts = Counter(user.ids)
        duplicated += sum(1 for count in counts.values() if count > 1)
        confirmed = [r.message_id for r in sent if r.user == user.name and r.message_id is not None]
        lost += sum(1 for message_id in confirmed if message_id not in counts)
        # The order sent, among what arrived.
        position = {message_id: index for index, message_id in enumerate(confirmed)}
        order = [position[i] for i in dict.fromkeys(user.ids) if i in position]
        reordered += sum(1 for x, y in itertools.pairwise(order) if y < x)
        seq_gaps += sum(1 for x, y in itertools.pairwise(user.seqs) if y != x + 1)
    two_xx = sum(count for status, count in statuses.items() if 200 <= status < 300)
    return {
        "sent": len(sent),
        "2xx": two_xx,
        "outcomes": dict(outcomes),
        "refused": len(sent) - two_xx,
        "refused_by_status": {str(s): c for s, c in statuses.items() if not 200 <= s < 300},
        "lost_2xx": lost,
        "duplicated": duplicated,
        "reordered": reordered,
        "seq_not_consecutive": seq_gaps,
        "delivered": sum(len(set(user.ids)) for user in by_user.values()),
    }


@dataclass
class FaultTimes:
    """When a node fault began and ended (:class:`bench.faults.broker.Marks`)."""

    begin: float = 0.0
    end: float = 0.0

    def began(self) -> None:
        self.begin = now()

    def ended(self) -> None:
        self.end = now()


async def run_resume_case(
    target: Target, fault: str, opts: Options, users: int = USERS
) -> dict[str, Any]:
    """Instance B drained (``resume-drain``) or SIGKILLed (``resume-kill``), or the node under
    B lost (``session-node-kill``, ``session-node-restart``), under traffic."""
    started = time.time()
    on_node = fault in NODE_FAULTS
    env = QUORUM_SESSIONS if on_node else None
    async with open_cluster(target, opts, env=env, sessions=True) as cluster:
        a, b = cluster.nodes["a"], cluster.nodes["b"]
        people = [SessionUser(f"s{n}", [b.base_url, a.base_url]) for n in range(users)]
        sent: list[Sent] = []
        stop = trio.Event()
        fault_details: dict[str, Any] = {}
        times = FaultTimes()
        exit_s: float | None = None
        async with trio.open_nursery() as nursery:
            for user in people:
                nursery.start_soon(user.run)
            with trio.fail_after(STEP_TIMEOUT):
                for user in people:
                    await user.opened.wait()
            on_b = sum(1 for user in people if user.hellos[0].instance == b.base_url)
            resumable = all(user.hellos[0].resumable for user in people)
            queues_before = await _queues(cluster)
            nursery.start_soon(send_steadily, a.base_url, people, sent, stop)
            await trio.sleep(opts.before)
            hellos_before = {user.name: len(user.hellos) for user in people}
            signalled = now()
            if on_node:
                fault_details = await NODE_FAULTS[fault](cluster, times, opts, "b")
                signalled = times.begin
            else:
                cluster.stopped.add("b")
                b.process.send_signal(SIGNALS[fault])
                with trio.fail_after(STEP_TIMEOUT):
                    await b.process.wait()
                exit_s = round(now() - signalled, 3)

            def back(user: SessionUser) -> Hello | None:
                return next(iter(user.hellos[hellos_before[user.name] :]), None)

            if not on_node:  # B's users come back on A
                with trio.move_on_after(STEP_TIMEOUT):
                    while any(back(user) is None for user in people):  # noqa: ASYNC110
                        await trio.sleep(0.02)
            await trio.sleep(opts.after)
            stop.set()
            wanted = {r.message_id for r in sent if r.message_id is not None}
            with trio.move_on_after(DELIVERY_TIMEOUT):
                while not wanted <= {i for user in people for i in user.ids}:  # noqa: ASYNC110
                    await trio.sleep(0.05)
            await trio.sleep(DUPLICATE_WINDOW)
            queues_after = await _queues(cluster)
            nursery.cancel_scope.cancel()
        returns = [back(user) for user in people]
        resumed_at = [hello.at for hello in returns if hello is not None and hello.resumed]
        accounting = account(people, sent)
        row: dict[str, Any] = {
            "target": target.name,
            "fault": fault,
            "status": "ok",
            "resumable": resumable,
            "users": users,
            "users_on_b": on_b,
            "send_every_s": SEND_EVERY,
            # One request at a time: a loaded machine answers slower than SEND_EVERY.
            "sent_per_s": _rate(sent),
            "options": asdict(opts),
            "env": env or {},
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)),
            "users_resumed": len(resumed_at),
            "users_not_resumed": sum(1 for h in returns if h is not None and not h.resumed),
            "users_not_back": sum(1 for h in returns if h is None),
            "missed_told": sum(h.missed or 0 for h in returns if h is not None),
            # From the signal to the last user's resumed hello (None: not every user resumed).
            "all_resumed_s": (
                round(max(resumed_at) - signalled, 3) if len(resumed_at) == users else None
            ),
            "first_resumed_s": round(min(resumed_at) - signalled, 3) if resumed_at else None,
            "accounting": accounting,
            "session_queues": {"before": queues_before, "after": queues_after},
            "log_tail": (
                log_tails(cluster) if accounting["lost_2xx"] or accounting["refused"] else {}
            ),
        }
        if on_node:
            row |= {
                "fault_details": fault_details,
                "fault_s": round(times.end - times.begin, 3),
                "sockets_reopened": sum(len(user.hellos) - 1 for user in people),
                "longest_without_delivery_s": _longest_silence(people, times.begin),
            }
        else:
            row |= {"exit_code": b.process.returncode, "exit_s": exit_s}
        return row


def _longest_silence(users: list[SessionUser], since: float) -> float | None:
    """The longest any user went without a delivery, over the gaps that end after ``since``
    (the gap the fault fell in included): under steady traffic, how long delivery stopped."""
    gaps = [
        later - earlier
        for user in users
        for earlier, later in itertools.pairwise(user.arrived)
        if later > since
    ]
    return round(max(gaps), 3) if gaps else None


def _rate(sent: list[Sent]) -> float:
    if len(sent) < 2:
        return 0.0
    return round(len(sent) / (sent[-1].t0 - sent[0].t0), 1)


async def _queues(cluster: Cluster) -> int | None:
    """The run's session queues on RabbitMQ, asked of node 1 on a cluster (None elsewhere)."""
    family = cluster.target.family
    if family not in ("rabbitmq", "rabbitmq-cluster"):
        return None
    node = NODE_NAME["a"] if family == "rabbitmq-cluster" else None
    queues = await session_queues(cluster.exchange, node)
    return None if queues is None else queues[0]
