"""``deploy/brokers.sh`` really starts every broker, and the test helpers work against it."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
import trio

import tests.brokers
from tests.brokers import (
    BROKER_NAMES,
    BROKERS_SCRIPT,
    OUTAGE_NAMES,
    broker_outage,
    require_broker,
    run_brokers_script,
)

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


async def test_stop_refuses_the_shared_rabbitmq() -> None:
    result = await run_brokers_script("stop", "rabbitmq")
    assert result.returncode != 0
    assert b"shared" in result.stderr
    await require_broker("rabbitmq")


async def test_check_of_unknown_broker_fails_with_the_known_names() -> None:
    result = await run_brokers_script("check", "no-such-broker")
    assert result.returncode != 0
    assert b"rabbitmq" in result.stderr


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_require_broker_fails_with_how_to_start_it_when_nothing_answers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copy of the script that looks for GarageMQ on a port where nothing
    # listens: the real brokers are left alone.
    deploy = tmp_path / "deploy"
    shutil.copytree(BROKERS_SCRIPT.parent, deploy)
    script = deploy / BROKERS_SCRIPT.name
    text = script.read_text()
    assert "readonly GARAGEMQ_PORT=5673\n" in text
    script.write_text(text.replace("GARAGEMQ_PORT=5673", f"GARAGEMQ_PORT={unused_port()}"))
    monkeypatch.setattr(tests.brokers, "BROKERS_SCRIPT", script)

    with pytest.raises(pytest.fail.Exception) as failure:
        await require_broker("garagemq")
    message = str(failure.value)
    assert "garagemq is not answering" in message
    assert "start it with: deploy/brokers.sh start garagemq" in message


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
