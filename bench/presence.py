"""The load side of ``bench presence``: idle users in rooms, paced presence queries, and
the arithmetic of their figures.

``U`` users (``--users``, 10,000) are held idle by ``--holders`` processes
(``bench/idle_holder.py``, many sockets each): user ``i`` is ``PREFIX{i}`` on
instance ``i mod N`` and a member of one room, ``PREFIX-room{i mod R}`` with
``R = U / room size`` (100 members each, so every room spans every
instance). Queries alternate ``GET /presence?user=`` of a random user and
``?room=`` of a random room, each checked against what the bench holds:
the user online with one connection, the room's members exactly.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import trio

from bench.idle_holder import room_of
from bench.mass_resume import _read_line
from bench.tally import percentile
from bench.traffic import Schedule
from triows.client import SendConnection

# Opening the users (a hang guard, not a measurement): 10,000 users take minutes here.
OPEN_TIMEOUT = 900.0


@dataclass(frozen=True)
class Population:
    """Who is connected where, and in which room (the module docstring)."""

    prefix: str
    users: int
    room_size: int

    @property
    def rooms(self) -> int:
        return max(1, self.users // self.room_size)

    def user(self, number: int) -> str:
        return f"{self.prefix}{number}"

    def room(self, number: int) -> str:
        return room_of(self.prefix, number, self.rooms)

    def members(self, room: int) -> list[str]:
        return sorted(self.user(number) for number in range(room, self.users, self.rooms))

    def question(self, rng: random.Random, number: int) -> tuple[str, str, Any]:
        """Query ``number``'s path, its kind (``user`` or ``room``) and the right answer."""
        if number % 2 == 0:
            user = self.user(rng.randrange(self.users))
            return f"/presence?user={quote(user)}", "user", 1
        room = rng.randrange(self.rooms)
        return f"/presence?room={quote(self.room(room))}", "room", self.members(room)


@dataclass
class QueryTally:
    """What the queries of one phase got: latency, completeness, right or wrong."""

    latencies: list[float] = field(default_factory=list)
    complete: int = 0
    # Answers that said complete but were not what the bench holds.
    wrong: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.perf_counter)
    ended: float = 0.0

    def answer(self, seconds: float, status: int, body: bytes, kind: str, right: Any) -> None:
        if status != 200:
            self.failed[f"HTTP {status}"] += 1
            return
        self.latencies.append(seconds)
        document = json.loads(body)
        if not document.get("complete"):
            return
        self.complete += 1
        if kind == "user":
            correct = document.get("online") is True and document.get("connections") == right
        else:
            correct = document.get("users") == right and document.get("truncated") is False
        if not correct:
            self.wrong += 1

    def summary(self) -> dict[str, Any]:
        answered = len(self.latencies)
        wall = (self.ended or time.perf_counter()) - self.started
        ordered = sorted(self.latencies)
        return {
            "queries": answered,
            "queries_per_s": round(answered / wall, 1) if wall > 0 else None,
            "latency_ms": (
                {
                    name: round(1000 * percentile(ordered, fraction), 2)
                    for name, fraction in (("p50", 0.50), ("p99", 0.99), ("max", 1.0))
                }
                if ordered
                else {}
            ),
            "complete_fraction": round(self.complete / answered, 4) if answered else None,
            "wrong": self.wrong,
            "failed_queries": dict(self.failed),
        }


def cpu_ms_per_query(
    busy_seconds: float, busy_wall: float, idle_seconds: float, idle_wall: float, queries: int
) -> float | None:
    """CPU milliseconds per query: the CPU of the query phase less what the same processes
    spend idle over as long (measured over ``idle_wall`` just before), over the queries."""
    if not queries or busy_wall <= 0 or idle_wall <= 0:
        return None
    return 1000 * (busy_seconds - idle_seconds * busy_wall / idle_wall) / queries


async def query_stream(
    connection: SendConnection,
    stream: int,
    population: Population,
    tally: QueryTally,
    schedule: Schedule,
) -> None:
    """One sequential stream of presence queries on one keep-alive connection."""
    rng = random.Random(stream)
    number = stream
    while await schedule.next_send():
        path, kind, right = population.question(rng, number)
        started = time.perf_counter()
        status, body = await connection.get(path)
        tally.answer(time.perf_counter() - started, status, body, kind, right)
        number += 1


@asynccontextmanager
async def holding_users(
    ws_urls: Sequence[str], population: Population, holders: int
) -> AsyncIterator[float]:
    """Open every user of ``population`` over ``ws_urls`` from ``holders`` processes;
    yields the seconds that took, and kills the holders on the way out."""
    processes: list[trio.Process] = []
    try:
        started = time.perf_counter()
        for index in range(holders):
            count = len(range(index, population.users, holders))
            processes.append(
                await trio.lowlevel.open_process(
                    [
                        sys.executable,
                        "-m",
                        "bench.idle_holder",
                        ",".join(ws_urls),
                        str(count),
                        f"--prefix={population.prefix}",
                        f"--start={index}",
                        f"--step={holders}",
                        f"--rooms={population.rooms}",
                        "--report",
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            )
        failed = 0
        with trio.fail_after(OPEN_TIMEOUT):
            for process in processes:
                assert process.stdout is not None
                line = await _read_line(process.stdout, bytearray())
                failed += int(line.split()[-1])
        if failed:
            raise RuntimeError(f"{failed} of {population.users} users could not connect")
        yield time.perf_counter() - started
    finally:
        for process in processes:
            process.kill()
        with trio.move_on_after(10, shield=True):
            for process in processes:
                await process.wait()
