"""What RabbitMQ holds, read from the broker: its memory and a run's session queues.

``rabbitmqctl`` (no management plugin needed): ``erlang:memory(total)`` is
what the Erlang VM has allocated, the figure RabbitMQ's memory alarm watches;
the node is shared with whatever else runs on the machine, so a difference
over a window is only this run's where that run dominates it.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

# rabbitmqctl starts an Erlang VM of its own: seconds on a loaded machine.
RABBITMQCTL_TIMEOUT = 60.0


async def _rabbitmqctl(*args: str) -> str | None:
    try:
        with trio.fail_after(RABBITMQCTL_TIMEOUT):
            result = await trio.run_process(
                ["rabbitmqctl", "-q", *args],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except (OSError, trio.TooSlowError):
        return None
    return result.stdout.decode() if result.returncode == 0 else None


async def rabbitmq_memory(nodes: Sequence[str | None] = (None,)) -> int | None:
    """Bytes the RabbitMQ node's Erlang VM has allocated (``rabbitmqctl``'s default node),
    or the Erlang ``nodes``' VMs together (a cluster); None: not readable here."""
    total = 0
    for node in nodes:
        out = await _rabbitmqctl(*(("-n", node) if node else ()), "eval", "erlang:memory(total).")
        try:
            total += int(out.strip()) if out else 0
        except ValueError:
            return None
        if not out:
            return None
    return total


async def session_queues(exchange: str, node: str | None = None) -> tuple[int, int] | None:
    """How many session queues of ``exchange`` the node (``rabbitmqctl``'s default, or the
    Erlang ``node``) holds, and the bytes their processes use (``list_queues memory``;
    None: not readable here)."""
    out = await _rabbitmqctl(*(("-n", node) if node else ()), "list_queues", "name", "memory")
    if out is None:
        return None
    count = memory = 0
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].startswith(f"{exchange}.session."):
            count += 1
            memory += int(fields[1]) if fields[1].isdigit() else 0
    return count, memory


async def rabbitmq_node_process() -> int | None:
    """The OS pid of the node ``rabbitmqctl`` talks to (the machine may run other nodes)."""
    out = await _rabbitmqctl("eval", "os:getpid().")
    try:
        return int(out.strip().strip('"')) if out else None
    except ValueError:
        return None
