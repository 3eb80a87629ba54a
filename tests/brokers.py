"""The tests' way to the real brokers: the broker table, ``deploy/brokers.py``.

Names, ports, URLs and outage locks come from the table (``deploy.brokers``);
tests never start, stop or probe a broker themselves, they run the table's
script, so the commands live in one place. Broker names are the table's:
``rabbitmq``, ``rabbitmq-amqp10``, ``rabbitmq-stomp``, ``activemq``,
``garagemq``, ``rabbitmq-alarm``, ``rabbitmq-cluster`` (and its nodes
``rabbitmq-cluster-1``..``3``, whose URL lists :func:`cluster_urls` gives).
A port is moved with the table's environment variable
(``TRIOWS_BROKERS_<NAME>_PORT``), which the script sees too.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio

from deploy.brokers import BROKERS, OUTAGE_NAMES, SCRIPT, start_hint
from deploy.brokers import cluster_urls as cluster_urls  # for the cluster tests

BROKER_NAMES = tuple(BROKERS)
# A hang guard for bringing a broker back; the script bounds its own waits.
OUTAGE_END_TIMEOUT = 180


async def run_brokers_script(*args: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``deploy/brokers.py ARGS...`` and return its result (never raises on exit status)."""
    return await trio.run_process(
        [sys.executable, str(SCRIPT), *args], capture_stdout=True, capture_stderr=True, check=False
    )


def _script_message(result: subprocess.CompletedProcess[bytes]) -> str:
    text = (result.stderr or result.stdout).decode(errors="replace").strip()
    return text or f"deploy/brokers.py exited with {result.returncode}"


async def require_broker(name: str) -> None:
    """Fail the test (never skip it) unless broker ``name`` answers its protocol.

    The failure says how to start the broker. While another test holds the
    broker's outage lock this waits (up to the script's bound) for the outage
    to end rather than failing.
    """
    result = await run_brokers_script("check", name)
    if result.returncode != 0:
        message = _script_message(result)
        if start_hint(name) not in message:
            message = f"{message}; {start_hint(name)}"
        pytest.fail(message, pytrace=False)


@asynccontextmanager
async def broker_outage(
    name: str, *, take_down: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[None]:
    """Take broker ``name`` down for the block, then bring it back and wait until it answers.

    ``name`` is ``rabbitmq`` (its app is stopped; the AMQP 1.0 and STOMP
    plugins go down with it) or ``activemq`` (the process is stopped), or a
    node of ``rabbitmq-cluster``; ``take_down`` replaces the script's
    ``outage-begin`` (say, to SIGKILL a cluster node: ``outage-end`` boots a
    node that is gone, with its data, and it rejoins the cluster). The
    broker family's outage lock (``Broker.lock_path``) is held from before the
    broker goes down until it answers again, so concurrent test runs never
    overlap their outages and ``deploy/brokers.py start``/``check`` wait for the
    outage to end. The broker is brought back even when the block raises or is
    cancelled. Inside the block, do not call :func:`require_broker` for the
    same broker family: it waits for the lock this holds.
    ``deploy/brokers.py status NAME`` does not.
    """
    if name not in OUTAGE_NAMES:
        raise ValueError(f"broker_outage supports {OUTAGE_NAMES}, not {name!r}")
    # O_CLOEXEC (Python's default): the brokers the script starts must not
    # inherit the lock.
    lock_fd = os.open(BROKERS[name].lock_path, os.O_WRONLY | os.O_CREAT, 0o666)
    try:
        # flock blocks, so it waits in a thread; on cancellation the thread is
        # abandoned, and closing the descriptor below drops the lock it may
        # still take.
        await trio.to_thread.run_sync(fcntl.flock, lock_fd, fcntl.LOCK_EX, abandon_on_cancel=True)
        try:
            if take_down is None:
                begun = await run_brokers_script("outage-begin", name)
                if begun.returncode != 0:
                    message = _script_message(begun)
                    pytest.fail(f"outage-begin {name} failed: {message}", pytrace=False)
            else:
                await take_down()
            yield
        finally:
            with trio.CancelScope(shield=True), trio.fail_after(OUTAGE_END_TIMEOUT):
                ended = await run_brokers_script("outage-end", name)
            if ended.returncode != 0:
                pytest.fail(f"outage-end {name} failed: {_script_message(ended)}", pytrace=False)
    finally:
        os.close(lock_fd)


@asynccontextmanager
async def memory_alarm(name: str = "rabbitmq-alarm") -> AsyncIterator[None]:
    """Raise the memory alarm of RabbitMQ node ``name`` for the block (cleared even on error).

    Under it the broker stops reading from every connection that publishes
    (``connection.blocked``). Only ``rabbitmq-alarm``, a node no other test uses.
    """
    raised = await run_brokers_script("alarm-begin", name)
    if raised.returncode != 0:
        pytest.fail(f"alarm-begin {name} failed: {_script_message(raised)}", pytrace=False)
    try:
        yield
    finally:
        with trio.CancelScope(shield=True):
            cleared = await run_brokers_script("alarm-end", name)
        if cleared.returncode != 0:
            pytest.fail(f"alarm-end {name} failed: {_script_message(cleared)}", pytrace=False)
