"""Broker sessions dropped while clients' tokens expire as they send.

A token expiry closes the socket with 4401 by cancelling the scope that also
runs the client's publish, so every expiry cuts a publish short somewhere. A
cut that drops the instance's broker session costs every user of the instance
(``/readyz`` 503, every ``/send`` in flight 503, every held key restored). This
runs one real ``triows serve`` on a broker, ``--clients`` clients that each
connect with a token expiring in ``--ttl`` seconds and send as fast as the
server answers until it closes them, and again, until ``--expiries`` closes
with 4401; it counts the broker sessions the instance lost meanwhile (its
``broker_not_ready`` log lines) and why each reconnect was needed (``causes``:
"the broker connection ended" is a session the instance dropped itself).

    python -m bench.token_expiry --target stomp-rabbitmq --expiries 1000
    python -m bench.token_expiry --server-code /path/to/checkout ...   # another version

``--server-code`` runs the server from another source tree (its ``triows`` and
``backends`` packages go first on the server's ``PYTHONPATH``), so that two
versions are measured by the same client.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import trio
from trio_websocket import ConnectionClosed, HandshakeError

from bench.targets import TARGETS
from triows.auth import mint_token
from triows.client import open_events
from triows.process import serve_instance
from triows.protocol import CLOSE_TOKEN_EXPIRED

# The server's per-connection send limits, raised so that a client's frames
# keep its publishes in flight until the expiry (the defaults: 100/s, 50).
SEND_RATE = "100000"
SEND_BURST = "100000"
# Sends a client has not had answered yet (its frames in flight).
IN_FLIGHT = 16
# Seconds between two progress lines on stderr.
PROGRESS_INTERVAL = 10.0
# A hang guard for the whole run.
RUN_TIMEOUT = 1800.0


async def run(
    target: str, clients: int, expiries: int, ttl: int, server_code: Path | None
) -> dict[str, object]:
    broker = TARGETS[target]
    secret = secrets.token_hex(16)
    env = {
        "TRIOWS_SECRET": secret,
        "TRIOWS_SEND_RATE": SEND_RATE,
        "TRIOWS_SEND_BURST": SEND_BURST,
        "TRIOWS_LOG_LEVEL": "INFO",
        "TRIOWS_EXCHANGE": f"bench-expiry-{secrets.token_hex(4)}",
    }
    if server_code is not None:
        env["PYTHONPATH"] = str(server_code)
    expired = 0
    other_closes: dict[int, int] = {}
    refused = 0
    done = trio.Event()

    def closed_with(code: int) -> None:
        nonlocal expired
        if code == CLOSE_TOKEN_EXPIRED:
            expired += 1
            if expired >= expiries:
                done.set()
        else:
            other_closes[code] = other_closes.get(code, 0) + 1

    async def connection(user: str, base_url: str) -> None:
        token = mint_token(secret, user, ttl=ttl)
        closed = trio.CancelScope()
        with closed:
            await connect_and_send(user, base_url, token, closed)

    async def connect_and_send(
        user: str, base_url: str, token: str, closed: trio.CancelScope
    ) -> None:
        async with open_events(base_url, token=token) as events:
            credit = trio.Semaphore(IN_FLIGHT)
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    try:
                        while True:
                            await events.receive()
                            credit.release()
                    except ConnectionClosed as ended:
                        closed_with(ended.reason.code if ended.reason is not None else 1005)
                    # Closed by the server: done. (trio-websocket's own close
                    # of it may wait for frames nobody reads any more.)
                    closed.cancel()

                nursery.start_soon(read)
                sent = 0
                try:
                    while True:
                        await credit.acquire()
                        await events.send(user, sent)
                        sent += 1
                except ConnectionClosed:
                    await trio.sleep_forever()  # the reader records how it closed

    async def client(number: int, base_url: str) -> None:
        nonlocal refused
        while not done.is_set():
            try:
                await connection(f"u{number}", base_url)
            except ConnectionClosed as closed:  # before its hello
                closed_with(closed.reason.code if closed.reason is not None else 1005)
            except (HandshakeError, OSError):
                refused += 1  # /readyz 503 while the session reconnects, or the limit
                await trio.sleep(0.1)

    with tempfile.TemporaryFile() as log:
        async with serve_instance(
            broker.backend, broker_url=broker.broker_url, env=env, stderr=log.fileno()
        ) as instance:
            with trio.fail_after(RUN_TIMEOUT):
                async with trio.open_nursery() as nursery:
                    for number in range(clients):
                        nursery.start_soon(client, number, instance.base_url)
                    while not done.is_set():
                        with trio.move_on_after(PROGRESS_INTERVAL):
                            await done.wait()
                        print(
                            f"token_expiry: {expired} expiries, {refused} refused, "
                            f"other closes {other_closes}",
                            file=sys.stderr,
                            flush=True,
                        )
                    stopped_at = time.time()
                    nursery.cancel_scope.cancel()
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
    # Sessions lost while the clients ran (the close at the end logs one too).
    events = [json.loads(line) for line in lines if line.startswith("{")]
    dropped = sum(
        event.get("event") == "broker_not_ready" and event.get("ts", 0) < stopped_at
        for event in events
    )
    # Why each lost session was lost (the reconnect's log line says).
    causes: dict[str, int] = {}
    for event in events:
        if event.get("event") == "broker_unavailable":
            cause = str(event.get("error", ""))[:120]
            causes[cause] = causes.get(cause, 0) + 1
    return {
        "target": target,
        "server_code": str(server_code) if server_code else "this tree",
        "clients": clients,
        "ttl_s": ttl,
        "expiries": expired,
        "sessions_dropped": dropped,
        "dropped_per_1000_expiries": round(1000 * dropped / max(1, expired), 1),
        "causes": causes,
        "other_closes": other_closes,
        "connects_refused": refused,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--target", default="stomp-rabbitmq", choices=sorted(TARGETS))
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--expiries", type=int, default=1000)
    parser.add_argument("--ttl", type=int, default=2, help="token lifetime, whole seconds")
    parser.add_argument("--server-code", type=Path, default=None)
    args = parser.parse_args(argv)
    row = trio.run(run, args.target, args.clients, args.expiries, args.ttl, args.server_code)
    print(json.dumps(row), file=sys.stdout)


if __name__ == "__main__":
    main()
