"""Run ``triows serve`` as a child process on a loopback port of its own (demo, tests, bench).

The child binds port 0, so the kernel gives it a free port, and reports the
port it got (``triows serve --url-file``): no other process can take the port
between its choice and its use, as it could if it were picked here first.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import httpx
import trio

START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
POLL_INTERVAL = 0.05


class InstanceFailed(Exception):
    """The ``triows serve`` child exited before it listened."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (and may, a moment later).

    For a port that should stay unanswered, or that a test will listen on
    itself; :func:`serve_instance` does not use it.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Instance:
    """A running ``triows serve`` process."""

    base_url: str
    process: trio.Process

    async def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll ``/readyz`` until it answers 200."""
        await wait_for_status(f"{self.base_url}/readyz", 200, timeout)

    def terminate(self) -> None:
        """Ask the instance to drain and stop (SIGTERM)."""
        self.process.send_signal(signal.SIGTERM)


async def wait_for_status(url: str, status: int, timeout: float = START_TIMEOUT) -> None:
    """Poll ``url`` until it answers ``status``; raise ``trio.TooSlowError`` after ``timeout``."""
    async with httpx.AsyncClient() as http:
        with trio.fail_after(timeout):
            while True:
                try:
                    if (await http.get(url)).status_code == status:
                        return
                except httpx.TransportError:
                    pass
                await trio.sleep(POLL_INTERVAL)


@asynccontextmanager
async def serve_instance(
    backend: str = "memory",
    *,
    broker_url: str | None = None,
    env: Mapping[str, str] | None = None,
    workers: int = 1,
    args: Sequence[str] = (),
    port: int | None = None,
    stderr: int | None = None,
    own_process_group: bool = False,
) -> AsyncIterator[Instance]:
    """Start ``triows serve`` and yield it once ``/healthz`` answers; stop it on exit.

    It listens on 127.0.0.1:``port``, by default a port the kernel picks. On
    exit it gets one SIGTERM (a drain) and is killed only if it has not
    exited within ``STOP_TIMEOUT``. ``own_process_group``: start it in a
    process group of its own, so that a Ctrl-C in the terminal reaches only
    the caller, which then stops it (once) when it chooses.
    """
    with tempfile.TemporaryDirectory(prefix="triows-serve-") as folder:
        url_file = trio.Path(folder) / "url"
        command = [
            sys.executable,
            "-m",
            "triows",
            "serve",
            "--bind",
            f"127.0.0.1:{port or 0}",
            "--url-file",
            str(url_file),
            "--backend",
            backend,
            "--workers",
            str(workers),
            *args,
        ]
        if broker_url is not None:
            command += ["--broker-url", broker_url]
        child_env = {**os.environ, "TRIOWS_LOG_LEVEL": "WARNING", **(env or {})}
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(
                    trio.run_process,
                    command,
                    env=child_env,
                    check=False,
                    stderr=stderr,
                    process_group=0 if own_process_group else None,
                    deliver_cancel=stopped_by_caller,
                )
            )
            try:
                instance = Instance(await _reported_url(url_file, process), process)
                await wait_for_status(f"{instance.base_url}/healthz", 200)
                yield instance
            finally:
                with trio.CancelScope(shield=True):
                    await stop_process(process)


async def _reported_url(url_file: trio.Path, process: trio.Process) -> str:
    """The URL the child wrote to ``url_file`` once listening; fail if it exits first."""
    with trio.fail_after(START_TIMEOUT):
        while True:
            if await url_file.exists():  # written whole, at once
                return (await url_file.read_text(encoding="utf-8")).split()[0]
            if process.returncode is not None:
                raise InstanceFailed(
                    f"triows serve exited with status {process.returncode} before listening"
                )
            await trio.sleep(POLL_INTERVAL)


async def stopped_by_caller(process: trio.Process) -> None:
    """``deliver_cancel`` for ``trio.run_process`` when the caller's ``finally`` stops the child.

    Trio's default sends SIGTERM the moment the block is cancelled, and
    SIGKILL 5 s later: a second SIGTERM on top of the caller's, and a kill in
    the middle of a drain that may rightly take longer. Here nothing is sent;
    :func:`stop_process` in the caller's ``finally`` stops the child, once.
    """


async def stop_process(process: trio.Process, stop_signal: int = signal.SIGTERM) -> None:
    """``stop_signal`` (SIGTERM), then SIGKILL if it has not exited in time."""
    if process.returncode is None:
        process.send_signal(stop_signal)
        with trio.move_on_after(STOP_TIMEOUT):
            await process.wait()
    if process.returncode is None:
        process.kill()
        await process.wait()
