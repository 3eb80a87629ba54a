"""``triows.cluster``: three instances behind HAProxy started from ``deploy/haproxy.cfg``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from deploy.brokers import RABBITMQ_CLUSTER_NODES
from tests.brokers import require_broker
from tests.e2e import OutputLines, unique_exchange
from tests.test_client import next_of_type
from tests.test_stomp_backend import rabbitmq_queues
from triows.client import EventsClient, open_client, open_events, post_send
from triows.cluster import (
    broker_cluster_url,
    instance_broker_url,
    open_cluster,
    stop_instances,
)
from triows.process import free_port, wait_for_status
from triows.protocol import CLOSE_DRAINING

STOP_TIMEOUT = 120


def free_ports() -> tuple[int, list[int]]:
    return free_port(), [free_port() for _ in range(3)]


async def test_behind_haproxy_users_spread_over_instances_and_survive_a_drain() -> None:
    await require_broker("rabbitmq")
    front, ports = free_ports()
    env = {"TRIOWS_EXCHANGE": unique_exchange()}
    async with (
        open_cluster(front_port=front, instance_ports=ports, env=env) as cluster,
        httpx.AsyncClient() as http,
    ):
        by_instance = {}
        for instance in cluster.instances:
            response = await http.get(f"{instance.base_url}/readyz")
            assert response.status_code == 200
        async with (
            open_client(cluster.url, user="Anne") as anne,
            open_client(cluster.url, user="Bob") as bob,
        ):
            # leastconn: the second socket goes to an instance without one.
            assert anne.instance != bob.instance
            ack = await anne.send(to="Bob", message="hi Bob")
            assert ack["status"] == "routed"
            assert (await next_of_type(bob, "message"))["message"] == "hi Bob"
            # Find Bob's instance by its port: SIGTERM it (a drain).
            for instance in cluster.instances:
                hello = await _hello_of(instance.base_url)
                by_instance[hello] = instance
            drained = bob.instance
            assert drained is not None
            bob_instance = by_instance[drained]
            bob_instance.terminate()
            event = await next_of_type(bob, "reconnected")
            assert event["previous_instance"] == drained
            assert bob.instance != drained
            ack = await anne.send(to="Bob", message="after the drain")
            assert ack["status"] == "routed"
            assert (await next_of_type(bob, "message"))["message"] == "after the drain"
            response = await post_send(http, cluster.url, "Bob", "via /send", sender="Anne")
            assert response.status_code == 202
            assert (await next_of_type(bob, "message"))["message"] == "via /send"


def test_a_broker_url_list_is_rotated_per_instance_and_one_url_kept() -> None:
    nodes = "amqp://n1/,amqp://n2/,amqp://n3/"
    assert [instance_broker_url(nodes, index) for index in range(4)] == [
        nodes,
        "amqp://n2/,amqp://n3/,amqp://n1/",
        "amqp://n3/,amqp://n1/,amqp://n2/",
        nodes,
    ]
    assert instance_broker_url("amqp://n1/", 2) == "amqp://n1/"
    assert instance_broker_url(None, 1) is None


async def test_on_the_broker_cluster_the_instances_start_on_three_different_nodes() -> None:
    """``nox -s cluster -- --broker-cluster``: each instance lists every node, from a
    different one, so the three instances' broker connections are on the three nodes."""
    await require_broker("rabbitmq-cluster")
    front, ports = free_ports()
    env = {"TRIOWS_EXCHANGE": unique_exchange()}
    urls = await broker_cluster_url("amqp091")
    async with open_cluster(
        broker_url=urls, broker="rabbitmq-cluster", front_port=front, instance_ports=ports, env=env
    ) as cluster:
        ids = [await _hello_of(instance.base_url) for instance in cluster.instances]
        node_ports = await broker_ports_of_connections()
        assert sorted(node_ports[f"triows {instance_id}"] for instance_id in ids) == sorted(
            urlsplit(url).port for url in urls.split(",")
        )


async def broker_ports_of_connections() -> dict[str, int]:
    """The cluster's AMQP connections: the node port each is on, by connection name."""
    listed = await trio.run_process(
        [
            "rabbitmqctl",
            "-q",
            "-n",
            RABBITMQ_CLUSTER_NODES[0],
            "list_connections",
            "port",
            "client_properties",
            "--formatter",
            "json",
        ],
        capture_stdout=True,
    )
    ports = {}
    for connection in json.loads(listed.stdout):
        properties = {entry[0]: entry[-1] for entry in connection["client_properties"]}
        ports[str(properties.get("connection_name"))] = int(connection["port"])
    return ports


async def _hello_of(base_url: str) -> str:
    """The id of the instance at ``base_url``, from the hello of a throwaway socket."""
    async with open_client(base_url, user="probe") as probe:
        assert probe.instance is not None
        return probe.instance


@pytest.mark.parametrize("moment", ["once_ready", "during_start_up"])
async def test_the_cluster_command_stops_everything_it_started_on_ctrl_c(moment: str) -> None:
    await require_broker("rabbitmq")
    front, ports = free_ports()
    command = [
        sys.executable,
        "-m",
        "triows.cluster",
        "--port",
        str(front),
        "--instance-ports",
        ",".join(map(str, ports)),
    ]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                env={**os.environ, "TRIOWS_EXCHANGE": unique_exchange()},
                stdin=subprocess.DEVNULL,
                check=False,
            )
        )
        if moment == "once_ready":
            await wait_for_status(f"http://127.0.0.1:{front}/readyz", 200, timeout=120)
        else:
            # The first instance serves; the others and HAProxy are not up yet.
            await wait_for_status(f"http://127.0.0.1:{ports[0]}/healthz", 200, timeout=120)
        process.send_signal(signal.SIGINT)
        with trio.fail_after(120):
            assert await process.wait() == 0
    for port in (front, *ports):
        with trio.socket.socket() as probe:
            # Nothing listens any more: every port can be bound again (by a
            # listener, which sets SO_REUSEADDR: TIME_WAIT does not block it).
            probe.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            await probe.bind(("127.0.0.1", port))


def cluster_command(front: int, ports: list[int]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "triows.cluster",
        "--port",
        str(front),
        "--instance-ports",
        ",".join(map(str, ports)),
    ]


async def test_ctrl_c_to_the_cluster_drains_every_instance_then_stops_haproxy() -> None:
    # What a terminal does on Ctrl-C: SIGINT to every process of its
    # foreground process group, here the cluster's own group.
    await require_broker("rabbitmq")
    front, ports = free_ports()
    output = OutputLines()
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                cluster_command(front, ports),
                env={**os.environ, "TRIOWS_EXCHANGE": unique_exchange()},
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                check=False,
                process_group=0,
            )
        )
        assert process.stderr is not None
        nursery.start_soon(output.collect, process.stderr)
        await wait_for_status(f"http://127.0.0.1:{front}/readyz", 200, timeout=STOP_TIMEOUT)
        async with AsyncExitStack() as stack:
            clients: list[EventsClient] = []
            for number in range(len(ports)):
                clients.append(
                    await stack.enter_async_context(
                        open_events(f"http://127.0.0.1:{front}", user=f"via-haproxy-{number}")
                    )
                )
            for port in ports:
                clients.append(
                    await stack.enter_async_context(
                        open_events(f"http://127.0.0.1:{port}", user=f"direct-{port}")
                    )
                )
            instance_ids = {client.hello["instance"] for client in clients[len(ports) :]}
            assert len(instance_ids) == len(ports)
            os.killpg(process.pid, signal.SIGINT)
            with trio.fail_after(STOP_TIMEOUT):
                codes = [await client.wait_closed() for client in clients]
            assert codes == [CLOSE_DRAINING] * len(clients), "\n".join(output.lines)
        with trio.fail_after(STOP_TIMEOUT):
            assert await process.wait() == 0
    drained = {record["instance"] for record in output.events("drain_done")}
    assert drained == instance_ids
    exits = [line for line in output.lines if line.startswith("cluster: ") and "exited" in line]
    # HAProxy last; the instances in any order among themselves.
    assert sorted(exits[:-1]) == sorted(
        f"cluster: instance http://127.0.0.1:{port} exited with status 0" for port in ports
    )
    assert exits[-1] == "cluster: HAProxy exited with status 0"
    for instance_id in instance_ids:
        assert await rabbitmq_queues(instance_id) == set()


def time_wait_ports() -> set[int]:
    """The local ports of this host's IPv4 TCP sockets in TIME_WAIT (from /proc/net/tcp)."""
    ports = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        if state == "06":  # TIME_WAIT
            ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


async def test_a_cluster_starts_again_at_once_on_ports_left_in_time_wait() -> None:
    await require_broker("rabbitmq")
    front, ports = free_ports()
    env = {"TRIOWS_EXCHANGE": unique_exchange()}
    async with (
        open_cluster(front_port=front, instance_ports=ports, env=env) as cluster,
        open_events(cluster.url, user="Anne") as anne,
        open_events(cluster.instances[0].base_url, user="Bob") as bob,
    ):
        # How the cluster stops its instances, here with both sockets open:
        # the instances close them (1012) and so leave TIME_WAIT on their ports.
        await stop_instances(cluster.instances)
        assert [await anne.wait_closed(), await bob.wait_closed()] == [CLOSE_DRAINING] * 2
    assert ports[0] in time_wait_ports()
    async with open_cluster(front_port=front, instance_ports=ports, env=env) as cluster:
        async with open_events(cluster.url, user="Anne") as anne:
            assert anne.hello["user"] == "Anne"
