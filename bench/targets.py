"""The brokers a benchmark runs on: one *target* per backend and broker pair.

Each target names the backend, its broker URL, the name ``deploy/brokers.sh``
knows the broker by (so the bench starts it with the project's one script),
and how to find the broker's OS processes for CPU accounting.
"""

from __future__ import annotations

import fcntl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import trio

BROKERS_SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "brokers.sh"
# deploy/brokers.sh waits up to 90 s for RabbitMQ itself; this only guards a hang.
BROKER_START_TIMEOUT = 300.0
# As long as deploy/brokers.sh waits for an outage test to end.
OUTAGE_LOCK_TIMEOUT = 300.0
OUTAGE_LOCK_POLL = 0.2


@dataclass(frozen=True)
class Target:
    """One backend on one broker."""

    name: str
    backend: str
    broker: str  # a short label for tables: rabbitmq, garagemq, activemq, or "-"
    broker_url: str = ""
    script_name: str = ""  # deploy/brokers.sh NAME; empty for the embedded memory backend
    # GarageMQ quirks (see its entry below): instances connect one after the
    # other, and are stopped gracefully rather than killed.
    fragile: bool = False
    # "triows", or "peer": bench/peer_socketio.py, the python-socketio alternative.
    server: str = "triows"

    @property
    def single_instance(self) -> bool:
        """The memory backend cannot cross processes: A and B are the same instance."""
        return self.backend == "memory"


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("memory", "memory", "-"),
        Target(
            "amqp091-rabbitmq",
            "amqp091",
            "rabbitmq",
            "amqp://guest:guest@127.0.0.1:5672/",
            "rabbitmq",
        ),
        # GarageMQ (Debian's build) hangs for good when two connections declare
        # the same exchange and their queues at the same moment, and (before the
        # amqp091 backend stopped using exclusive queues there) when a consumer
        # of an exclusive queue disconnected: stopped gracefully all the same.
        Target(
            "amqp091-garagemq",
            "amqp091",
            "garagemq",
            "amqp://guest:guest@127.0.0.1:5673/",
            "garagemq",
            fragile=True,
        ),
        Target(
            "amqp10-rabbitmq",
            "amqp10",
            "rabbitmq",
            "amqp://guest:guest@127.0.0.1:5672",
            "rabbitmq-amqp10",
        ),
        Target(
            "stomp-rabbitmq",
            "stomp",
            "rabbitmq",
            "stomp://guest:guest@127.0.0.1:61613",
            "rabbitmq-stomp",
        ),
        Target(
            "stomp-activemq",
            "stomp",
            "activemq",
            "stomp://guest:guest@127.0.0.1:61614",
            "activemq",
        ),
    )
}


# Not triows: the alternative it is measured against, on the same broker in the same run.
PEER_TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target(
            "peer-socketio",
            "socketio",
            "rabbitmq",
            "amqp://guest:guest@127.0.0.1:5672/",
            "rabbitmq",
            server="peer",
        ),
    )
}
# The scenarios the peer takes part in (direct-ws and ceiling are triows' own).
PEER_SCENARIOS = ("direct", "latency", "idle", "batch", "scaleout")


class BrokerNotRunning(Exception):
    """The broker script could not start (or reach) a target's broker; the message says why."""


def ensure_broker(target: Target) -> None:
    """Start the target's broker with ``deploy/brokers.sh start`` (idempotent)."""
    if not target.script_name:
        return
    try:
        result = subprocess.run(
            ["bash", str(BROKERS_SCRIPT), "start", target.script_name],
            capture_output=True,
            text=True,
            timeout=BROKER_START_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BrokerNotRunning(
            f"deploy/brokers.sh start {target.script_name} did not finish in "
            f"{BROKER_START_TIMEOUT:.0f} s"
        ) from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise BrokerNotRunning(f"deploy/brokers.sh start {target.script_name} failed: {reason}")


def outage_lock_path(target: Target) -> Path:
    """The lock outage tests hold (exclusively) while the target's broker family is down."""
    return Path(f"/tmp/triows-{target.script_name.split('-')[0]}-outage.lock")


@asynccontextmanager
async def holding_broker(target: Target) -> AsyncIterator[None]:
    """Hold the broker family's outage lock (shared) while the target is measured.

    RabbitMQ and ActiveMQ are shared with concurrently running tests, some of
    which take the broker down (under this lock, exclusively). Messages in
    flight during an outage are lost by design; holding the lock shared makes
    an outage test wait until the bench is done instead of spoiling its figures.
    """
    if not target.script_name:
        yield
        return
    with open(outage_lock_path(target), "a") as lock:  # noqa: ASYNC230 -- a lock file
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


def _is_broker_process(broker: str, process: psutil.Process) -> bool:
    name = process.info["name"] or ""
    cmdline = " ".join(process.info["cmdline"] or [])
    if broker == "rabbitmq":
        # The Erlang VM does the work; epmd and the port helpers are idle.
        return name == "beam.smp" and "rabbit" in cmdline
    if broker == "activemq":
        return name == "java" and "activemq" in cmdline
    if broker == "garagemq":
        return name == "garagemq"
    return False


def broker_processes(target: Target) -> list[psutil.Process]:
    """The OS processes of the target's broker (empty for the memory backend)."""
    return [
        process
        for process in psutil.process_iter(["name", "cmdline"])
        if _is_broker_process(target.broker, process)
    ]
