"""The brokers seen from outside: the start script, their outage locks, and what they hold.

RabbitMQ is asked with ``rabbitmqctl``; ActiveMQ, which exposes no management
port here, through its log.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from bench.faults.cluster import Cluster
from bench.faults.options import PINNED_USER
from bench.targets import Target
from deploy.brokers import ACTIVEMQ_DIR, BROKERS, RUN_DIR, SCRIPT, SCRIPT_NAME


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
