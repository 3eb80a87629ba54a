"""``deploy/brokers.py`` really starts every broker, and the test helpers work against it."""

from __future__ import annotations

import random
import socket
import sys
from pathlib import Path

import pytest
import trio

from deploy import brokers as table
from tests.brokers import (
    BROKER_NAMES,
    BROKERS,
    OUTAGE_NAMES,
    broker_outage,
    require_broker,
    run_brokers_script,
)
from triows.process import free_port

pytestmark = pytest.mark.broker

# Hang guards only: a cold start may install Debian packages first.
START_TIMEOUT = 600
OUTAGE_TIMEOUT = 300


@pytest.mark.parametrize("name", BROKER_NAMES)
async def test_check_passes_after_start(name: str) -> None:
    with trio.fail_after(START_TIMEOUT):
        started = await run_brokers_script("start", name)
    assert started.returncode == 0, started.stderr.decode()
    checked = await run_brokers_script("check", name)
    assert checked.returncode == 0, checked.stderr.decode()


async def test_start_twice_changes_nothing() -> None:
    with trio.fail_after(START_TIMEOUT):
        first = await run_brokers_script("start")
        second = await run_brokers_script("start")
    assert (first.returncode, second.returncode) == (0, 0), second.stderr.decode()
    # Every broker already answered, so the second run had nothing to start.
    assert b"starting" not in second.stderr
    status = await run_brokers_script("status")
    assert status.returncode == 0, status.stdout.decode()
    # One line per broker, each with the table's port.
    lines = status.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == list(BROKER_NAMES)
    for line, broker in zip(lines, BROKERS.values(), strict=True):
        assert line.endswith(f"127.0.0.1:{broker.port}"), line


async def test_stop_refuses_the_shared_rabbitmq() -> None:
    result = await run_brokers_script("stop", "rabbitmq")
    assert result.returncode != 0
    assert b"shared" in result.stderr
    await require_broker("rabbitmq")


async def test_check_of_unknown_broker_fails_with_the_known_names() -> None:
    result = await run_brokers_script("check", "no-such-broker")
    assert result.returncode != 0
    assert b"rabbitmq" in result.stderr


def test_a_port_variable_moves_the_port_and_url_of_its_broker_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = {name: broker.url for name, broker in BROKERS.items()}
    monkeypatch.setenv(BROKERS["rabbitmq"].port_variable, "5999")
    # AMQP 0-9-1 and 1.0 share RabbitMQ's listener, so one variable moves both.
    assert BROKERS["rabbitmq"].url == "amqp://guest:guest@127.0.0.1:5999/"
    assert BROKERS["rabbitmq-amqp10"].url == "amqp://guest:guest@127.0.0.1:5999"
    for name in ("rabbitmq-stomp", "activemq", "garagemq"):
        assert BROKERS[name].url == before[name]


def test_a_port_variable_that_is_not_a_port_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BROKERS["garagemq"].port_variable, "5673x")
    with pytest.raises(table.Failure, match="TRIOWS_BROKERS_GARAGEMQ_PORT"):
        _ = BROKERS["garagemq"].port


async def test_require_broker_fails_with_how_to_start_it_when_nothing_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The table's port variable points the script at a port where nothing
    # listens: the real brokers are left alone.
    port = free_port()
    monkeypatch.setenv(BROKERS["garagemq"].port_variable, str(port))

    with pytest.raises(pytest.fail.Exception) as failure:
        await require_broker("garagemq")
    message = str(failure.value)
    assert f"garagemq is not answering: 127.0.0.1:{port}" in message
    assert "start it with: deploy/brokers.py start garagemq" in message


def free_port_pair(offset: int) -> int:
    """A port P such that neither P nor P + ``offset`` is taken on 127.0.0.1 right now."""
    for _ in range(100):
        port = random.randrange(20000, 65535 - offset)
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + offset))
        except OSError:
            continue
        return port
    raise AssertionError("no free pair of ports")


async def test_a_port_variable_starts_a_broker_of_the_script_there_and_stop_ends_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A second GarageMQ, in a runtime folder of its own: the shared one is left alone.
    port = free_port_pair(table.GARAGEMQ_ADMIN_OFFSET)
    monkeypatch.setenv("TRIOWS_BROKERS_RUN_DIR", str(tmp_path))
    monkeypatch.setenv(BROKERS["garagemq"].port_variable, str(port))
    try:
        with trio.fail_after(START_TIMEOUT):
            started = await run_brokers_script("start", "garagemq")
        assert started.returncode == 0, started.stderr.decode()
        status = await run_brokers_script("status", "garagemq")
        assert status.stdout.decode().split() == [
            "garagemq",
            "up",
            "AMQP",
            "0-9-1",
            f"127.0.0.1:{port}",
        ]
    finally:
        stopped = await run_brokers_script("stop", "garagemq")
    assert stopped.returncode == 0, stopped.stderr.decode()
    after = await run_brokers_script("status", "garagemq")
    assert b"DOWN" in after.stdout
    monkeypatch.delenv(BROKERS["garagemq"].port_variable)
    await require_broker("garagemq")  # the shared one, on the default port, still answers


def test_a_spawned_broker_that_exits_is_given_up_at_once_with_its_log_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(BROKERS["garagemq"].port_variable, str(free_port()))
    command = [sys.executable, "-c", "print('cannot open the db'); raise SystemExit(3)"]
    table.spawn(tmp_path, "garagemq", command)

    with pytest.raises(table.Failure, match=r"gave up waiting for garagemq .*: the process exited"):
        # Far longer than the child lives: giving up must not wait it out.
        table.wait_for_spawned(BROKERS["garagemq"], 600, tmp_path, sys.executable)
    assert "cannot open the db" in capsys.readouterr().err


@pytest.mark.parametrize("name", OUTAGE_NAMES)
async def test_broker_outage_takes_the_broker_down_and_brings_it_back(name: str) -> None:
    await require_broker(name)
    with trio.fail_after(OUTAGE_TIMEOUT):
        async with broker_outage(name):
            # `status` (unlike `check`) does not wait for the outage lock we hold.
            during = await run_brokers_script("status", name)
            assert during.returncode != 0
            assert b"DOWN" in during.stdout
        await require_broker(name)


async def test_broker_outage_brings_the_broker_back_when_the_block_raises() -> None:
    with trio.fail_after(OUTAGE_TIMEOUT), pytest.raises(KeyError):
        async with broker_outage("activemq"):
            raise KeyError("the test body failed")
    await require_broker("activemq")


async def test_the_cluster_starts_once_and_its_three_nodes_answer_as_one() -> None:
    with trio.fail_after(START_TIMEOUT):
        first = await run_brokers_script("start", "rabbitmq-cluster")
        second = await run_brokers_script("start", "rabbitmq-cluster")
    assert (first.returncode, second.returncode) == (0, 0), second.stderr.decode()
    # Every node answered and all three ran as one cluster: nothing to start or join.
    assert b"starting" not in second.stderr
    assert b"joining" not in second.stderr
    names = ["rabbitmq-cluster", *(f"rabbitmq-cluster-{n}" for n in (1, 2, 3))]
    status = await run_brokers_script("status", *names)
    assert status.returncode == 0, status.stdout.decode()
    assert [line.split()[-1] for line in status.stdout.decode().splitlines()] == [
        "127.0.0.1:5701",
        "127.0.0.1:5701",
        "127.0.0.1:5702",
        "127.0.0.1:5703",
    ]
    # `check rabbitmq-cluster` also asks node 1 which nodes run in its cluster.
    checked = await run_brokers_script("check", "rabbitmq-cluster")
    assert checked.returncode == 0, checked.stderr.decode()
    # The machine's node is another node, untouched.
    await require_broker("rabbitmq")
