"""A local cluster: the brokers, three ``triows serve`` instances and HAProxy in front.

``nox -s cluster`` runs :func:`main`; tests (a browser test among them) use
:func:`open_cluster`. HAProxy is started from ``deploy/haproxy.cfg`` as it
stands — the addresses come from the environment variables that file reads —
so what runs here is the file an operator would deploy. Everything started is
stopped when the block ends (Ctrl-C included), in this order: each instance gets
one SIGTERM and drains (its clients get 1012 through HAProxy, its broker queue
is deleted), and once every instance has exited HAProxy stops.

The instances and HAProxy run in process groups of their own, so a Ctrl-C in
the terminal reaches only the cluster, which then stops each of them once: if
they shared the terminal's group, HAProxy would stop at the first Ctrl-C, before
the instances could close their clients' sockets through it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from triows.backends.broker_url import rotated_broker_urls
from triows.process import (
    Instance,
    serve_instance,
    stop_process,
    stopped_by_caller,
    wait_for_status,
)

REPO_DIR = Path(__file__).resolve().parent.parent
HAPROXY_CONFIG = REPO_DIR / "deploy" / "haproxy.cfg"
BROKERS_SCRIPT = REPO_DIR / "deploy" / "brokers.sh"
DEFAULT_FRONT_PORT = 8000
DEFAULT_INSTANCE_PORTS = (8001, 8002, 8003)
# The servers deploy/haproxy.cfg lists, in order, and the variable naming each one's address.
HAPROXY_SERVER_VARIABLES = ("TRIOWS_INSTANCE_A", "TRIOWS_INSTANCE_B", "TRIOWS_INSTANCE_C")
HAPROXY_BIND_VARIABLE = "TRIOWS_HAPROXY_BIND"
# The broker (a deploy/brokers.sh name) each backend runs on by default.
DEFAULT_BROKERS = {"amqp091": "rabbitmq", "amqp10": "rabbitmq-amqp10", "stomp": "rabbitmq-stomp"}
READY_TIMEOUT = 60.0
# What stops the cluster; repeated while it stops, each is ignored (with a line saying so).
CLUSTER_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ClusterError(Exception):
    """The cluster cannot start; the message says why and what to do."""


@dataclass
class Cluster:
    """A running cluster: ``url`` is HAProxy's, the one address clients use."""

    url: str
    instances: list[Instance]
    haproxy: trio.Process


def debian_executable(name: str, package: str | None = None) -> str:
    """The path of executable ``name``, installed from Debian's ``package`` if it is missing."""
    search_path = f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin:/sbin"
    found = shutil.which(name, path=search_path)
    if found:
        return found
    package = package or name
    if shutil.which("apt-get") is None:
        raise ClusterError(f"{name} is not installed and there is no apt-get to install it")
    print(f"cluster: installing {package} (apt-get install -y {package})", file=sys.stderr)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", package],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    found = shutil.which(name, path=search_path)
    if not found:
        raise ClusterError(f"apt-get installed {package}, but no {name} executable was found")
    return found


def haproxy_path() -> str:
    """The ``haproxy`` executable, installed from Debian's package if it is missing."""
    return debian_executable("haproxy")


def haproxy_environment(front_port: int, instance_ports: Sequence[int]) -> dict[str, str]:
    """The variables ``deploy/haproxy.cfg`` reads for the front address and the instances."""
    if len(instance_ports) != len(HAPROXY_SERVER_VARIABLES):
        raise ClusterError(
            f"deploy/haproxy.cfg lists {len(HAPROXY_SERVER_VARIABLES)} servers; "
            f"got {len(instance_ports)} instance ports"
        )
    addresses = {
        variable: f"127.0.0.1:{port}"
        for variable, port in zip(HAPROXY_SERVER_VARIABLES, instance_ports, strict=True)
    }
    return {HAPROXY_BIND_VARIABLE: f"127.0.0.1:{front_port}", **addresses}


def instance_broker_url(broker_url: str | None, index: int) -> str | None:
    """Instance ``index``'s broker URL: a URL list rotated to start from node ``index``
    (round the list), so that the instances spread over a cluster's nodes and each
    moves to the next when it loses its own; one URL (or none) as it is."""
    if broker_url is None or "," not in broker_url:
        return broker_url
    return rotated_broker_urls(broker_url, index)


async def broker_cluster_url(backend: str) -> str:
    """``TRIOWS_BROKER_URL`` for the table's RabbitMQ cluster: one URL per node."""
    result = await trio.run_process(
        ["bash", str(BROKERS_SCRIPT), "cluster-url", backend], capture_stdout=True
    )
    return result.stdout.decode().strip()


async def start_brokers(*names: str) -> None:
    """``bash deploy/brokers.sh start NAMES...`` (idempotent: running brokers are left alone)."""
    await trio.run_process(["bash", str(BROKERS_SCRIPT), "start", *names])


@asynccontextmanager
async def open_cluster(
    backend: str = "amqp091",
    *,
    broker_url: str | None = None,
    broker: str | None = None,
    front_port: int = DEFAULT_FRONT_PORT,
    instance_ports: Sequence[int] = DEFAULT_INSTANCE_PORTS,
    env: Mapping[str, str] | None = None,
    haproxy_config: Path = HAPROXY_CONFIG,
) -> AsyncIterator[Cluster]:
    """Start the broker, the instances (each ready) and HAProxy; yield once HAProxy routes.

    A ``broker_url`` that lists a cluster's nodes is rotated per instance
    (:func:`instance_broker_url`), so the instances start on different nodes.
    ``broker`` names the ``deploy/brokers.sh`` broker to start (by default the
    one for ``backend``; none for ``memory``, which cannot carry messages
    between instances and is refused). ``env`` is added to each instance's
    environment (e.g. ``TRIOWS_EXCHANGE``, ``TRIOWS_SECRET``).
    """
    if backend == "memory":
        raise ClusterError("the memory backend cannot route between instances; use a broker")
    haproxy = haproxy_path()
    haproxy_env = haproxy_environment(front_port, instance_ports)
    for port in (front_port, *instance_ports):
        _check_port_free(port)
    broker = broker or DEFAULT_BROKERS.get(backend)
    if broker is not None:
        await start_brokers(broker)
    async with AsyncExitStack() as stack:
        instances = []
        for index, port in enumerate(instance_ports):
            instance = await stack.enter_async_context(
                serve_instance(
                    backend,
                    broker_url=instance_broker_url(broker_url, index),
                    env=env,
                    port=port,
                    own_process_group=True,
                )
            )
            instances.append(instance)
        for instance in instances:
            await instance.wait_ready(READY_TIMEOUT)
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    # -db: stay in the foreground, so stopping the child stops HAProxy.
                    [haproxy, "-db", "-f", str(haproxy_config)],
                    env={**os.environ, **haproxy_env},
                    check=False,
                    process_group=0,
                    deliver_cancel=stopped_by_caller,
                )
            )
            try:
                url = f"http://127.0.0.1:{front_port}"
                async with trio.open_nursery() as waiting:
                    waiting.start_soon(_fail_if_exits, process, "haproxy")
                    await wait_for_status(f"{url}/readyz", 200, READY_TIMEOUT)
                    waiting.cancel_scope.cancel()
                yield Cluster(url, instances, process)
            finally:
                with trio.CancelScope(shield=True):
                    # HAProxy last: the instances' close frames go through it.
                    await stop_instances(instances)
                    # SIGUSR1 is HAProxy's soft stop (exit status 0), where
                    # SIGTERM would be its immediate stop (killed by the signal).
                    await stop_process(process, signal.SIGUSR1)
                    _report_exit("HAProxy", process)


async def stop_instances(instances: Sequence[Instance]) -> None:
    """Stop every instance at once (one SIGTERM each: a drain); return once all have exited."""
    async with trio.open_nursery() as nursery:
        for instance in instances:
            nursery.start_soon(_stop_instance, instance)


async def _stop_instance(instance: Instance) -> None:
    await stop_process(instance.process)
    _report_exit(f"instance {instance.base_url}", instance.process)


def _report_exit(name: str, process: trio.Process) -> None:
    print(f"cluster: {name} exited with status {process.returncode}", file=sys.stderr, flush=True)


def _check_port_free(port: int) -> None:
    with socket.socket() as probe:
        # As the instances' and HAProxy's own listeners do: a connection of
        # the previous run still in TIME_WAIT must not count as "in use".
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise ClusterError(
                f"port {port} is in use; stop what listens there or choose other ports "
                "(--port, --instance-ports)"
            ) from None


async def _fail_if_exits(process: trio.Process, name: str) -> None:
    code = await process.wait()
    raise ClusterError(f"{name} exited with status {code} (see its output above)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m triows.cluster", description=__doc__.splitlines()[0].replace("``", "")
    )
    parser.add_argument("--backend", default="amqp091", help="amqp091 (default), amqp10, stomp")
    parser.add_argument("--broker-url", help="the instances' TRIOWS_BROKER_URL")
    parser.add_argument(
        "--broker", help="the deploy/brokers.sh broker to start (default: the backend's)"
    )
    parser.add_argument(
        "--broker-cluster",
        action="store_true",
        help="put the instances on rabbitmq-cluster, its three nodes' URLs as the broker URL list",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_FRONT_PORT, help="HAProxy's port")
    parser.add_argument(
        "--instance-ports",
        default=",".join(map(str, DEFAULT_INSTANCE_PORTS)),
        help="three ports, comma-separated (default 8001,8002,8003)",
    )
    return parser


async def _run(args: argparse.Namespace) -> None:
    ports = [int(port) for port in args.instance_ports.split(",")]
    if args.broker_cluster:
        args.broker = "rabbitmq-cluster"
        args.broker_url = await broker_cluster_url(args.backend)
    # Instances log at INFO here (connects, drains), unless the caller chose.
    env = {"TRIOWS_LOG_LEVEL": os.environ.get("TRIOWS_LOG_LEVEL", "INFO")}
    # Ctrl-C (or SIGTERM, or the terminal closing) at any moment, start-up
    # included, cancels the cluster's block, and open_cluster stops everything
    # it started. The receiver stays open until then: a repeated Ctrl-C is
    # reported and ignored rather than cutting the instances' drain short.
    with trio.open_signal_receiver(*CLUSTER_STOP_SIGNALS) as signals:
        async with trio.open_nursery() as watching:
            running = trio.CancelScope()
            watching.start_soon(_stop_on_signals, signals, running)
            with running:
                async with open_cluster(
                    args.backend,
                    broker_url=args.broker_url,
                    broker=args.broker,
                    front_port=args.port,
                    instance_ports=ports,
                    env=env,
                ) as cluster:
                    print(
                        f"cluster: HAProxy on {cluster.url} (chat page: {cluster.url}/), "
                        "instances "
                        + ", ".join(
                            f"{instance.base_url} (pid {instance.process.pid})"
                            for instance in cluster.instances
                        )
                        + f", backend {args.backend}. Ctrl-C stops everything.",
                        file=sys.stderr,
                        flush=True,
                    )
                    await trio.sleep_forever()
            watching.cancel_scope.cancel()


async def _stop_on_signals(signals: AsyncIterator[int], running: trio.CancelScope) -> None:
    async for number in signals:
        name = signal.Signals(number).name
        if running.cancel_called:
            print(
                f"cluster: {name} ignored, already stopping; an instance that must stop "
                "now can be sent SIGKILL (its pid is in the start-up line)",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"cluster: {name}: stopping (each instance drains, then HAProxy stops)",
                file=sys.stderr,
                flush=True,
            )
            running.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    status = 0
    try:
        trio.run(_run, args)
    except* ClusterError as group:
        for error in group.exceptions:
            print(f"cluster: {error}", file=sys.stderr)
        status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
