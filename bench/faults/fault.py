"""The shape every fault function has, and the refusal of one that cannot run here."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from bench.faults.cluster import Cluster
from bench.faults.options import Options
from bench.faults.traffic import Clock, Traffic

FaultRun = Callable[[Cluster, Traffic, Clock, Options], Awaitable[dict[str, Any]]]


class NotPossible(Exception):
    """This fault cannot be provoked on this target here; the message says why."""
