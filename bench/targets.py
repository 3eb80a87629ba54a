"""The brokers a benchmark runs on: one *target* per backend and broker pair.

Each target comes from the broker table (``deploy/brokers.py``): the backend,
the broker URL, and the table's name for the broker, so that the bench starts
it with the project's one script, holds its outage lock, and finds its OS
processes for CPU accounting.
"""

from __future__ import annotations

import fcntl
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import psutil
import trio

from deploy.brokers import (
    BROKERS,
    LOCK_TIMEOUT,
    RABBITMQ_CLUSTER_NODES,
    SCRIPT,
    SCRIPT_NAME,
    cluster_urls,
)
from triows.backends.broker_url import rotated_broker_urls

# The table's script waits up to 90 s for RabbitMQ itself; this only guards a hang.
BROKER_START_TIMEOUT = 300.0
# As long as the table's script waits for an outage test to end.
OUTAGE_LOCK_TIMEOUT = LOCK_TIMEOUT
OUTAGE_LOCK_POLL = 0.2


@dataclass(frozen=True)
class Target:
    """One backend on one broker."""

    name: str
    backend: str
    # The broker table's name (deploy/brokers.py NAME); empty for the embedded memory backend.
    broker: str = ""
    # The broker (node or process) it runs on, a short label for tables and
    # CPU accounting: rabbitmq, garagemq, activemq, or "-".
    family: str = "-"
    broker_url: str = ""
    # GarageMQ quirks (see its entry below): instances connect one after the
    # other, and are stopped gracefully rather than killed.
    fragile: bool = False
    # "triows", or "peer": bench/peer_socketio.py, the python-socketio alternative.
    server: str = "triows"
    # Settings every instance of this target runs with (``--resume-window``).
    env: tuple[tuple[str, str], ...] = ()
    # The target this is a variant of (its name without the variant's suffix).
    base: str = ""

    @property
    def single_instance(self) -> bool:
        """The memory backend cannot cross processes: A and B are the same instance."""
        return self.backend == "memory"


def with_resume_window(target: Target, window: str) -> Target:
    """``target`` with ``TRIOWS_RESUME_WINDOW=window`` (0: sessions off), named for it."""
    return replace(
        target,
        name=f"{target.name}:resume{window}",
        env=(*target.env, ("TRIOWS_RESUME_WINDOW", window)),
        base=target.base or target.name,
    )


def with_queue_type(target: Target, queue_type: str) -> Target:
    """``target`` with ``TRIOWS_QUEUE_TYPE=queue_type`` (session queues), named for it."""
    return replace(
        target,
        name=f"{target.name}:{queue_type}",
        env=(*target.env, ("TRIOWS_QUEUE_TYPE", queue_type)),
        base=target.base or target.name,
    )


def with_presence_events(target: Target, events: str) -> Target:
    """``target`` with ``TRIOWS_PRESENCE_EVENTS=events`` (0: no joined/left events), named
    for it."""
    return replace(
        target,
        name=f"{target.name}:events{events}",
        env=(*target.env, ("TRIOWS_PRESENCE_EVENTS", events)),
        base=target.base or target.name,
    )


def broker_target(name: str, *, fragile: bool = False) -> Target:
    """The target of the table's broker ``name``, with the backend that speaks its protocol."""
    broker = BROKERS[name]
    return Target(
        f"{broker.backend}-{broker.family}",
        broker.backend,
        broker.name,
        broker.family,
        broker.url,
        fragile=fragile,
    )


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("memory", "memory"),
        broker_target("rabbitmq"),
        # GarageMQ (Debian's build) hangs for good when two connections declare
        # the same exchange and their queues at the same moment, and (before the
        # amqp091 backend stopped using exclusive queues there) when a consumer
        # of an exclusive queue disconnected: stopped gracefully all the same.
        broker_target("garagemq", fragile=True),
        broker_target("rabbitmq-amqp10"),
        broker_target("rabbitmq-stomp"),
        broker_target("activemq"),
    )
}


# On the table's three-node RabbitMQ cluster: each instance lists every node,
# and the lists are rotated so that instances start on different nodes (in
# bench/faults instance A lists node 1 first and B node 2; in the bench's
# scenarios instance i lists node i mod 3 first, see rotated_urls). Named
# explicitly (--target, --backend), never part of a default run.
CLUSTER_TARGETS: dict[str, Target] = {
    f"{backend}-rabbitmq-cluster": Target(
        f"{backend}-rabbitmq-cluster",
        backend,
        "rabbitmq-cluster",
        BROKERS["rabbitmq-cluster"].family,
        cluster_urls(backend),
    )
    for backend in ("amqp091", "amqp10", "stomp")
}
# The same cluster, every instance on node 1 only: the one-node side of a
# comparison (the other two nodes idle in the same cluster).
CLUSTER_TARGETS["amqp091-rabbitmq-cluster-node1"] = Target(
    "amqp091-rabbitmq-cluster-node1",
    "amqp091",
    "rabbitmq-cluster",
    BROKERS["rabbitmq-cluster"].family,
    cluster_urls("amqp091").split(",")[0],
)


def rotated_urls(broker_url: str, first: int) -> str:
    """The target's URL list from its entry ``first`` on (round the list); a single URL,
    or none (memory), as it is."""
    return rotated_broker_urls(broker_url, first) if broker_url else broker_url


# Not triows: the alternative it is measured against, on the same broker in the same run.
PEER_TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target(
            "peer-socketio",
            "socketio",
            broker="rabbitmq",
            family=BROKERS["rabbitmq"].family,
            broker_url=BROKERS["rabbitmq"].url,
            server="peer",
        ),
    )
}
# The scenarios the peer takes part in (ceiling and room are triows' own; direct-ws
# sends python-socketio's `send` event with an acknowledgement there).
PEER_SCENARIOS = ("direct", "direct-ws", "latency", "idle", "batch", "scaleout")


class BrokerNotRunning(Exception):
    """The broker script could not start (or reach) a target's broker; the message says why."""


def ensure_broker(target: Target) -> None:
    """Start the target's broker with the table's ``start`` (idempotent)."""
    if not target.broker:
        return
    command = f"{SCRIPT_NAME} start {target.broker}"
    try:
        result = subprocess.run(
            [sys.executable, str(SCRIPT), "start", target.broker],
            capture_output=True,
            text=True,
            timeout=BROKER_START_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BrokerNotRunning(
            f"{command} did not finish in {BROKER_START_TIMEOUT:.0f} s"
        ) from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise BrokerNotRunning(f"{command} failed: {reason}")


@asynccontextmanager
async def holding_broker(target: Target) -> AsyncIterator[None]:
    """Hold the broker family's outage lock (shared) while the target is measured.

    RabbitMQ and ActiveMQ are shared with concurrently running tests, some of
    which take the broker down (under this lock, exclusively). Messages in
    flight during an outage are lost by design; holding the lock shared makes
    an outage test wait until the bench is done instead of spoiling its figures.
    """
    if not target.broker:
        yield
        return
    with open(BROKERS[target.broker].lock_path, "a") as lock:  # noqa: ASYNC230 -- a lock file
        with trio.fail_after(OUTAGE_LOCK_TIMEOUT):
            while True:
                try:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await trio.sleep(OUTAGE_LOCK_POLL)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _is_broker_process(target: Target, process: psutil.Process) -> bool:
    name = process.info["name"] or ""
    cmdline = " ".join(process.info["cmdline"] or [])
    family = target.family
    if family in ("rabbitmq", "rabbitmq-cluster"):
        # The Erlang VM does the work; epmd and the port helpers are idle.
        # Which node it is (the machine's, the cluster's, the alarm one) is
        # only in its environment.
        if name != "beam.smp" or "rabbit" not in cmdline:
            return False
        # rabbitmqctl and the other CLI tools run a hidden VM of their own for a moment:
        # not the broker's work, and a process that ends inside a window voids the figure.
        if "-hidden" in (process.info["cmdline"] or []):
            return False
        try:
            node = process.environ().get("RABBITMQ_NODENAME", "")
        except psutil.Error:
            return True
        in_cluster = node in RABBITMQ_CLUSTER_NODES
        if target.broker == "rabbitmq-cluster":
            return in_cluster
        return not in_cluster and not node.startswith("triows-alarm@")
    if family == "activemq":
        return name == "java" and "activemq" in cmdline
    if family == "garagemq":
        return name == "garagemq"
    return False


def broker_processes(target: Target) -> list[psutil.Process]:
    """The OS processes of the target's broker (empty for the memory backend)."""
    return [
        process
        for process in psutil.process_iter(["name", "cmdline"])
        if _is_broker_process(target, process)
    ]
