"""What a fault case runs with: the options, the short presets, the hang guards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.targets import Target
from triows.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


RESULTS_DIR = ROOT / "bench" / "results"


HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"


# When bench/results/matrix.json has no direct rate for a target.
ASSUMED_DIRECT_RATE = 300.0


DEFAULT_RATE_SHARE = 0.30


POLL = 0.05


# Hang guards for the after phase (until recovered) and for the last deliveries.
SETTLE_TIMEOUT = 60.0


DELIVERY_TIMEOUT = 10.0


# The death case's user connected to instance A only, directly, never reconnecting.
PINNED_USER = "pinned-a"


# What one sender loop (one request at a time, through HAProxy) is asked to
# carry, in messages/s; more loops per user make up a higher rate.
LANE_RATE = 8


# Hang guards only.
STEP_TIMEOUT = 60.0


OUTAGE_TIMEOUT = 300.0


HTTP_TIMEOUT = 20.0


DEFAULT_CLOSE_TIMEOUT = Settings().close_timeout


# The "expires" of deploy/brokers.py's triows-amqp10-orphans policy on
# ^amq\.gen- queues (RabbitMQ 3.x keeps a receiver link's queue after detach).
AMQP10_ORPHAN_EXPIRES = 60.0


BROKER_FAULTS = ("outage", "kill", "close", "drop", "halfopen", "slow")


INSTANCE_FAULTS = ("drain", "death")


FAULTS = BROKER_FAULTS + INSTANCE_FAULTS


# On a cluster target only: the node under instance B (node 2, first in B's
# list) stopped (rabbitmqctl stop_app) or SIGKILLed, then brought back;
# node-kill-sender: every send goes to instance A and every socket to B, and
# the node under A (node 1) is SIGKILLed; node-restart: the node under B shut
# down whole (rabbitmqctl stop) and booted again, rejoining the cluster.
CLUSTER_FAULTS = ("node-stop", "node-kill", "node-kill-sender", "node-restart")


@dataclass
class Options:
    """What one case runs with; the defaults are the full run's."""

    rate: float | None = None  # messages/s over all users; None: 30 % of the direct rate
    users: int = 8
    before: float = 5.0
    duration: float = 10.0  # how long an outage or a slow network lasts
    stall: float = 25.0  # how long a half-open cut lasts (must exceed heartbeat detection)
    instant_window: float = 5.0  # the "during" phase of an instantaneous fault
    after: float = 10.0
    grace: float = 5.0  # after the last send, how long deliveries may still arrive
    heartbeat: int = 5  # TRIOWS_HEARTBEAT for every instance
    # TRIOWS_QUEUE_EXPIRES (amqp091): an outage of one instance's broker path
    # loses nothing while it is shorter than about this plus heartbeat detection.
    queue_expires: float = Settings().queue_expires
    latency: float = 0.2  # the slow network's added one-way delay per direction
    kill_down: float = 2.0  # how long a SIGKILLed broker stays dead before its restart
    # How long the death and churn cases wait for the broker to forget what it
    # held: on AMQP 1.0/RabbitMQ 3.x until the orphan policy expires the
    # links' queues, plus heartbeat detection and the broker's expiry timer.
    forget_timeout: float = AMQP10_ORPHAN_EXPIRES + 30.0
    # TRIOWS_PING_INTERVAL for every instance: a vanished client is cut within
    # about twice this (TCP keepalive / TCP_USER_TIMEOUT, triows/serving.py).
    ping_interval: float = 2.0


def direct_rate(target: Target) -> float:
    """The target's ``direct`` rate from the last bench matrix, else an assumed one."""
    try:
        rows = json.loads((RESULTS_DIR / "matrix.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        return ASSUMED_DIRECT_RATE
    for row in rows:
        if row.get("target") == target.name and row.get("scenario") == "direct":
            return float(row.get("msg_per_s") or ASSUMED_DIRECT_RATE)
    return ASSUMED_DIRECT_RATE


def ci_options() -> Options:
    """The shortest phases that still show each fault (tests/test_faults.py)."""
    return Options(
        rate=30.0,
        users=4,
        before=1.0,
        duration=3.0,
        # Longer than aiormq's detection of a silent broker, (heartbeat + 1) * 3 s.
        stall=12.0,
        instant_window=1.5,
        after=2.0,
        grace=1.0,
        # 2 s, not 1: at 1 s AMQP 1.0 sessions timed out on their own (local
        # idle timeout) while this shared VM ran at a quarter of its speed.
        heartbeat=2,
        # Outlasts the half-open stall (the broker drops the silent connection
        # within seconds, the path heals after ``stall``).
        queue_expires=20.0,
        kill_down=1.0,
        forget_timeout=35.0,
    )


def quick_options(rate: float | None = None) -> Options:
    # aiormq notices a silent peer after (heartbeat + 1) * 3 s: 6 s at 1 s.
    return Options(
        rate=rate or 40.0,
        users=4,
        before=2.0,
        duration=4.0,
        stall=9.0,
        instant_window=2.0,
        after=4.0,
        grace=3.0,
        heartbeat=1,
        kill_down=1.0,
    )
