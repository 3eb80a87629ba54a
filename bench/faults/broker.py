"""Broker faults: the broker stopped gracefully (outage) or SIGKILLed (kill)."""

from __future__ import annotations

import os
import signal
from typing import Any

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


# The node under instance B: the first of its URL list (bench/faults/cluster.py).
NODE_UNDER_B = "rabbitmq-cluster-2"
NODE_UNDER_B_NAME = "triows-c2@localhost"


async def fault_node_stop(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """The cluster node under instance B stopped (``stop_app``) for ``opts.duration`` s."""
    async with outage_lock(cluster.target):
        clock.began()
        await run_script_checked("outage-begin", NODE_UNDER_B)
        try:
            await trio.sleep(opts.duration)
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(OUTAGE_TIMEOUT):
                await run_script_checked("outage-end", NODE_UNDER_B)
        clock.ended()
    return {"how": f"deploy/brokers.py outage-begin {NODE_UNDER_B}; sleep; outage-end"}


async def fault_node_kill(
    cluster: Cluster, traffic: Traffic, clock: Clock, opts: Options
) -> dict[str, Any]:
    """SIGKILL the cluster node under instance B; boot it again after ``opts.kill_down`` s."""
    async with outage_lock(cluster.target):
        answer = await rabbitmqctl("-n", NODE_UNDER_B_NAME, "eval", "os:getpid().")
        pid = int(answer.strip().strip('"'))
        clock.began()
        os.kill(pid, signal.SIGKILL)
        await trio.sleep(opts.kill_down)
        with trio.CancelScope(shield=True), trio.fail_after(OUTAGE_TIMEOUT):
            await run_script_checked("outage-end", NODE_UNDER_B)
        clock.ended()
    how = f"kill -KILL {pid} ({NODE_UNDER_B_NAME}); deploy/brokers.py outage-end {NODE_UNDER_B}"
    return {"how": how}


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
