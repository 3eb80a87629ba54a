"""A mass reconnect: N idle sessions on instance B, B drained or killed, all resuming on A.

``python -m bench.mass_resume [--target amqp091-rabbitmq] [--sessions 5000]
[--holders 4] [--fault drain|kill]`` starts two instances A and B of the
target, has ``--holders`` processes (``bench.resume_holder``) open
``--sessions`` idle sessions on B between them, then SIGTERMs (``drain``) or
SIGKILLs (``kill``) B: every socket ends and its holder resumes it on A at
once, with its token. Measured: seconds from the signal until every session
had a ``hello`` saying ``"resumed": true`` on A (and the median), how many
came back not resumed or not at all, B's RSS with the sessions open, and the
broker's memory (RabbitMQ: ``erlang:memory(total)`` before, with the sessions
open and at its peak during the reconnect; the node's RSS sampled every
``RSS_EVERY`` s, for the peak between two of those reads). One JSON line
per run is appended to ``--out`` (default ``bench/results/mass-resume.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import trio

from bench.broker_memory import rabbitmq_memory, rabbitmq_node_process, session_queues
from bench.machine import machine_facts
from bench.targets import TARGETS, ensure_broker, holding_broker
from triows.process import serve_instance

RESULTS = Path(__file__).resolve().parent / "results" / "mass-resume.jsonl"
READY_TIMEOUT = 60.0
# Opening the sessions; then the reconnect (the holders give up after their own deadline).
OPEN_TIMEOUT = 600.0
RESUME_TIMEOUT = 400.0
RSS_EVERY = 0.1
# The node is read with rabbitmqctl (an Erlang VM of its own each time): back to back.
STOP_TIMEOUT = 120.0


async def _read_line(stream: trio.abc.ReceiveStream, buffer: bytearray) -> str:
    while b"\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise EOFError("the holder exited")
        buffer += chunk
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


class Peak:
    """The highest of a series of readings, taken until stopped."""

    def __init__(self) -> None:
        self.highest = 0
        self.readings = 0

    def take(self, value: int | None) -> None:
        if value is not None:
            self.highest = max(self.highest, value)
            self.readings += 1


async def sample_rss(processes: list[psutil.Process], peak: Peak) -> None:
    while True:
        peak.take(sum(process.memory_info().rss for process in processes) or None)
        await trio.sleep(RSS_EVERY)


def progress(text: str) -> None:
    print(f"mass_resume: {time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


async def sample_erlang(peak: Peak) -> None:
    while True:
        peak.take(await rabbitmq_memory())


async def run(target_name: str, sessions: int, holders: int, fault: str) -> dict[str, Any]:
    target = TARGETS[target_name]
    await trio.to_thread.run_sync(ensure_broker, target)
    exchange = f"triows-mass-{secrets.token_hex(4)}"
    env = {"TRIOWS_EXCHANGE": exchange, "TRIOWS_MAX_CONNECTIONS": str(sessions * 2)}
    on_rabbitmq = target.family == "rabbitmq"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    async with (
        holding_broker(target),
        serve_instance(target.backend, broker_url=target.broker_url, env=env) as a,
        serve_instance(target.backend, broker_url=target.broker_url, env=env) as b,
    ):
        await a.wait_ready(READY_TIMEOUT)
        await b.wait_ready(READY_TIMEOUT)
        node = await rabbitmq_node_process() if on_rabbitmq else None
        broker = [psutil.Process(node)] if node is not None else []
        erlang_before = await rabbitmq_memory() if on_rabbitmq else None
        b_rss_before = psutil.Process(b.process.pid).memory_info().rss
        progress("A and B ready")
        share = -(-sessions // holders)
        processes: list[trio.Process] = []
        buffers: list[bytearray] = []
        opened = failed = 0
        opening = time.monotonic()
        try:
            for index in range(holders):
                count = min(share, sessions - index * share)
                process = await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-m",
                        "bench.resume_holder",
                        b.base_url.replace("http://", "ws://"),
                        a.base_url.replace("http://", "ws://"),
                        f"m{index}-",
                        str(count),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
                processes.append(process)
                buffers.append(bytearray())
            with trio.fail_after(OPEN_TIMEOUT):
                for process, buffer in zip(processes, buffers, strict=True):
                    assert process.stdout is not None
                    words = (await _read_line(process.stdout, buffer)).split()
                    opened += int(words[1])
                    failed += int(words[3])
            open_s = round(time.monotonic() - opening, 1)
            progress(f"{opened} sessions open on B in {open_s} s ({failed} failed)")
            await trio.sleep(2.0)  # the sessions' consumers settle
            b_rss_open = psutil.Process(b.process.pid).memory_info().rss
            erlang_open = await rabbitmq_memory() if on_rabbitmq else None
            queues_open = await session_queues(exchange) if on_rabbitmq else None
            rss_peak, erlang_peak = Peak(), Peak()
            summaries: list[dict[str, Any]] = []
            async with trio.open_nursery() as sampling:
                sampling.start_soon(sample_rss, broker, rss_peak)
                if on_rabbitmq:
                    sampling.start_soon(sample_erlang, erlang_peak)
                broker_rss_open = sum(p.memory_info().rss for p in broker)
                progress(f"B gets {fault}")
                signalled = time.monotonic()
                b_exit_s: float | None = None
                b_exited = trio.Event()

                async def watch_b_exit() -> None:
                    nonlocal b_exit_s
                    await b.process.wait()
                    b_exit_s = round(time.monotonic() - signalled, 3)
                    b_exited.set()

                sampling.start_soon(watch_b_exit)
                b.process.send_signal(signal.SIGTERM if fault == "drain" else signal.SIGKILL)
                with trio.fail_after(RESUME_TIMEOUT):
                    for process, buffer in zip(processes, buffers, strict=True):
                        assert process.stdout is not None
                        summaries.append(json.loads(await _read_line(process.stdout, buffer)))
                    await b_exited.wait()
                sampling.cancel_scope.cancel()
            progress("every holder reported")
            erlang_after = await rabbitmq_memory() if on_rabbitmq else None
            queues_after = await session_queues(exchange) if on_rabbitmq else None
        finally:
            for process in processes:
                if process.stdin is not None:
                    await process.stdin.aclose()  # the holders close their sockets normally
            with trio.move_on_after(STOP_TIMEOUT):
                for process in processes:
                    await process.wait()
            for process in processes:
                if process.returncode is None:
                    process.kill()
    resumed_at = sorted(t for summary in summaries for t in summary["resumed_at"])
    resumed = len(resumed_at)

    def mib(value: int | None) -> float | None:
        return None if value is None else round(value / 2**20, 1)

    return {
        "target": target_name,
        "fault": fault,
        "started": started,
        "command": "python -m bench.mass_resume " + " ".join(sys.argv[1:]),
        # Settings the instances took from this environment.
        "env": {key: value for key, value in os.environ.items() if key.startswith("TRIOWS_")},
        "sessions": sessions,
        "holders": holders,
        "opened": opened,
        "open_failed": failed,
        "open_s": open_s,
        "b_exit_s": b_exit_s,
        "resumed": resumed,
        "not_resumed": sum(summary["not_resumed"] for summary in summaries),
        "not_back": opened - sum(summary["back"] for summary in summaries),
        "attempts": sum(summary["attempts"] for summary in summaries),
        # From the signal to B until the last (and the median) resumed hello on A.
        "all_resumed_s": round(resumed_at[-1] - signalled, 3) if resumed == opened else None,
        "median_resumed_s": round(statistics.median(resumed_at) - signalled, 3)
        if resumed_at
        else None,
        "last_resumed_s": round(resumed_at[-1] - signalled, 3) if resumed_at else None,
        "b_rss_mib": [mib(b_rss_before), mib(b_rss_open)],
        "b_kib_per_session": round((b_rss_open - b_rss_before) / 1024 / max(1, opened), 1),
        "broker_erlang_mib": {
            "before": mib(erlang_before),
            "open": mib(erlang_open),
            "peak": mib(erlang_peak.highest or None),
            "peak_readings": erlang_peak.readings,
            "after": mib(erlang_after),
        },
        "broker_rss_mib": {"open": mib(broker_rss_open), "peak": mib(rss_peak.highest or None)},
        "broker_kib_per_session": (
            None
            if erlang_before is None or erlang_open is None
            else round((erlang_open - erlang_before) / 1024 / max(1, opened), 1)
        ),
        # The run's session queues (count, MiB their processes use) as the node lists them.
        "session_queues": {
            "open": None if queues_open is None else [queues_open[0], mib(queues_open[1])],
            "after": None if queues_after is None else [queues_after[0], mib(queues_after[1])],
        },
        "queue_kib_per_session": (
            None
            if not queues_open or not queues_open[0]
            else round(queues_open[1] / 1024 / queues_open[0], 1)
        ),
        "machine": {
            key: value
            for key, value in machine_facts().items()
            if key in ("cpu_model", "logical_cores", "load_average_at_start")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.mass_resume", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--target", default="amqp091-rabbitmq", choices=sorted(TARGETS))
    parser.add_argument("--sessions", type=int, default=5000)
    parser.add_argument("--holders", type=int, default=4, help="client processes")
    parser.add_argument("--fault", choices=("drain", "kill"), default="drain")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the children inherit it
    os.environ.setdefault("TRIOWS_LOG_LEVEL", "WARNING")
    row = trio.run(run, args.target, args.sessions, args.holders, args.fault)
    print(json.dumps(row, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as out:
        out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
