"""CPU seconds per process, from the OS (psutil), for "where the time goes".

Each role (instance A, instance B, broker, load generator) is a group of
processes; a meter takes a snapshot before and after a measured window and
reports the CPU seconds (user + system) each role spent in it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psutil

# The load generator is one Trio thread: above this share of one core it is the bottleneck.
SATURATED_SHARE = 0.90

ROLES = ("instance_a", "instance_b", "broker", "loadgen")


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (every process on the machine)."""
    times = psutil.cpu_times()
    return float(sum(times)) - times.idle - getattr(times, "iowait", 0.0)


def _cpu_seconds(processes: Sequence[psutil.Process]) -> float | None:
    total = 0.0
    try:
        for process in processes:
            times = process.cpu_times()
            total += times.user + times.system
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return total


@dataclass(frozen=True)
class CpuWindow:
    """CPU seconds each role spent during ``wall`` seconds of wall-clock time."""

    wall: float
    seconds: dict[str, float | None]
    # Everything else the machine ran meanwhile (other users' tests, system): noise.
    other: float = 0.0

    def per_thousand(self, delivered: int) -> dict[str, float | None]:
        """CPU seconds per 1,000 delivered messages, per role (None: not measured)."""
        return {
            role: (None if spent is None or delivered == 0 else spent * 1000 / delivered)
            for role, spent in self.seconds.items()
        }

    @property
    def loadgen_share(self) -> float:
        """The load generator's CPU as a share of one core (1.0 = one core busy)."""
        spent = self.seconds.get("loadgen")
        return 0.0 if spent is None or self.wall <= 0 else spent / self.wall

    @property
    def loadgen_saturated(self) -> bool:
        return self.loadgen_share >= SATURATED_SHARE


class CpuMeter:
    """Measures the CPU seconds of each role's processes over a window."""

    def __init__(self, roles: Mapping[str, Sequence[psutil.Process]]) -> None:
        self._roles = {role: list(processes) for role, processes in roles.items()}
        self._roles["loadgen"] = [psutil.Process()]
        self._started = 0.0
        self._before: dict[str, float | None] = {}
        self._busy_before = 0.0

    def start(self) -> None:
        self._started = time.perf_counter()
        self._busy_before = _machine_busy_seconds()
        self._before = {role: _cpu_seconds(group) for role, group in self._roles.items()}

    def stop(self) -> CpuWindow:
        wall = time.perf_counter() - self._started
        seconds: dict[str, float | None] = {}
        for role, group in self._roles.items():
            before, after = self._before.get(role), _cpu_seconds(group)
            seconds[role] = None if before is None or after is None or not group else after - before
        busy = _machine_busy_seconds() - self._busy_before
        ours = sum(spent for spent in seconds.values() if spent is not None)
        return CpuWindow(wall, seconds, other=max(0.0, busy - ours))
