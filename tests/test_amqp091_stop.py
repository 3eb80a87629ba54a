"""What an amqp091 ``triows serve`` logs when it stops: only a cancel it did not ask for warns.

A graceful stop cancels its own consumer before deleting its queue; deleting
a queue still consumed from makes the broker cancel the consumer, and the
client library logs that as a warning (right for an operator's delete, wrong
for our own stop).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from tests.brokers import require_broker
from tests.e2e import STEP_TIMEOUT, OutputLines, unique_exchange
from triows.client import open_events
from triows.process import Instance, serve_instance
from triows.protocol import CLOSE_DRAINING


@asynccontextmanager
async def amqp091_instance() -> AsyncIterator[tuple[Instance, OutputLines]]:
    """An amqp091 ``triows serve`` logging at INFO, and its log lines as they come."""
    await require_broker("rabbitmq")
    output = OutputLines()
    env = {"TRIOWS_EXCHANGE": unique_exchange(), "TRIOWS_LOG_LEVEL": "INFO"}
    async with (
        trio.open_nursery() as nursery,
        serve_instance("amqp091", env=env, stderr=subprocess.PIPE) as instance,
    ):
        assert instance.process.stderr is not None
        nursery.start_soon(output.collect, instance.process.stderr)
        yield instance, output


async def test_a_graceful_stop_logs_no_warning() -> None:
    async with amqp091_instance() as (instance, output):
        async with open_events(instance.base_url, user="Bob") as bob:
            instance.terminate()
            with trio.fail_after(STEP_TIMEOUT):
                assert await bob.wait_closed() == CLOSE_DRAINING
        with trio.fail_after(STEP_TIMEOUT):
            assert await instance.process.wait() == 0
    records = output.log_records()
    events = [record["event"] for record in records]
    stopping = records[events.index("drain_start") :]
    assert "stop" in [record["event"] for record in stopping]
    assert [record for record in stopping if record["level"] != "info"] == []


async def test_a_queue_deleted_by_an_operator_is_still_a_warning() -> None:
    async with amqp091_instance() as (_, output):
        with trio.fail_after(STEP_TIMEOUT):
            connected = json.loads(await output.wait_for('"broker_connected"'))
        await trio.run_process(
            ["rabbitmqctl", "delete_queue", connected["queue"]], capture_stdout=True
        )
        with trio.fail_after(STEP_TIMEOUT):
            cancelled = json.loads(await output.wait_for("cancelled by the broker"))
        assert cancelled["level"] == "warning"
