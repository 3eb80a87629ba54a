"""Bookkeeping of numbered messages: what was confirmed, what arrived, when, and in what order.

Every message the load generator sends is ``{"s": stream, "n": number, "t":
send time}``: a *stream* is one sequential sender (an HTTP worker or a
WebSocket sender), numbers count up within it, and the send time is the load
generator's ``time.perf_counter()``, so latency needs no clock shared with
the servers. Order is checked per stream and receiver: the protocol
guarantees the order of one sender's messages to one recipient.

A room message reaches ``fanout`` receivers: then arrivals are keyed by
``(stream, number, receiver)``, a message is complete once every receiver got
it, its latency is the fan-out latency (send to the last receiver's arrival),
and ``delivered`` counts deliveries (one per receiver).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import trio


def percentile(ordered: list[float], fraction: float) -> float:
    """The nearest-rank percentile of an already sorted list."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


@dataclass
class Tally:
    """Confirmations and arrivals of one measured run (``fanout`` receivers per message)."""

    confirmed: set[tuple[int, int]] = field(default_factory=set)
    failed: Counter[str] = field(default_factory=Counter)
    arrivals: dict[tuple[int, int], int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    out_of_order: int = 0
    first_send: float = 0.0
    last_arrival: float = 0.0
    # Set whenever something arrives, so the drain can wait for progress.
    progress: trio.Event = field(default_factory=trio.Event)
    _last_number: dict[tuple[int, int], int] = field(default_factory=dict)
    # Confirmed messages that have not arrived yet (a message may arrive before its 202).
    _pending: int = 0
    # Room messages (fanout > 1): the receivers each one reached, and repeats.
    fanout: int = 1
    _copies: dict[tuple[int, int], set[int]] = field(default_factory=dict)
    _repeats: int = 0

    def sending(self) -> float:
        """The send time to put in the next message (the first one starts the clock)."""
        now = time.perf_counter()
        if not self.first_send:
            self.first_send = now
        return now

    def confirm(self, stream: int, number: int) -> None:
        key = (stream, number)
        self.confirmed.add(key)
        if self.fanout > 1:
            if len(self._copies.get(key, ())) < self.fanout:
                self._pending += 1
        elif key not in self.arrivals:
            self._pending += 1

    def fail(self, reason: str) -> None:
        self.failed[reason] += 1

    def arrive(self, receiver: int, message: dict[str, Any]) -> None:
        """Record one message frame's ``message`` as it reaches ``receiver``."""
        now = time.perf_counter()
        stream, number = message["s"], message["n"]
        key = (stream, number)
        if self.fanout > 1:
            copies = self._copies.setdefault(key, set())
            if receiver in copies:
                self._repeats += 1
            else:
                copies.add(receiver)
                if len(copies) == self.fanout:
                    self.latencies.append(now - message["t"])
                    if key in self.confirmed:
                        self._pending -= 1
        else:
            seen = self.arrivals.get(key, 0)
            self.arrivals[key] = seen + 1
            if seen == 0:
                self.latencies.append(now - message["t"])
                if key in self.confirmed:
                    self._pending -= 1
        order_key = (stream, receiver)
        if number < self._last_number.get(order_key, -1):
            self.out_of_order += 1
        else:
            self._last_number[order_key] = number
        self.last_arrival = now
        self.progress.set()

    @property
    def all_arrived(self) -> bool:
        return self._pending == 0

    async def drain(self, idle_timeout: float) -> None:
        """Wait until every confirmed message arrived, or nothing arrived for ``idle_timeout``."""
        while not self.all_arrived:
            self.progress = trio.Event()
            with trio.move_on_after(idle_timeout) as idle:
                await self.progress.wait()
            if idle.cancelled_caught:
                return

    def summary(self) -> dict[str, Any]:
        """The run's figures: counts, rate and latency percentiles (milliseconds)."""
        if self.fanout > 1:
            copies = self._copies
            delivered = sum(len(copies.get(key, ())) for key in self.confirmed)
            expected = self.fanout * len(self.confirmed)
            duplicated = self._repeats
            unconfirmed = sum(len(c) for key, c in copies.items() if key not in self.confirmed)
        else:
            delivered = sum(1 for key in self.confirmed if key in self.arrivals)
            expected = len(self.confirmed)
            duplicated = sum(count - 1 for count in self.arrivals.values())
            unconfirmed = sum(1 for key in self.arrivals if key not in self.confirmed)
        seconds = max(self.last_arrival - self.first_send, 1e-9)
        ordered = sorted(self.latencies)
        latency = (
            {
                name: round(percentile(ordered, fraction) * 1000, 3)
                for name, fraction in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("max", 1.0))
            }
            if ordered
            else {}
        )
        return {
            "confirmed": len(self.confirmed),
            "delivered": delivered,
            "lost": expected - delivered,
            "duplicated": duplicated,
            "out_of_order": self.out_of_order,
            "delivered_unconfirmed": unconfirmed,
            "failed_sends": dict(self.failed),
            "seconds": round(seconds, 3),
            "msg_per_s": round(delivered / seconds, 1) if delivered else 0.0,
            "latency_ms": latency,
        }
