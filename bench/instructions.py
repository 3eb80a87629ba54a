"""Instructions per message, counted by callgrind: a figure the machine's load cannot move.

``python -m bench.instructions [--tree DIR] [--few 50] [--many 450] [--backend
memory]`` runs ``triows serve`` (dev mode; with a broker backend the one
instance publishes to the broker and receives its own messages) under ``valgrind --tool=callgrind``
twice, once for ``--few`` and once for ``--many`` messages: each a ``POST
/send`` on one keep-alive connection to a user whose WebSocket reads it. The
difference of the two totals, divided by the difference of the counts, is the
instructions one message costs the server (HTTP request, routing, WebSocket
frame), start-up and shutdown cancelled out. ``--tree`` runs another checkout's
code (``python -m`` imports from the working directory first), so two versions
compare in one run. Needs valgrind (Debian package ``valgrind``) and the bench
extra (``websockets``).

Counts, not seconds: callgrind gives the same total for the same code and
inputs whatever else the machine does, where CPU seconds on this shared VM
varied by 2x between runs of the same code.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from websockets.sync.client import connect

from triows.process import free_port

START_TIMEOUT = 300.0
STEP_TIMEOUT = 120.0


def count(tree: Path, messages: int, backend: str = "memory") -> int:
    """Total instructions of one ``triows serve`` run that carries ``messages`` messages."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "TRIOWS_SEND_RATE": "100000",
        "TRIOWS_SEND_BURST": "100000",
        "TRIOWS_LOG_LEVEL": "WARNING",
        "TRIOWS_BACKEND": backend,
    }
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        server = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "triows",
                "serve",
                "--bind",
                f"127.0.0.1:{port}",
            ],
            cwd=tree,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_healthy(base)
            _carry(base, port, messages)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=START_TIMEOUT)
        for line in out.read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"callgrind wrote no total for {tree}")


def _wait_healthy(base: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("triows serve under callgrind did not become healthy")


def _carry(base: str, port: int, messages: int) -> None:
    with connect(f"ws://127.0.0.1:{port}/events?user=bob", open_timeout=STEP_TIMEOUT) as socket:
        socket.recv(timeout=STEP_TIMEOUT)  # hello
        received = 0

        def read() -> None:
            nonlocal received
            while received < messages:
                socket.recv(timeout=STEP_TIMEOUT)
                received += 1

        reader = threading.Thread(target=read)
        reader.start()
        with httpx.Client(timeout=STEP_TIMEOUT) as client:
            for number in range(messages):
                body = {"to": "bob", "from": "anne", "message": {"n": number, "pad": "x" * 60}}
                answer = client.post(f"{base}/send", json=body)
                if answer.status_code != 202:
                    raise RuntimeError(f"POST /send answered {answer.status_code}: {answer.text}")
        reader.join(timeout=STEP_TIMEOUT)
        if received != messages:
            raise RuntimeError(f"{received} of {messages} messages arrived")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--tree", action="append", type=Path, help="a checkout (repeatable)")
    parser.add_argument("--few", type=int, default=50)
    parser.add_argument("--many", type=int, default=450)
    parser.add_argument(
        "--backend", default="memory", help="a broker backend sends each message through its broker"
    )
    args = parser.parse_args(argv)
    trees = args.tree or [Path(__file__).resolve().parent.parent]
    for tree in trees:
        few, many = count(tree, args.few, args.backend), count(tree, args.many, args.backend)
        per_message = (many - few) / (args.many - args.few)
        print(f"{tree}: {per_message:,.0f} instructions per message ({few:,} / {many:,} in all)")


if __name__ == "__main__":
    main()
