"""Facts about the machine a run happened on, stored with every result file."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import psutil

LIBRARIES = (
    "triows",
    "trio",
    "anyio",
    "hypercorn",
    "quart-trio",
    "wsproto",
    "h11",
    "trio-websocket",
    "httpx",
    "aiormq",
    "trio-asyncio",
    "python-qpid-proton",
)
BROKER_PACKAGES = ("rabbitmq-server", "erlang-base", "activemq", "garagemq")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _broker_versions() -> dict[str, str]:
    """Debian package versions (the brokers deploy/brokers.py installs)."""
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", *BROKER_PACKAGES],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        return {}
    return dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)


def machine_facts() -> dict[str, Any]:
    """CPU model, core counts, memory, OS, Python, library and broker versions."""
    return {
        "cpu_model": _cpu_model(),
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
        "libraries": _library_versions(),
        "brokers": _broker_versions(),
    }
