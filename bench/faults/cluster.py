"""Two ``triows serve`` instances, each through a fault proxy of its own, behind HAProxy."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psutil
import trio

from bench.faults.options import HAPROXY_CFG, STEP_TIMEOUT, Options
from bench.faults.proxy import FaultProxy, open_fault_proxy
from bench.targets import Target
from triows.backends.broker_url import rotated_broker_urls
from triows.process import Instance, free_port, serve_instance, wait_for_status


@dataclass
class Node:
    label: str
    instance_id: str
    instance: Instance
    proxy: FaultProxy
    log: Path

    @property
    def process(self) -> trio.Process:
        return self.instance.process

    @property
    def base_url(self) -> str:
        return self.instance.base_url


@dataclass
class Cluster:
    target: Target
    exchange: str
    nodes: dict[str, Node]
    lb_url: str
    tmp: Path
    stopped: set[str] = field(default_factory=set)  # labels a fault stopped on purpose

    def label_of(self, instance_id: str) -> str:
        for node in self.nodes.values():
            if node.instance_id == instance_id:
                return node.label
        return "?"


def haproxy_config(servers: dict[str, int]) -> str:
    """``deploy/haproxy.cfg`` with this run's instances (the bind comes from the environment)."""
    text = HAPROXY_CFG.read_text()
    text = re.sub(r"^\s*server .*\n", "", text, flags=re.M)
    lines = "".join(f"    server {name} 127.0.0.1:{p} check\n" for name, p in servers.items())
    return text.rstrip("\n") + "\n" + lines


def broker_url_via(url: str, port: int) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    netloc_new = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
    return urlunsplit(parts._replace(netloc=netloc_new))


def instance_broker_url(target: Target, label: str, proxy: FaultProxy) -> str:
    """Instance ``label``'s broker URL: through its proxy, or for a broker cluster (a URL
    list) every node, instance A's list from node 1, B's from node 2, without the proxy."""
    if "," not in target.broker_url:
        return broker_url_via(target.broker_url, proxy.port)
    return rotated_broker_urls(target.broker_url, ("a", "b").index(label))


@asynccontextmanager
async def open_cluster(
    target: Target,
    opts: Options,
    *,
    env: dict[str, str] | None = None,
    sessions: bool = False,
) -> AsyncIterator[Cluster]:
    """Two ready instances, each through its own fault proxy to the broker, behind HAProxy.

    The broker must be running (``deploy/brokers.py start``; the CLI does that).
    Without ``sessions`` the instances run with ``TRIOWS_RESUME_WINDOW=0``: the
    broker faults measure what instances do for connected users, as the rows
    in docs/reliability.md did before sessions; the continuity faults
    (bench.faults.sessions) turn sessions on.
    """
    broker_port = urlsplit(target.broker_url.split(",")[0]).port or 5672
    exchange = f"triows-faults-{secrets.token_hex(4)}"
    with tempfile.TemporaryDirectory(prefix="triows-faults-") as tmp_name:
        tmp = Path(tmp_name)
        nodes: dict[str, Node] = {}
        both_ready = trio.Event()

        async def hold_node(label: str, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            instance_id = f"faults-{label}-{secrets.token_hex(3)}"
            log = tmp / f"{label}.log"
            with log.open("wb") as log_file:
                async with (
                    open_fault_proxy(broker_port) as proxy,
                    serve_instance(
                        target.backend,
                        broker_url=instance_broker_url(target, label, proxy),
                        env={
                            "TRIOWS_EXCHANGE": exchange,
                            "TRIOWS_INSTANCE_ID": instance_id,
                            "TRIOWS_RECONNECT_MAX": "1",
                            "TRIOWS_HEARTBEAT": str(opts.heartbeat),
                            "TRIOWS_QUEUE_EXPIRES": str(opts.queue_expires),
                            "TRIOWS_PING_INTERVAL": str(opts.ping_interval),
                            "TRIOWS_LOG_LEVEL": "INFO",
                            **({} if sessions else {"TRIOWS_RESUME_WINDOW": "0"}),
                            **(env or {}),
                        },
                        stderr=log_file.fileno(),
                    ) as instance,
                ):
                    await instance.wait_ready(STEP_TIMEOUT)
                    nodes[label] = Node(label, instance_id, instance, proxy, log)
                    if len(nodes) == 2:
                        both_ready.set()
                    task_status.started()
                    await trio.sleep_forever()

        async with AsyncExitStack() as stack:
            holders = await stack.enter_async_context(trio.open_nursery())
            stack.callback(holders.cancel_scope.cancel)
            for label in ("a", "b"):
                if target.fragile:
                    # One after the other, each ready before the next (GarageMQ, see tests/e2e.py).
                    await holders.start(hold_node, label)
                else:
                    holders.start_soon(hold_node, label)
            with trio.fail_after(STEP_TIMEOUT * 2):
                await both_ready.wait()
            nodes = {label: nodes[label] for label in ("a", "b")}
            lb_port = free_port()
            cfg = tmp / "haproxy.cfg"
            cfg.write_text(
                haproxy_config({n.label: urlsplit(n.base_url).port or 0 for n in nodes.values()})
            )
            nursery = await stack.enter_async_context(trio.open_nursery())
            haproxy: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    ["haproxy", "-db", "-f", str(cfg)],
                    env={**os.environ, "TRIOWS_HAPROXY_BIND": f"127.0.0.1:{lb_port}"},
                    check=False,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            try:
                lb_url = f"http://127.0.0.1:{lb_port}"
                await wait_for_status(f"{lb_url}/readyz", 200, STEP_TIMEOUT)
                yield Cluster(target, exchange, nodes, lb_url, tmp)
            finally:
                haproxy.terminate()
                nursery.cancel_scope.cancel()


def process_stats(node: Node) -> dict[str, float]:
    proc = psutil.Process(node.process.pid)
    return {"rss_mib": round(proc.memory_info().rss / 2**20, 1), "fds": proc.num_fds()}


def sessions_lost(cluster: Cluster) -> dict[str, list[str]]:
    """Per instance, why each lost broker session ended, as logged (first 100 chars)."""
    reasons: dict[str, list[str]] = {}
    for label, node in cluster.nodes.items():
        for line in node.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            # triows.backends.supervisor via triows.backoff: one line per lost session.
            if isinstance(entry, dict) and entry.get("event") == "broker_unavailable":
                reasons.setdefault(label, []).append(str(entry.get("error"))[:100])
    return reasons


def log_tails(cluster: Cluster, lines: int = 15) -> dict[str, list[str]]:
    """The last warnings and errors each instance logged."""
    tails = {}
    for label, node in cluster.nodes.items():
        logged = node.log.read_text(errors="replace").splitlines()
        # Long lines are tracebacks: their end says what went wrong.
        tails[label] = [
            line if len(line) <= 800 else f"{line[:300]} ... {line[-500:]}"
            for line in logged
            if '"info"' not in line
        ][-lines:]
    return tails
