"""The ``triows`` command: ``serve`` runs Hypercorn's trio worker, ``token`` mints a JWT.

``serve`` checks the settings and hands over to :func:`triows.serving.serve`,
which drives Hypercorn itself (rather than ``hypercorn.run``) so that a
SIGTERM first drains the instance — ``/readyz`` 503, sockets closed with 1012,
subscriptions released — before Hypercorn stops.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio

from triows.auth import DEFAULT_TOKEN_TTL, mint_token
from triows.backend import UnknownBackend, check_backend_settings
from triows.protocol import InvalidInput
from triows.serving import serve
from triows.settings import Settings, SettingsError

# Plain text for --help: argparse prints it as is, so no reStructuredText markup.
DESCRIPTION = (
    "triows: serve runs the server (Hypercorn's trio worker), token mints a JWT, "
    "demo shows Anne messaging Bob on one machine."
)


class StartupError(Exception):
    """The server must not start with these settings; the message says why and what to do."""


def check_startup(settings: Settings) -> None:
    """Refuse settings that would be unsafe or could not work, with one clear message."""
    # Imports the backend and lets it check its settings: a malformed broker
    # URL fails here, with one line, not inside the server's lifespan.
    check_backend_settings(settings)
    if settings.dev_mode and not settings.binds_loopback_only and not settings.insecure:
        raise StartupError(
            "refusing to start in dev mode (no TRIOWS_SECRET) on a non-loopback address "
            f"({', '.join(settings.bind)}): anyone could claim any user name. Set "
            "TRIOWS_SECRET, bind to 127.0.0.1, or set TRIOWS_INSECURE=1 if you really mean it"
        )
    if settings.backend == "memory" and settings.workers > 1:
        raise StartupError(
            f"--workers {settings.workers} cannot work with the memory backend: each worker is a "
            "separate instance (process), and the memory backend cannot carry a message from one "
            "process to another, so users on different workers could not reach each other. Use "
            "--workers 1, or a broker backend (e.g. --backend amqp091 with RabbitMQ)"
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triows", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the server (Hypercorn, trio worker)")
    serve_parser.add_argument(
        "--bind", action="append", help="HOST:PORT to listen on (repeatable; TRIOWS_BIND)"
    )
    serve_parser.add_argument("--workers", type=int, help="worker processes (TRIOWS_WORKERS)")
    serve_parser.add_argument("--backend", help="broker backend (TRIOWS_BACKEND)")
    serve_parser.add_argument("--broker-url", help="broker URL (TRIOWS_BROKER_URL)")
    serve_parser.add_argument(
        "--url-file", help="once listening, write the URL of each bound address to this file"
    )
    token_parser = commands.add_parser("token", help="mint a token from TRIOWS_SECRET")
    token_parser.add_argument("user")
    token_parser.add_argument(
        "--ttl", type=float, default=DEFAULT_TOKEN_TTL, help="seconds until it expires"
    )
    token_parser.add_argument(
        "--room",
        action="append",
        default=[],
        help="a room the token may join and send to; a trailing * allows a prefix (repeatable)",
    )
    commands.add_parser("demo", help="start a server on the memory backend and show Anne and Bob")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``triows`` console script and ``python -m triows``."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            bind = tuple(args.bind) if args.bind else None
            settings = Settings.from_env(
                bind=bind, workers=args.workers, backend=args.backend, broker_url=args.broker_url
            )
            check_startup(settings)
            return serve(settings, args.url_file)
        if args.command == "token":
            settings = Settings.from_env()
            if not settings.secret:
                raise StartupError("TRIOWS_SECRET is not set: there is no secret to sign with")
            print(mint_token(settings.secret, args.user, args.ttl, tuple(args.room)))
            return 0
        from triows.demo import run_demo

        return trio.run(run_demo)
    except (SettingsError, StartupError, UnknownBackend, InvalidInput) as error:
        print(f"triows: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
