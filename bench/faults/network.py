"""Faults on one instance's broker connection: closed by the broker, dropped at TCP level,
silent (half-open), slow. All but ``close`` are played by :mod:`bench.faults.proxy`.
"""

from __future__ import annotations

from typing import Any

import trio

from bench.faults.accounting import first_unready
from bench.faults.broker_side import rabbitmq_connection_pids, rabbitmqctl
from bench.faults.cluster import Cluster
from bench.faults.fault import NotPossible
from bench.faults.options import Options
from bench.faults.traffic import Clock, Traffic


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
