"""Broker faults: the broker stopped gracefully (outage) or SIGKILLed (kill)."""

from __future__ import annotations

import os
import signal
from typing import Any, Protocol

import trio

from bench.faults.broker_side import (
    broker_family,
    outage_lock,
    rabbitmqctl,
    run_script_checked,
    spawned_pid,
)
from bench.faults.cluster import Cluster
from bench.faults.options import OUTAGE_TIMEOUT, Options
from bench.faults.traffic import Clock, Traffic
from deploy.brokers import cluster_nodes, running_cluster_nodes


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


class Marks(Protocol):
    """Where a fault marks its start and end (a case's :class:`Clock`)."""

    def began(self) -> None: ...

    def ended(self) -> None: ...


# The node under each instance: the first of its URL list (bench/faults/cluster.py).
NODE_UNDER = {"a": "rabbitmq-cluster-1", "b": "rabbitmq-cluster-2"}
NODE_NAME = {"a": "triows-c1@localhost", "b": "triows-c2@localhost"}


async def fault_node_stop(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """The cluster node under instance B stopped (``stop_app``) for ``opts.duration`` s."""
    node = NODE_UNDER["b"]
    async with outage_lock(cluster.target):
        clock.began()
        await run_script_checked("outage-begin", node)
        try:
            await trio.sleep(opts.duration)
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(OUTAGE_TIMEOUT):
                await run_script_checked("outage-end", node)
        clock.ended()
    return {"how": f"deploy/brokers.py outage-begin {node}; sleep; outage-end"}


async def kill_node(cluster: Cluster, clock: Marks, opts: Options, under: str) -> dict[str, Any]:
    """SIGKILL the cluster node under instance ``under``; boot it after ``opts.kill_down`` s."""
    node, name = NODE_UNDER[under], NODE_NAME[under]
    async with outage_lock(cluster.target):
        answer = await rabbitmqctl("-n", name, "eval", "os:getpid().")
        pid = int(answer.strip().strip('"'))
        clock.began()
        os.kill(pid, signal.SIGKILL)
        await trio.sleep(opts.kill_down)
        with trio.CancelScope(shield=True), trio.fail_after(OUTAGE_TIMEOUT):
            await run_script_checked("outage-end", node)
        clock.ended()
    return {"how": f"kill -KILL {pid} ({name}); deploy/brokers.py outage-end {node}"}


async def fault_node_kill(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """SIGKILL the cluster node under instance B; boot it again after ``opts.kill_down`` s."""
    return await kill_node(cluster, clock, opts, "b")


async def fault_node_kill_sender(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """SIGKILL the node under instance A while A takes every send and B holds every socket
    (the case sets that up); boot it again after ``opts.kill_down`` s."""
    assert (traffic.send_to, traffic.receive_on) == ("a", "b")
    return await kill_node(cluster, clock, opts, "a")


async def fault_node_restart(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """Shut the node under instance B down whole; see :func:`restart_node`."""
    return await restart_node(cluster, clock, opts, "b")


async def restart_node(cluster: Cluster, clock: Marks, opts: Options, under: str) -> dict[str, Any]:
    """Shut the node under instance ``under`` down whole (``rabbitmqctl stop``: its Erlang
    VM exits), boot it again after ``opts.kill_down`` s, and see it rejoin the cluster."""
    node, name = NODE_UNDER[under], NODE_NAME[under]
    async with outage_lock(cluster.target):
        clock.began()
        await rabbitmqctl("-n", name, "stop")
        await trio.sleep(opts.kill_down)
        with trio.CancelScope(shield=True), trio.fail_after(OUTAGE_TIMEOUT):
            # The node does not answer: outage-end boots it with its data, and
            # it rejoins the nodes still running.
            await run_script_checked("outage-end", node)
        clock.ended()
    running = await trio.to_thread.run_sync(running_cluster_nodes, cluster_nodes()[0])
    return {
        "how": f"rabbitmqctl -n {name} stop; deploy/brokers.py outage-end {node}",
        "rejoined": name in running,
        "running_nodes": running,
    }


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
