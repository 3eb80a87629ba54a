"""Sessions: lint, typecheck and tests (the default), unit, brokers, serve, demo, bench,
bench_matrix, faults, cluster."""

from __future__ import annotations

from typing import Any

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True

BROKERS_SCRIPT = "deploy/brokers.py"


def install(session: nox.Session, *extras: str) -> None:
    """Install triows (editable) with ``extras`` into the session's virtualenv."""
    target = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", target)


def brokers(session: nox.Session, *args: str, **kwargs: Any) -> None:
    session.run("python3", BROKERS_SCRIPT, *args, external=True, **kwargs)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole suite, against real brokers (started here if they are not running)."""
    # "bench": tests/test_bench_quick.py runs the bench's quick matrix once.
    install(session, "test", "bench")
    brokers(session, "start")
    session.run("pytest", *session.posargs)


@nox.session
def unit(session: nox.Session) -> None:
    """The fast loop: every test that needs no broker and no server process (no broker started).

    The ``broker`` and ``server`` markers are added by tests/conftest.py from
    what each test module uses; arguments after ``--`` go to pytest.
    """
    # "bench": the bench's own unit tests (tests/test_bench_tally.py) import it.
    install(session, "test", "bench")
    session.run("pytest", "-m", "not broker and not server", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    install(session, "test")
    session.install("mypy")
    session.run("mypy")


@nox.session(name="brokers")
def brokers_session(session: nox.Session) -> None:
    """``nox -s brokers -- start|stop|status [NAME...]`` (default: start all)."""
    brokers(session, *(session.posargs or ["start"]))


@nox.session
def serve(session: nox.Session) -> None:
    """Run ``triows serve`` with the flags after ``--`` (memory backend by default)."""
    install(session)
    session.run("triows", "serve", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Start a server on the memory backend and show Anne messaging Bob."""
    install(session)
    session.run("triows", "demo")


@nox.session
def bench(session: nox.Session) -> None:
    """``nox -s bench -- SCENARIO... [--backend TARGET] [--quick]``; see bench/README.md."""
    install(session, "bench")
    # A broker that cannot start becomes an error row of the bench, not a failed session.
    brokers(session, "start", success_codes=[0, 1])
    session.run("python", "-m", "bench", *session.posargs)


@nox.session
def bench_matrix(session: nox.Session) -> None:
    """Every scenario on every broker (``-- --quick`` for the brief run CI does)."""
    install(session, "bench")
    brokers(session, "start", success_codes=[0, 1])
    session.run("python", "-m", "bench", "--matrix", *session.posargs)


@nox.session
def faults(session: nox.Session) -> None:
    """Every fault case on every broker (bench/faults); ``-- --quick`` for short phases.

    Takes RabbitMQ and ActiveMQ down (under their outage locks) and restarts
    GarageMQ and ActiveMQ: do not run it next to other test runs.
    """
    install(session, "test", "bench")
    brokers(session, "start")
    session.run("python", "-m", "bench.faults", *session.posargs)


@nox.session
def cluster(session: nox.Session) -> None:
    """Brokers, 3 instances on 8001-8003 and HAProxy on 8000 (``-- --backend stomp``...).

    Runs ``python -m triows.cluster`` (see its ``--help``); Ctrl-C stops everything it started.
    """
    install(session)
    # On Ctrl-C nox would send the cluster SIGTERM 0.3 s later and SIGKILL
    # 0.2 s after that, killing it in the middle of the instances' drain; the
    # cluster bounds its own stop, so nox only waits for it.
    session.run("python", "-m", "triows.cluster", *session.posargs, interrupt_timeout=None)
