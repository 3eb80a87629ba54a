#!/usr/bin/env python3
"""The broker table: every message broker triows is tested and benchmarked against.

One table (``BROKERS``) says, for each broker name, the protocol, the port, the
URL a triows backend uses, how the broker starts and stops, and the lock an
outage test holds. The tests (``tests/brokers.py``, ``tests/e2e.py``), the
benchmark (``bench/targets.py``) and CI import it or run it; nothing else
names a broker port or path. Standard library only.

Usage: python3 deploy/brokers.py COMMAND [NAME...]   (deploy/brokers.sh is the same)

  start [NAME...]      install (Debian packages) and start; idempotent
  stop [NAME...]       stop what this script started (ActiveMQ, GarageMQ, its
                       own RabbitMQ nodes)
  status [NAME...]     one line per broker; exit 1 if any is not answering
  check NAME           exit 0 if NAME answers its protocol, else print one
                       line saying how to start it and exit 1
  outage-begin NAME    take NAME down for a broker-outage test (rabbitmq, activemq,
                       rabbitmq-cluster-N)
  outage-end NAME      bring it back and wait until it answers
  alarm-begin NAME     raise the memory alarm of rabbitmq-alarm (the broker
                       blocks every connection that publishes)
  alarm-end NAME       clear it
  cluster-url BACKEND [tls]
                       print TRIOWS_BROKER_URL for rabbitmq-cluster: one URL per
                       node, comma-separated (BACKEND amqp091, amqp10 or stomp;
                       tls: the TLS listeners, verified with the script's CA)

No NAME means every broker (``stop``: the ones this script runs). Names,
protocol, default port, and the variable that overrides the port:

  rabbitmq          AMQP 0-9-1  127.0.0.1:5672   TRIOWS_BROKERS_RABBITMQ_PORT
  rabbitmq-amqp10   AMQP 1.0    127.0.0.1:5672   (the same listener as rabbitmq)
  rabbitmq-stomp    STOMP       127.0.0.1:61613  TRIOWS_BROKERS_RABBITMQ_STOMP_PORT
  activemq          STOMP       127.0.0.1:61614  TRIOWS_BROKERS_ACTIVEMQ_PORT
                    (OpenWire   127.0.0.1:61616, fixed)
  garagemq          AMQP 0-9-1  127.0.0.1:5673   TRIOWS_BROKERS_GARAGEMQ_PORT
                    (admin HTTP 127.0.0.1:15673, the port + 10000)
  rabbitmq-alarm    AMQP 0-9-1  127.0.0.1:5692   TRIOWS_BROKERS_RABBITMQ_ALARM_PORT
                    (a second RabbitMQ node, triows-alarm@localhost, whose
                    memory alarm tests raise: alarm-begin/alarm-end)
  rabbitmq-cluster  AMQP 0-9-1  127.0.0.1:5701   TRIOWS_BROKERS_RABBITMQ_CLUSTER_PORT
                    (three RabbitMQ nodes of their own, triows-c1..c3@localhost,
                    clustered, AMQP 1.0 and STOMP plugins on; node N answers
                    AMQP 0-9-1/1.0 on 5700+N, STOMP on 61700+N, AMQP over TLS
                    on 5710+N, STOMP over TLS on 61710+N, with a certificate of
                    a local CA, rabbitmq-cluster/tls/ca.pem in the run folder)
  rabbitmq-cluster-N  node N alone (N = 1, 2, 3): its status, check, stop and
                    outage (outage-begin: rabbitmqctl stop_app on that node)

A port variable moves where the script, the tests and the bench look for the
broker. ActiveMQ and GarageMQ, which this script runs itself, are also
configured to listen there (when started by this script); RabbitMQ is the
machine's node, so its variables must match the node's own configuration.

RabbitMQ is shared with everything else on the machine, so ``stop`` never
touches it. A test that takes a broker down holds the outage lock of the
broker's family for the whole outage (``tests/brokers.py:broker_outage``):
``/tmp/triows-<family>-outage.lock``, family = ``rabbitmq``, ``activemq``,
``garagemq``, ``rabbitmq-alarm`` or ``rabbitmq-cluster`` (one lock for the
cluster and each of its nodes). ``start`` and ``stop`` take the same lock exclusively and
``check`` shared, so they wait for an outage in progress to end instead of
racing it; ``outage-begin`` and ``outage-end`` do not, because their caller
already holds it.

ActiveMQ, GarageMQ and the script's RabbitMQ nodes run from the runtime folder
(``TRIOWS_BROKERS_RUN_DIR``, default ``/var/tmp/triows-brokers``): pid file,
log, config and data per broker; ``rabbitmq-cluster/tls/`` holds the CA
(``ca.pem``) and the nodes' certificate, made once with openssl. The
script's RabbitMQ nodes share the machine's Erlang cookie
(``/var/lib/rabbitmq/.erlang.cookie``: rabbitmq-server and rabbitmqctl run
as the rabbitmq user, whose home that is).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

HOST = "127.0.0.1"
DEPLOY_DIR = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
# How a person runs this script, in hints and messages.
SCRIPT_NAME = "deploy/brokers.py"
RUN_DIR = Path(os.environ.get("TRIOWS_BROKERS_RUN_DIR", "/var/tmp/triows-brokers"))
LOCK_DIR = Path("/tmp")
# Every broker here accepts these credentials (RabbitMQ's and GarageMQ's
# default user, ActiveMQ without authentication).
LOGIN = "guest"
PASSCODE = "guest"

# Bounds, in seconds, on waiting for a broker to answer.
RABBITMQ_START_TIMEOUT = 90.0
ACTIVEMQ_START_TIMEOUT = 60.0
GARAGEMQ_START_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
KILL_TIMEOUT = 5.0
# start/stop wait this long for an outage test to end, check a little less.
LOCK_TIMEOUT = 300.0
CHECK_LOCK_TIMEOUT = 120.0
POLL_INTERVAL = 0.2
PROBE_TIMEOUT = 3.0
# apt-get waits this long for dpkg's lock: two brokers may be installed at
# once by concurrent runs (each holds only its own broker family's lock).
DPKG_LOCK_TIMEOUT = 300
LOG_TAIL_LINES = 40

Protocol = Literal["amqp091", "amqp10", "stomp"]
PROTOCOL_LABELS: dict[Protocol, str] = {
    "amqp091": "AMQP 0-9-1",
    "amqp10": "AMQP 1.0",
    "stomp": "STOMP",
}


class Failure(Exception):
    """The command cannot do what was asked; the message says why (exit status 1)."""


class GaveUp(Exception):
    """Stop waiting now: what was waited for cannot happen any more (the process died)."""


def log(message: str) -> None:
    print(f"brokers.py: {message}", file=sys.stderr, flush=True)


def start_hint(name: str) -> str:
    """The one line that says how to start broker ``name``."""
    return f"start it with: {SCRIPT_NAME} start {name}"


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class Broker:
    """One broker name: what answers where, and how this script runs it."""

    name: str
    protocol: Protocol
    default_port: int
    # The environment variable that overrides the port.
    port_variable: str
    # The broker (node or process) this name runs on; it names the outage lock.
    family: str
    url_format: str
    # How it runs, in a few words (status lines and the table in docs/contributing.md).
    runs: str
    start: Callable[[Broker], None]
    # None: ``stop`` refuses (the broker is shared with the machine).
    stop: Callable[[Broker], None] | None
    # Both None where this script has no outage for the name.
    outage_begin: Callable[[Broker], None] | None = None
    outage_end: Callable[[Broker], None] | None = None
    # How ``check`` asks it, where a handshake on ``port`` is not enough (None: that handshake).
    probe_with: Callable[[Broker], str | None] | None = None
    # Added to the port: names that share one port variable (the nodes of a cluster).
    port_offset: int = 0

    @property
    def port(self) -> int:
        """The port it answers on: ``port_variable`` or ``default_port``, plus ``port_offset``."""
        raw = os.environ.get(self.port_variable, "").strip()
        if not raw:
            return self.default_port + self.port_offset
        if not raw.isdigit() or not 0 < int(raw) + self.port_offset < 65536:
            raise Failure(f"{self.port_variable}={raw!r} is not a TCP port")
        return int(raw) + self.port_offset

    @property
    def url(self) -> str:
        """The broker URL a triows backend of this protocol connects with."""
        return self.url_format.format(login=LOGIN, passcode=PASSCODE, host=HOST, port=self.port)

    @property
    def backend(self) -> str:
        """The triows backend that speaks its protocol (backends are named after protocols)."""
        return self.protocol

    @property
    def lock_path(self) -> Path:
        """The outage lock of the broker's family (shared by every name on it)."""
        return LOCK_DIR / f"triows-{self.family}-outage.lock"

    @property
    def outage_name(self) -> str | None:
        """The name ``outage-begin`` takes to stop this broker, or None if it has no outage."""
        family = BROKERS.get(self.family)
        return family.name if family and family.outage_begin else None

    @property
    def where(self) -> str:
        return f"{PROTOCOL_LABELS[self.protocol]:<10} {HOST}:{self.port}"

    def check(self) -> str | None:
        """None if it answers its protocol's opening handshake (or ``probe_with``), else why not."""
        if self.probe_with is not None:
            return self.probe_with(self)
        return probe(self.protocol, self.port)


# ---------------------------------------------------------------- helpers


# What each protocol's client sends first, and how its server answers.
OPENERS: dict[Protocol, bytes] = {
    # AMQP 0-9-1 protocol header; the server answers with Connection.Start.
    "amqp091": b"AMQP\x00\x00\x09\x01",
    # AMQP 1.0 SASL protocol header; a 1.0 server echoes it back.
    "amqp10": b"AMQP\x03\x01\x00\x00",
    "stomp": (
        f"CONNECT\naccept-version:1.2\nhost:/\nlogin:{LOGIN}\npasscode:{PASSCODE}\n\n\x00"
    ).encode(),
}


def probe(protocol: Protocol, port: int) -> str | None:
    """None if ``HOST:port`` answers ``protocol``'s opening handshake, else why not."""
    reply = b""
    try:
        with socket.create_connection((HOST, port), timeout=PROBE_TIMEOUT) as sock:
            sock.sendall(OPENERS[protocol])
            while len(reply) < 11 and not (protocol == "stomp" and b"\x00" in reply):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
            if protocol == "stomp" and reply.startswith(b"CONNECTED"):
                sock.sendall(b"DISCONNECT\n\n\x00")
    except OSError as error:
        return f"{HOST}:{port}: {error.strerror or error}"
    if protocol == "amqp091":
        # Frame type 1 (method), then class 10 method 10 (connection.start).
        ok = reply[:1] == b"\x01" and reply[7:11] == b"\x00\x0a\x00\x0a"
    elif protocol == "amqp10":
        ok = reply[:8] == OPENERS["amqp10"]
    else:
        ok = reply.startswith(b"CONNECTED")
    return None if ok else f"{HOST}:{port}: no {protocol} answer (got {reply[:40]!r})"


def wait_for(timeout: float, what: str, check: Callable[[], str | None]) -> None:
    """Call ``check`` until it returns None, for at most ``timeout`` seconds.

    ``check`` raising :class:`GaveUp` ends the wait at once. On failure raise
    :class:`Failure` naming ``what`` and ``check``'s last complaint.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            complaint = check()
        except GaveUp as error:
            raise Failure(f"gave up waiting for {what}: {error}") from None
        if complaint is None:
            return
        if time.monotonic() >= deadline:
            raise Failure(f"timed out after {timeout:.0f}s waiting for {what}: {complaint}")
        time.sleep(POLL_INTERVAL)


def run(*command: str, quiet: bool = True) -> None:
    """Run ``command``; raise :class:`Failure` if it fails. ``quiet``: drop its stdout."""
    status = subprocess.run(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL if quiet else None
    ).returncode
    if status != 0:
        raise Failure(f"{' '.join(command)} failed (exit status {status})")


def succeeds(*command: str) -> bool:
    """Whether ``command`` exits 0 (its output dropped)."""
    return (
        subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ).returncode
        == 0
    )


_apt_updated = False


def ensure_packages(*packages: str) -> None:
    """Install the missing ones from Debian.

    The package lists are refreshed once, and only when something is missing.
    Services are kept from starting at install time (policy-rc.d), so that a
    packaged GarageMQ or ActiveMQ never grabs a port before we configure it.
    apt-get waits for dpkg's lock instead of failing on it.
    """
    global _apt_updated
    missing = [
        package
        for package in packages
        if "install ok installed"
        not in subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package],
            capture_output=True,
            text=True,
        ).stdout
    ]
    if not missing:
        return
    if os.geteuid() != 0:
        raise Failure(f"need root to install {' '.join(missing)}")
    log(f"installing {' '.join(missing)}")
    apt = ["apt-get", "-o", f"DPkg::Lock::Timeout={DPKG_LOCK_TIMEOUT}"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _apt_updated:
        if subprocess.run([*apt, "update", "-qq"], env=env).returncode != 0:
            raise Failure("apt-get update failed")
        _apt_updated = True
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        status = subprocess.run(
            [*apt, "install", "-y", "-qq", "--no-install-recommends", *missing],
            env=env,
            stdout=subprocess.DEVNULL,
        ).returncode
    finally:
        if own_policy:
            policy.unlink(missing_ok=True)
    if status != 0:
        raise Failure(f"apt-get install {' '.join(missing)} failed ({status})")


@contextmanager
def outage_lock(broker: Broker, *, shared: bool, timeout: float) -> Iterator[None]:
    """Hold ``broker``'s family outage lock (``shared`` or exclusive), waiting at most ``timeout``.

    The descriptor is close-on-exec, so a broker started inside never holds it.
    """
    path = broker.lock_path
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    with open(path, "a") as lock:
        deadline = time.monotonic() + timeout
        announced = False
        while True:
            try:
                fcntl.flock(lock.fileno(), mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not announced:
                    log(f"{broker.name}: waiting for {path} (a broker-outage test is running)")
                    announced = True
                if time.monotonic() >= deadline:
                    raise Failure(
                        f"{broker.name}: {path} still held after {timeout:.0f}s "
                        "(a broker-outage test is running?)"
                    ) from None
                time.sleep(POLL_INTERVAL)
        yield  # closing the file releases the lock


def spawn(directory: Path, name: str, command: Sequence[str]) -> None:
    """Start ``command`` in the background from ``directory``, output to NAME.log, pid in NAME.pid.

    It runs in a session of its own (it outlives this script and never gets
    signals meant for the caller) and inherits no descriptor above stderr, so
    it never holds an outage lock, ours or a caller's (``flock LOCK brokers.py ...``).
    """
    with open(directory / f"{name}.log", "wb") as logfile:
        process = subprocess.Popen(
            command,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    # Not waited for: it outlives this script, reparented to init.
    (directory / f"{name}.pid").write_text(f"{process.pid}\n")


def pid_of(pidfile: Path, pattern: str) -> int | None:
    """The pid in ``pidfile`` if that process is alive and its command line has ``pattern``."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if not cmdline:
        # A zombie, or a process in the middle of its exec (just spawned).
        return None if process_gone(pid) is None else pid
    return pid if pattern in cmdline.replace(b"\0", b" ").decode(errors="replace") else None


def process_gone(pid: int) -> str | None:
    """None once ``pid`` has exited (a zombie nobody reaps yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The state follows the parenthesised command name.
    return None if stat.rpartition(")")[2].split()[0] == "Z" else f"pid {pid} still running"


def stop_pid(pidfile: Path, pattern: str, signum: signal.Signals) -> None:
    """Send ``signum``, wait for the exit, SIGKILL after STOP_TIMEOUT; remove the pid file."""
    pid = pid_of(pidfile, pattern)
    if pid is not None:
        with suppress(ProcessLookupError):
            os.kill(pid, signum)
        try:
            wait_for(STOP_TIMEOUT, f"pid {pid} to exit", lambda: process_gone(pid))
        except Failure as failure:
            log(f"{failure}; sending SIGKILL to {pid}")
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_for(KILL_TIMEOUT, f"pid {pid} to exit after SIGKILL", lambda: process_gone(pid))
    pidfile.unlink(missing_ok=True)


def wait_for_spawned(broker: Broker, timeout: float, directory: Path, pattern: str) -> None:
    """Wait until a broker this script spawned answers; give up at once if its process died.

    On failure the tail of its log goes to stderr.
    """
    pidfile = directory / f"{broker.family}.pid"
    logfile = directory / f"{broker.family}.log"

    def answering() -> str | None:
        complaint = broker.check()
        if complaint is not None and pid_of(pidfile, pattern) is None:
            raise GaveUp("the process exited")
        return complaint

    try:
        wait_for(timeout, f"{broker.name} {broker.where.strip()}", answering)
    except Failure:
        try:
            lines = logfile.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        except OSError:
            lines = []
        for line in lines:
            print(line, file=sys.stderr)
        raise


# ---------------------------------------------------------------- rabbitmq


def start_rabbitmq(broker: Broker) -> None:
    rabbitmq = BROKERS["rabbitmq"]
    if rabbitmq.check() is None:
        return
    ensure_packages("rabbitmq-server")
    if succeeds("rabbitmq-diagnostics", "-q", "ping"):
        # The node is up but AMQP is not answering: still booting, or its app
        # was left stopped (by an outage test that died before start_app).
        if not succeeds("rabbitmq-diagnostics", "-q", "check_running"):
            log("rabbitmq: node up, app not running: rabbitmqctl start_app")
            run("rabbitmqctl", "-q", "start_app")
    else:
        log("rabbitmq: starting the node (rabbitmq-server -detached)")
        run("rabbitmq-server", "-detached", quiet=False)
    wait_for(RABBITMQ_START_TIMEOUT, f"RabbitMQ AMQP 0-9-1 on :{rabbitmq.port}", rabbitmq.check)


def outage_begin_rabbitmq(broker: Broker) -> None:
    # The node keeps running, so outage-end only needs start_app.
    run("rabbitmqctl", "-q", "stop_app")


def outage_end_rabbitmq(broker: Broker) -> None:
    if succeeds("rabbitmq-diagnostics", "-q", "ping"):
        run("rabbitmqctl", "-q", "start_app")
    else:
        # The node itself is gone (a fault case SIGKILLed it): boot it again,
        # with the plugins and policies it keeps on disk.
        log("rabbitmq: starting the node (rabbitmq-server -detached)")
        run("rabbitmq-server", "-detached", quiet=False)
    wait_for(RABBITMQ_START_TIMEOUT, f"RabbitMQ AMQP 0-9-1 on :{broker.port}", broker.check)


def enable_rabbitmq_plugin(broker: Broker, plugin: str) -> None:
    """Enable ``plugin`` on the running node, which applies it at once (no restart).

    RabbitMQ also records it in /etc/rabbitmq/enabled_plugins for the next boot.
    """
    start_rabbitmq(broker)
    if broker.check() is None:
        return
    log(f"rabbitmq: enabling plugin {plugin}")
    run("rabbitmq-plugins", "-q", "enable", "--online", plugin)
    wait_for(RABBITMQ_START_TIMEOUT, broker.name, broker.check)


def start_rabbitmq_amqp10(broker: Broker) -> None:
    enable_rabbitmq_plugin(broker, "rabbitmq_amqp1_0")
    # RabbitMQ 3.x keeps a receiver link's amq.gen-* queue after the link
    # detaches (rabbitmq-server#2588): let such queues expire once unused.
    run(
        "rabbitmqctl",
        "-q",
        "set_policy",
        "--apply-to",
        "queues",
        "triows-amqp10-orphans",
        r"^amq\.gen-",
        '{"expires":60000}',
    )


def start_rabbitmq_stomp(broker: Broker) -> None:
    enable_rabbitmq_plugin(broker, "rabbitmq_stomp")


# ---------------------------------------------------------------- activemq

ACTIVEMQ_HOME = Path("/usr/share/activemq")
ACTIVEMQ_DIR = RUN_DIR / "activemq"
# The JVM is recognised by its main jar.
ACTIVEMQ_PATTERN = str(ACTIVEMQ_HOME / "bin" / "activemq.jar")
# What the package ships as an instance's conf folder (Debian 12: activemq.xml
# and log4j2.properties; upstream builds add credentials, jetty and jmx files
# an activemq.xml may refer to).
ACTIVEMQ_PACKAGED_CONF = (Path("/etc/activemq/instances-available/main"), ACTIVEMQ_HOME / "conf")
# The STOMP connector in deploy/activemq/activemq.xml; its port is the table's.
ACTIVEMQ_STOMP_URI = re.compile(r'(uri="stomp://127\.0\.0\.1:)\d+')


def start_activemq(broker: Broker) -> None:
    if broker.check() is None:
        running = ACTIVEMQ_DIR / "conf" / "activemq.xml"
        if running.is_file() and running.read_text() == activemq_xml(broker):
            return
        # Started from an older deploy/activemq/activemq.xml: the backend
        # relies on its settings (durable subscription expiry, link stealing).
        log("activemq: running with an older activemq.xml, restarting it")
        stop_activemq(broker)
    ensure_packages("activemq")
    pidfile = ACTIVEMQ_DIR / "activemq.pid"
    if pid_of(pidfile, ACTIVEMQ_PATTERN) is not None:
        log(f"activemq: already started, waiting for STOMP on :{broker.port}")
    else:
        prepare_activemq_conf(broker)
        log(f"activemq: starting (log: {ACTIVEMQ_DIR / 'activemq.log'})")
        spawn(
            ACTIVEMQ_DIR,
            "activemq",
            [
                "java",
                "-Xms64m",
                "-Xmx256m",
                "-Djava.awt.headless=true",
                f"-Djava.io.tmpdir={ACTIVEMQ_DIR}/tmp",
                f"-Dactivemq.home={ACTIVEMQ_HOME}",
                f"-Dactivemq.base={ACTIVEMQ_DIR}",
                f"-Dactivemq.conf={ACTIVEMQ_DIR}/conf",
                f"-Dactivemq.data={ACTIVEMQ_DIR}/data",
                f"-Dlog4j.configuration=file:{ACTIVEMQ_DIR}/conf/log4j.properties",
                "-jar",
                ACTIVEMQ_PATTERN,
                "start",
                f"xbean:file:{ACTIVEMQ_DIR}/conf/activemq.xml",
            ],
        )
    wait_for_spawned(broker, ACTIVEMQ_START_TIMEOUT, ACTIVEMQ_DIR, ACTIVEMQ_PATTERN)


def prepare_activemq_conf(broker: Broker) -> None:
    """The packaged conf folder with ours over it: activemq.xml (STOMP on our port), log4j."""
    conf = ACTIVEMQ_DIR / "conf"
    data = ACTIVEMQ_DIR / "data"
    for folder in (conf, data, ACTIVEMQ_DIR / "tmp"):
        folder.mkdir(parents=True, exist_ok=True)
    for packaged in ACTIVEMQ_PACKAGED_CONF:
        if packaged.is_dir():
            # symlinks=False: copy what the package's links point at.
            shutil.copytree(packaged, conf, symlinks=False, dirs_exist_ok=True)
    (conf / "activemq.xml").write_text(activemq_xml(broker))
    shutil.copy(DEPLOY_DIR / "activemq" / "log4j.properties", conf / "log4j.properties")
    # Non-persistent: the data folder only holds scratch files; start clean.
    for entry in data.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def activemq_xml(broker: Broker) -> str:
    """deploy/activemq/activemq.xml with the STOMP connector on the broker's port."""
    xml, count = ACTIVEMQ_STOMP_URI.subn(
        rf"\g<1>{broker.port}", (DEPLOY_DIR / "activemq" / "activemq.xml").read_text()
    )
    if count != 1:
        raise Failure("deploy/activemq/activemq.xml: expected one stomp://127.0.0.1:PORT connector")
    return xml


def stop_activemq(broker: Broker) -> None:
    # SIGTERM runs ActiveMQ's shutdown hook (about a second); `activemq stop`
    # would need JMX, which this config turns off.
    stop_pid(ACTIVEMQ_DIR / "activemq.pid", ACTIVEMQ_PATTERN, signal.SIGTERM)


# ---------------------------------------------------------------- garagemq

GARAGEMQ_DIR = RUN_DIR / "garagemq"
GARAGEMQ_PATTERN = "garagemq"
# The listeners in deploy/garagemq/config.yaml: AMQP on the table's port, the
# admin HTTP server (which it cannot run without) 10000 above it, as by
# default (5673, 15673), so that two GarageMQs on two ports do not clash.
GARAGEMQ_ADMIN_OFFSET = 10000


def garagemq_listener(section: str) -> re.Pattern[str]:
    """The port of ``section`` (``tcp``, ``admin``) in GarageMQ's config."""
    return re.compile(rf"(?m)^({section}:\n(?:[ \t]+.*\n)*?[ \t]+port:[ \t]*)\d+")


def garagemq_config(port: int) -> str:
    """deploy/garagemq/config.yaml with AMQP on ``port`` and the admin server 10000 above."""
    admin_port = port + GARAGEMQ_ADMIN_OFFSET
    if admin_port > 65535:
        raise Failure(f"garagemq: port {port} leaves no room for its admin port (port + 10000)")
    config = (DEPLOY_DIR / "garagemq" / "config.yaml").read_text()
    for section, value in (("tcp", port), ("admin", admin_port)):
        config, count = garagemq_listener(section).subn(rf"\g<1>{value}", config)
        if count != 1:
            raise Failure(f"deploy/garagemq/config.yaml: expected one {section}: port")
    return config


def start_garagemq(broker: Broker) -> None:
    if broker.check() is None:
        return
    ensure_packages("garagemq")
    if pid_of(GARAGEMQ_DIR / "garagemq.pid", GARAGEMQ_PATTERN) is not None:
        log(f"garagemq: already started, waiting for AMQP on :{broker.port}")
    else:
        GARAGEMQ_DIR.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(GARAGEMQ_DIR / "db", ignore_errors=True)
        (GARAGEMQ_DIR / "config.yaml").write_text(garagemq_config(broker.port))
        log(f"garagemq: starting (log: {GARAGEMQ_DIR / 'garagemq.log'})")
        # Run from the runtime folder: the config's db path is relative to it.
        spawn(GARAGEMQ_DIR, "garagemq", ["garagemq", "--config", str(GARAGEMQ_DIR / "config.yaml")])
    wait_for_spawned(broker, GARAGEMQ_START_TIMEOUT, GARAGEMQ_DIR, GARAGEMQ_PATTERN)


def stop_garagemq(broker: Broker) -> None:
    # GarageMQ does not exit on SIGTERM (it hangs after "All connections safe
    # closed"), and a clean state matters more than its stored messages.
    stop_pid(GARAGEMQ_DIR / "garagemq.pid", GARAGEMQ_PATTERN, signal.SIGKILL)
    shutil.rmtree(GARAGEMQ_DIR / "db", ignore_errors=True)


# ---------------------------------------------------------------- rabbitmq-alarm

# A node of its own: its memory alarm blocks every publishing connection on
# the node, which must not stall what other tests run on the shared one.
RABBITMQ_ALARM_NODE = "triows-alarm@localhost"
RABBITMQ_ALARM_DIR = RUN_DIR / "rabbitmq-alarm"
# Erlang distribution listens this far above the AMQP port.
RABBITMQ_ALARM_DIST_OFFSET = 20000
# The node's memory watermarks (fraction of RAM): RabbitMQ's default, and one
# no node can stay under (its memory alarm goes off at once).
RABBITMQ_WATERMARK = "0.4"
RABBITMQ_ALARM_WATERMARK = "0.0000001"


def rabbitmq_alarm_env(broker: Broker) -> list[str]:
    """``env`` arguments that make RabbitMQ's scripts run or reach the alarm node."""
    folder = RABBITMQ_ALARM_DIR
    return [
        "env",
        f"RABBITMQ_NODENAME={RABBITMQ_ALARM_NODE}",
        f"RABBITMQ_NODE_PORT={broker.port}",
        f"RABBITMQ_DIST_PORT={broker.port + RABBITMQ_ALARM_DIST_OFFSET}",
        f"RABBITMQ_CONFIG_FILE={folder / 'rabbitmq.conf'}",
        f"RABBITMQ_ENABLED_PLUGINS_FILE={folder / 'enabled_plugins'}",
        f"RABBITMQ_MNESIA_BASE={folder / 'mnesia'}",
        f"RABBITMQ_LOG_BASE={folder / 'log'}",
    ]


def start_rabbitmq_alarm(broker: Broker) -> None:
    if broker.check() is None:
        return
    ensure_packages("rabbitmq-server")
    if not succeeds("rabbitmq-diagnostics", "-q", "-n", RABBITMQ_ALARM_NODE, "ping"):
        folder = RABBITMQ_ALARM_DIR
        shutil.rmtree(folder, ignore_errors=True)
        for sub in ("mnesia", "log"):
            (folder / sub).mkdir(parents=True)
        # Its own listener (the machine's config names the shared node's) and no plugin.
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.local = {HOST}:{broker.port}\n")
        (folder / "enabled_plugins").write_text("[].\n")
        if os.geteuid() == 0:
            # rabbitmq-server drops to the rabbitmq user, which writes here.
            for path in (folder, *folder.rglob("*")):
                shutil.chown(path, "rabbitmq", "rabbitmq")
        log(f"rabbitmq-alarm: starting node {RABBITMQ_ALARM_NODE} (log: {folder / 'log'})")
        run(*rabbitmq_alarm_env(broker), "rabbitmq-server", "-detached", quiet=False)
    wait_for(RABBITMQ_START_TIMEOUT, f"RabbitMQ node {RABBITMQ_ALARM_NODE}", broker.check)


def stop_rabbitmq_alarm(broker: Broker) -> None:
    if succeeds("rabbitmq-diagnostics", "-q", "-n", RABBITMQ_ALARM_NODE, "ping"):
        run("rabbitmqctl", "-q", "-n", RABBITMQ_ALARM_NODE, "stop")


def set_rabbitmq_alarm_watermark(watermark: str) -> None:
    run("rabbitmqctl", "-q", "-n", RABBITMQ_ALARM_NODE, "set_vm_memory_high_watermark", watermark)


# ---------------------------------------------------------------- rabbitmq-cluster

# Three RabbitMQ nodes of the script's own, clustered: what an instance does
# when the node under it goes is tested here, never on the machine's node.
RABBITMQ_CLUSTER_DIR = RUN_DIR / "rabbitmq-cluster"
RABBITMQ_CLUSTER_NODES = ("triows-c1@localhost", "triows-c2@localhost", "triows-c3@localhost")
# Node n (1-based) listens on the table's port + n - 1 for AMQP 0-9-1 and 1.0,
# and these offsets above that for STOMP, AMQP over TLS, STOMP over TLS and
# Erlang distribution (5701: 61701, 5711, 61711, 25701).
RABBITMQ_CLUSTER_STOMP_OFFSET = 56000
RABBITMQ_CLUSTER_TLS_OFFSET = 10
RABBITMQ_CLUSTER_DIST_OFFSET = 20000
# The TLS listeners also listen on this loopback address, which the server
# certificate does not name: a client connecting there must refuse it.
RABBITMQ_CLUSTER_UNNAMED_HOST = "127.0.0.2"
# A node blocks publishers above this much memory rather than grow, and its
# schedulers do not busy-wait: three nodes share the machine with everything else.
RABBITMQ_CLUSTER_MEMORY = "512MiB"
RABBITMQ_CLUSTER_ERL_ARGS = "+sbwt none +sbwtdcpu none +sbwtdio none"
RABBITMQ_CLUSTER_PLUGINS = "[rabbitmq_amqp1_0,rabbitmq_stomp].\n"
# The local certificate authority and the nodes' certificate (SAN localhost, 127.0.0.1).
RABBITMQ_CLUSTER_TLS_DIR = RABBITMQ_CLUSTER_DIR / "tls"
CLUSTER_CA = RABBITMQ_CLUSTER_TLS_DIR / "ca.pem"
TLS_DAYS = "3650"


@dataclass(frozen=True)
class ClusterNode:
    """One node of rabbitmq-cluster: its Erlang name and its listeners."""

    index: int  # 1-based
    amqp_port: int

    @property
    def name(self) -> str:
        return RABBITMQ_CLUSTER_NODES[self.index - 1]

    @property
    def stomp_port(self) -> int:
        return self.amqp_port + RABBITMQ_CLUSTER_STOMP_OFFSET

    @property
    def amqps_port(self) -> int:
        return self.amqp_port + RABBITMQ_CLUSTER_TLS_OFFSET

    @property
    def stomps_port(self) -> int:
        return self.stomp_port + RABBITMQ_CLUSTER_TLS_OFFSET

    @property
    def folder(self) -> Path:
        return RABBITMQ_CLUSTER_DIR / f"c{self.index}"

    def env(self) -> list[str]:
        """``env`` arguments that make RabbitMQ's scripts run or reach this node."""
        return [
            "env",
            f"RABBITMQ_NODENAME={self.name}",
            f"RABBITMQ_NODE_PORT={self.amqp_port}",
            f"RABBITMQ_DIST_PORT={self.amqp_port + RABBITMQ_CLUSTER_DIST_OFFSET}",
            f"RABBITMQ_CONFIG_FILE={self.folder / 'rabbitmq.conf'}",
            f"RABBITMQ_ENABLED_PLUGINS_FILE={self.folder / 'enabled_plugins'}",
            f"RABBITMQ_MNESIA_BASE={self.folder / 'mnesia'}",
            f"RABBITMQ_LOG_BASE={self.folder / 'log'}",
            f"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS={RABBITMQ_CLUSTER_ERL_ARGS}",
        ]

    def config(self) -> str:
        tls = RABBITMQ_CLUSTER_TLS_DIR
        lines = [
            f"listeners.tcp.local = {HOST}:{self.amqp_port}",
            f"stomp.listeners.tcp.1 = {HOST}:{self.stomp_port}",
            f"listeners.ssl.1 = {HOST}:{self.amqps_port}",
            f"listeners.ssl.2 = {RABBITMQ_CLUSTER_UNNAMED_HOST}:{self.amqps_port}",
            f"stomp.listeners.ssl.1 = {HOST}:{self.stomps_port}",
            f"stomp.listeners.ssl.2 = {RABBITMQ_CLUSTER_UNNAMED_HOST}:{self.stomps_port}",
            f"ssl_options.cacertfile = {CLUSTER_CA}",
            f"ssl_options.certfile = {tls / 'server.pem'}",
            f"ssl_options.keyfile = {tls / 'server.key'}",
            "ssl_options.verify = verify_none",
            "ssl_options.fail_if_no_peer_cert = false",
            f"vm_memory_high_watermark.absolute = {RABBITMQ_CLUSTER_MEMORY}",
            # The guest user may log in over loopback only; both hosts are loopback.
            "loopback_users = none",
        ]
        return "\n".join(lines) + "\n"

    def pings(self) -> bool:
        return succeeds("rabbitmq-diagnostics", "-q", "-n", self.name, "ping")

    def check(self) -> str | None:
        """None if every listener answers (TLS ones with a certificate our CA verifies)."""
        return (
            probe("amqp091", self.amqp_port)
            or probe("stomp", self.stomp_port)
            or probe_tls(self.amqps_port)
            or probe_tls(self.stomps_port)
        )


def cluster_nodes() -> list[ClusterNode]:
    base = BROKERS["rabbitmq-cluster"].port
    return [ClusterNode(index, base + index - 1) for index in range(1, 4)]


def cluster_node(broker: Broker) -> ClusterNode:
    """The node a ``rabbitmq-cluster-N`` name stands for."""
    return cluster_nodes()[broker.port_offset]


def cluster_urls(protocol: Protocol, *, tls: bool = False) -> str:
    """``TRIOWS_BROKER_URL`` for rabbitmq-cluster: one URL per node, comma-separated.

    TLS URLs name the script's CA (``cafile``); STOMP URLs name the node's AMQP
    port (``amqp_port``), where the backend declares the exchange.
    """
    urls = []
    for node in cluster_nodes():
        if protocol == "stomp":
            scheme, port = ("stomp+ssl", node.stomps_port) if tls else ("stomp", node.stomp_port)
            amqp = node.amqps_port if tls else node.amqp_port
            query = [f"amqp_port={amqp}"]
        else:
            scheme, port = ("amqps", node.amqps_port) if tls else ("amqp", node.amqp_port)
            query = []
        if tls:
            query.append(f"cafile={CLUSTER_CA}")
        host = "localhost" if tls else HOST
        path = "/" if protocol == "amqp091" else ""
        suffix = f"?{'&'.join(query)}" if query else ""
        urls.append(f"{scheme}://{LOGIN}:{PASSCODE}@{host}:{port}{path}{suffix}")
    return ",".join(urls)


def probe_tls(port: int, host: str = HOST) -> str | None:
    """None if a TLS handshake on ``host:port`` verifies the node certificate against our CA."""
    try:
        context = ssl.create_default_context(cafile=str(CLUSTER_CA))
        with (
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return None
    except (OSError, ssl.SSLError) as error:
        return f"{host}:{port}: TLS: {error}"


def ensure_cluster_tls() -> None:
    """The CA and the nodes' certificate, made once with openssl (kept across restarts)."""
    folder = RABBITMQ_CLUSTER_TLS_DIR
    if (folder / "server.pem").is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    log(f"rabbitmq-cluster: making a CA and a server certificate in {folder}")
    openssl = ["req", "-new", "-nodes", "-newkey", "rsa:2048"]
    run_openssl(
        *openssl,
        "-x509",
        "-days",
        TLS_DAYS,
        "-subj",
        "/CN=triows test CA",
        "-keyout",
        str(folder / "ca.key"),
        "-out",
        str(CLUSTER_CA),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    run_openssl(
        *openssl,
        "-subj",
        "/CN=localhost",
        "-keyout",
        str(folder / "server.key"),
        "-out",
        str(folder / "server.csr"),
    )
    (folder / "server.ext").write_text(
        "subjectAltName = DNS:localhost, IP:127.0.0.1\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth\n"
        "authorityKeyIdentifier = keyid\n"
        "subjectKeyIdentifier = hash\n"
    )
    run_openssl(
        "x509",
        "-req",
        "-days",
        TLS_DAYS,
        "-in",
        str(folder / "server.csr"),
        "-CA",
        str(CLUSTER_CA),
        "-CAkey",
        str(folder / "ca.key"),
        "-CAcreateserial",
        "-extfile",
        str(folder / "server.ext"),
        "-out",
        str(folder / "server.pem"),
    )


def run_openssl(*arguments: str) -> None:
    """``openssl ARGUMENTS...``; its chatter is shown only if it fails."""
    result = subprocess.run(
        ["openssl", *arguments], stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise Failure(f"openssl {arguments[0]} failed: {result.stderr.strip()}")


def running_cluster_nodes(node: ClusterNode) -> list[str]:
    """The nodes ``node`` sees running in its cluster (empty if it does not answer)."""
    result = subprocess.run(
        ["rabbitmqctl", "-q", "-n", node.name, "cluster_status", "--formatter", "json"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return []
    try:
        running = json.loads(result.stdout).get("running_nodes", [])
    except ValueError:
        return []
    return [str(name) for name in running]


def rabbitmq_cluster_complaint(broker: Broker) -> str | None:
    """None if every node answers on every listener and all three run as one cluster."""
    nodes = cluster_nodes()
    for node in nodes:
        complaint = node.check()
        if complaint is not None:
            return f"{node.name}: {complaint}"
    running = running_cluster_nodes(nodes[0])
    missing = [node.name for node in nodes if node.name not in running]
    return f"not clustered with {nodes[0].name}: {' '.join(missing)}" if missing else None


def boot_cluster_node(node: ClusterNode, *, fresh: bool) -> None:
    """``rabbitmq-server -detached`` for ``node``; ``fresh``: from an empty data folder."""
    folder = node.folder
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    for sub in ("mnesia", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "rabbitmq.conf").write_text(node.config())
    (folder / "enabled_plugins").write_text(RABBITMQ_CLUSTER_PLUGINS)
    if os.geteuid() == 0:
        # rabbitmq-server drops to the rabbitmq user, which reads and writes here.
        for path in (RABBITMQ_CLUSTER_DIR, *RABBITMQ_CLUSTER_DIR.rglob("*")):
            shutil.chown(path, "rabbitmq", "rabbitmq")
    log(f"rabbitmq-cluster: starting node {node.name} (log: {folder / 'log'})")
    run(*node.env(), "rabbitmq-server", "-detached", quiet=False)


def start_rabbitmq_cluster(broker: Broker) -> None:
    """Start the nodes that are down, wait for their listeners, join them to node 1.

    With every node down, all three start from empty data folders (a node
    restarted alone would wait for the peers it last saw); a node restarted
    while others run keeps its data and rejoins them.
    """
    if broker.check() is None:
        return
    ensure_packages("rabbitmq-server")
    ensure_cluster_tls()
    nodes = cluster_nodes()
    up = [node.pings() for node in nodes]
    for node, pings in zip(nodes, up, strict=True):
        if not pings:
            boot_cluster_node(node, fresh=not any(up))
        elif node.check() is not None and not succeeds(
            "rabbitmq-diagnostics", "-q", "-n", node.name, "check_running"
        ):
            # Its app was left stopped (an outage test that died before outage-end).
            log(f"rabbitmq-cluster: node {node.name} up, app not running: start_app")
            run("rabbitmqctl", "-q", "-n", node.name, "start_app")
    for node in nodes:
        wait_for(RABBITMQ_START_TIMEOUT, f"RabbitMQ node {node.name}", node.check)
    first = nodes[0]
    running = running_cluster_nodes(first)
    for node in nodes[1:]:
        if node.name not in running:
            log(f"rabbitmq-cluster: joining {node.name} to {first.name}")
            run("rabbitmqctl", "-q", "-n", node.name, "stop_app")
            run("rabbitmqctl", "-q", "-n", node.name, "join_cluster", first.name)
            run("rabbitmqctl", "-q", "-n", node.name, "start_app")
    wait_for(RABBITMQ_START_TIMEOUT, "rabbitmq-cluster", lambda: rabbitmq_cluster_complaint(broker))


def start_rabbitmq_cluster_node(broker: Broker) -> None:
    if broker.check() is None:
        return
    start_rabbitmq_cluster(BROKERS["rabbitmq-cluster"])


def stop_rabbitmq_cluster(broker: Broker) -> None:
    for node in cluster_nodes():
        stop_cluster_node(node)


def stop_cluster_node(node: ClusterNode) -> None:
    if node.pings():
        run("rabbitmqctl", "-q", "-n", node.name, "stop")


def outage_begin_cluster_node(broker: Broker) -> None:
    # The node stays in the cluster and keeps running: its connections close,
    # its listeners stop, and outage-end only needs start_app.
    run("rabbitmqctl", "-q", "-n", cluster_node(broker).name, "stop_app")


def outage_end_cluster_node(broker: Broker) -> None:
    node = cluster_node(broker)
    if node.pings():
        run("rabbitmqctl", "-q", "-n", node.name, "start_app")
    else:
        # The node itself is gone (stopped or killed): it boots with its data
        # and rejoins the nodes still running.
        boot_cluster_node(node, fresh=False)
    wait_for(RABBITMQ_START_TIMEOUT, f"RabbitMQ node {node.name}", node.check)


# ---------------------------------------------------------------- the table itself

AMQP091_URL = "amqp://{login}:{passcode}@{host}:{port}/"
AMQP10_URL = "amqp://{login}:{passcode}@{host}:{port}"
STOMP_URL = "stomp://{login}:{passcode}@{host}:{port}"

BROKERS: dict[str, Broker] = {
    broker.name: broker
    for broker in (
        Broker(
            "rabbitmq",
            "amqp091",
            5672,
            "TRIOWS_BROKERS_RABBITMQ_PORT",
            family="rabbitmq",
            url_format=AMQP091_URL,
            runs="the machine's RabbitMQ node (rabbitmq-server -detached if down)",
            start=start_rabbitmq,
            stop=None,
            outage_begin=outage_begin_rabbitmq,
            outage_end=outage_end_rabbitmq,
        ),
        Broker(
            "rabbitmq-amqp10",
            "amqp10",
            5672,
            "TRIOWS_BROKERS_RABBITMQ_PORT",
            family="rabbitmq",
            url_format=AMQP10_URL,
            runs="plugin rabbitmq_amqp1_0 on that node, enabled online",
            start=start_rabbitmq_amqp10,
            stop=None,
        ),
        Broker(
            "rabbitmq-stomp",
            "stomp",
            61613,
            "TRIOWS_BROKERS_RABBITMQ_STOMP_PORT",
            family="rabbitmq",
            url_format=STOMP_URL,
            runs="plugin rabbitmq_stomp on that node, enabled online",
            start=start_rabbitmq_stomp,
            stop=None,
        ),
        Broker(
            "activemq",
            "stomp",
            61614,
            "TRIOWS_BROKERS_ACTIVEMQ_PORT",
            family="activemq",
            url_format=STOMP_URL,
            runs="ActiveMQ Classic, standalone JVM from deploy/activemq/ (OpenWire on 61616)",
            start=start_activemq,
            stop=stop_activemq,
            outage_begin=stop_activemq,
            outage_end=start_activemq,
        ),
        Broker(
            "garagemq",
            "amqp091",
            5673,
            "TRIOWS_BROKERS_GARAGEMQ_PORT",
            family="garagemq",
            url_format=AMQP091_URL,
            runs="GarageMQ from deploy/garagemq/config.yaml",
            start=start_garagemq,
            stop=stop_garagemq,
        ),
        Broker(
            "rabbitmq-alarm",
            "amqp091",
            5692,
            "TRIOWS_BROKERS_RABBITMQ_ALARM_PORT",
            family="rabbitmq-alarm",
            url_format=AMQP091_URL,
            runs=f"a RabbitMQ node of its own ({RABBITMQ_ALARM_NODE}) for memory-alarm tests",
            start=start_rabbitmq_alarm,
            stop=stop_rabbitmq_alarm,
        ),
        Broker(
            "rabbitmq-cluster",
            "amqp091",
            5701,
            "TRIOWS_BROKERS_RABBITMQ_CLUSTER_PORT",
            family="rabbitmq-cluster",
            url_format=AMQP091_URL,
            runs="three RabbitMQ nodes of their own, clustered (triows-c1..c3@localhost)",
            start=start_rabbitmq_cluster,
            stop=stop_rabbitmq_cluster,
            probe_with=rabbitmq_cluster_complaint,
        ),
        *(
            Broker(
                f"rabbitmq-cluster-{index}",
                "amqp091",
                5701,
                "TRIOWS_BROKERS_RABBITMQ_CLUSTER_PORT",
                family="rabbitmq-cluster",
                url_format=AMQP091_URL,
                runs=f"node {index} of rabbitmq-cluster",
                start=start_rabbitmq_cluster_node,
                stop=lambda broker: stop_cluster_node(cluster_node(broker)),
                outage_begin=outage_begin_cluster_node,
                outage_end=outage_end_cluster_node,
                probe_with=lambda broker: cluster_node(broker).check(),
                port_offset=index - 1,
            )
            for index in (1, 2, 3)
        ),
    )
}
# What `stop` with no names stops: only the brokers this script runs itself.
OWN_BROKERS = tuple(name for name, broker in BROKERS.items() if broker.stop is not None)
OUTAGE_NAMES = tuple(name for name, broker in BROKERS.items() if broker.outage_begin is not None)


# ---------------------------------------------------------------- commands


def describe(broker: Broker) -> bool:
    """Print its status line; whether it answers."""
    complaint = broker.check()
    if complaint is None:
        print(f"{broker.name:<18} up    {broker.where}")
        return True
    print(f"{broker.name:<18} DOWN  {broker.where}  ({complaint})")
    return False


def cmd_start(brokers: Sequence[Broker]) -> int:
    for broker in brokers:
        with outage_lock(broker, shared=False, timeout=LOCK_TIMEOUT):
            broker.start(broker)
    return 0


def cmd_stop(brokers: Sequence[Broker]) -> int:
    status = 0
    for broker in brokers:
        if broker.stop is None:
            log(
                f"{broker.name}: RabbitMQ is shared with the whole machine; stop never touches "
                "it (for an outage test use outage-begin/outage-end under the lock)"
            )
            status = 2
            continue
        with outage_lock(broker, shared=False, timeout=LOCK_TIMEOUT):
            broker.stop(broker)
    return status


def cmd_status(brokers: Sequence[Broker]) -> int:
    answering = [describe(broker) for broker in brokers]
    return 0 if all(answering) else 1


def cmd_check(brokers: Sequence[Broker]) -> int:
    if len(brokers) != 1:
        raise Failure("usage: check NAME")
    (broker,) = brokers
    # Shared lock: wait for an outage test to bring the broker back rather
    # than report it missing.
    try:
        with outage_lock(broker, shared=True, timeout=CHECK_LOCK_TIMEOUT):
            complaint = broker.check()
    except Failure as failure:
        complaint = str(failure)
    if complaint is None:
        return 0
    hint = start_hint(broker.name)
    print(f"{broker.name} is not answering: {complaint}; {hint}", file=sys.stderr)
    return 1


def cmd_outage(phase: Literal["begin", "end"], brokers: Sequence[Broker]) -> int:
    if len(brokers) != 1:
        raise Failure(f"usage: outage-{phase} NAME ({' or '.join(OUTAGE_NAMES)})")
    (broker,) = brokers
    action = broker.outage_begin if phase == "begin" else broker.outage_end
    if action is None:
        raise Failure(f"outage-{phase}: only {' and '.join(OUTAGE_NAMES)}")
    action(broker)
    return 0


def cmd_alarm(phase: Literal["begin", "end"], brokers: Sequence[Broker]) -> int:
    if [broker.name for broker in brokers] != ["rabbitmq-alarm"]:
        raise Failure(f"usage: alarm-{phase} rabbitmq-alarm")
    set_rabbitmq_alarm_watermark(
        RABBITMQ_ALARM_WATERMARK if phase == "begin" else RABBITMQ_WATERMARK
    )
    return 0


def cmd_cluster_url(arguments: Sequence[str]) -> int:
    protocols = "|".join(PROTOCOL_LABELS)
    if len(arguments) not in (1, 2) or arguments[0] not in PROTOCOL_LABELS:
        raise Failure(f"usage: cluster-url {{{protocols}}} [tls]")
    if arguments[1:] not in ([], ["tls"]):
        raise Failure(f"usage: cluster-url {{{protocols}}} [tls]")
    print(cluster_urls(arguments[0], tls=arguments[1:] == ["tls"]))  # type: ignore[arg-type]
    return 0


COMMANDS = (
    "start",
    "stop",
    "status",
    "check",
    "outage-begin",
    "outage-end",
    "alarm-begin",
    "alarm-end",
    "cluster-url",
)


def main(argv: Sequence[str]) -> int:
    if not argv:
        raise Failure(f"usage: {SCRIPT_NAME} {{{'|'.join(COMMANDS)}}} [NAME...]")
    command, names = argv[0], list(argv[1:])
    if command == "cluster-url":
        return cmd_cluster_url(names)
    for name in names:
        if name not in BROKERS:
            raise Failure(f"unknown broker '{name}' (known: {' '.join(BROKERS)})")
    named = [BROKERS[name] for name in names]
    if command == "start":
        return cmd_start(named or list(BROKERS.values()))
    if command == "stop":
        return cmd_stop(named or [BROKERS[name] for name in OWN_BROKERS])
    if command == "status":
        return cmd_status(named or list(BROKERS.values()))
    if command == "check":
        return cmd_check(named)
    if command in ("outage-begin", "outage-end"):
        return cmd_outage("begin" if command == "outage-begin" else "end", named)
    if command in ("alarm-begin", "alarm-end"):
        return cmd_alarm("begin" if command == "alarm-begin" else "end", named)
    raise Failure(f"unknown command '{command}'")


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except Failure as failure:
        log(str(failure))
        sys.exit(1)
