"""What became of every message sent, and how long recovery took."""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise

import trio

from bench.faults.traffic import Socket, Traffic


def connected_over(sockets: list[Socket], user: str, t0: float, t1: float) -> Socket | None:
    """The socket of ``user`` open over the whole of ``[t0, t1]``, if any."""
    for sock in sockets:
        if sock.user == user and sock.opened <= t0 and (sock.closed is None or sock.closed >= t1):
            return sock
    return None


def account(traffic: Traffic) -> dict[str, dict[str, int]]:
    """Per phase: what became of every message sent."""
    received: dict[tuple[str, int], int] = defaultdict(int)
    # Order is promised for confirmed messages (the protocol's guarantee). A message whose
    # sender was refused (say, its publish timed out on a silent broker path)
    # may still reach the broker later, after later ones: that is counted
    # apart, as ``late_without_2xx``, not as a reordering.
    confirmed = {(send.user, send.lane, send.seq) for send in traffic.sends if send.status == 202}
    reordered = late_without_2xx = 0
    for user, seqs in traffic.receipts.items():
        highest: dict[int, int] = defaultdict(lambda: -1)
        for lane, seq, _ in seqs:
            received[(user, lane, seq)] += 1
            if received[(user, lane, seq)] == 1 and (user, lane, seq) in confirmed:
                if seq < highest[lane]:
                    reordered += 1
                highest[lane] = max(highest[lane], seq)
            elif received[(user, lane, seq)] == 1 and seq < highest[lane]:
                late_without_2xx += 1
    phases: dict[str, dict[str, int]] = {}
    for send in traffic.sends:
        row = phases.setdefault(send.phase, defaultdict(int))
        count = received.get((send.user, send.lane, send.seq), 0)
        row["sent"] += 1
        if send.status == 202:
            row[f"2xx_{send.outcome}"] += 1
            if count:
                row["delivered"] += 1
            else:
                row["2xx_lost"] += 1
                # Where the recipient's socket was when the request came in.
                at_send = connected_over(traffic.sockets, send.user, send.t0, send.t0)
                row[f"2xx_lost_on_{at_send.instance if at_send else 'none'}"] += 1
                sock = connected_over(traffic.sockets, send.user, send.t0, send.t1)
                if sock is not None:
                    row["2xx_lost_while_connected"] += 1
                    row[f"2xx_lost_while_connected_on_{sock.instance}"] += 1
        elif send.status == 503:
            row["refused_503_lb" if send.from_lb else "refused_503"] += 1
        elif send.status == 404:
            row["refused_404"] += 1
        elif send.status == 0:
            row["transport_error"] += 1
        else:
            row[f"status_{send.status}"] += 1
        if count > 1:
            row["duplicated"] += 1
        if count and send.status != 202:
            row["delivered_without_2xx"] += 1
    total: dict[str, int] = defaultdict(int)
    for row in phases.values():
        for key, value in row.items():
            total[key] += value
    total["reordered"] = reordered
    if late_without_2xx:
        total["late_without_2xx"] = late_without_2xx
    return {**{k: dict(v) for k, v in phases.items()}, "total": dict(total)}


def recovery(traffic: Traffic, fault_end: float, alive: list[str]) -> dict[str, float | None]:
    """Seconds from ``fault_end`` to the first delivery sent after it, and to all-ready."""
    sent_at = {(s.user, s.lane, s.seq): s.t0 for s in traffic.sends}
    firsts = [
        t
        for user, seqs in traffic.receipts.items()
        for lane, seq, t in seqs
        if sent_at.get((user, lane, seq), -1.0) >= fault_end
    ]
    first_delivery = round(min(firsts) - fault_end, 3) if firsts else None
    ready_at: list[float] = []
    for label in alive:
        transitions = traffic.ready.get(label, [])
        if not transitions or transitions[-1][1] != 200:
            return {"first_delivery_s": first_delivery, "all_ready_s": None}
        ready_at.append(max(transitions[-1][0], fault_end))
    all_ready = round(max(ready_at) - fault_end, 3) if ready_at else None
    return {"first_delivery_s": first_delivery, "all_ready_s": all_ready}


def longest_silence(traffic: Traffic, since: float, until: float) -> dict[str, float | str]:
    """The longest time any user went without a delivery within ``[since, until]``, and who.

    Under steady traffic each user gets a message every few tenths of a
    second, so this is how long delivery stopped for the users a fault hit:
    the seconds until it resumed.
    """
    longest, who = 0.0, ""
    for user in traffic.users:
        times = sorted(t for _, _, t in traffic.receipts.get(user, []) if since <= t <= until)
        edges = [since, *times, until]
        gap = max(later - earlier for earlier, later in pairwise(edges))
        if gap > longest:
            longest, who = gap, user
    return {"seconds": round(longest, 3), "user": who}


def users_resumed(traffic: Traffic, since: float) -> set[str]:
    """The users who got a message sent at or after ``since``."""
    sent_at = {(s.user, s.lane, s.seq): s.t0 for s in traffic.sends}
    return {
        user
        for user, seqs in traffic.receipts.items()
        if any(sent_at.get((user, lane, seq), -1.0) >= since for lane, seq, _ in seqs)
    }


def recovered(traffic: Traffic, fault_end: float, alive: list[str], pinned_404: bool) -> bool:
    """Every user got a message sent after the fault, every surviving instance is ready,
    and (``pinned_404``) a send to a user who was only on the dead instance got a 404."""
    if not set(traffic.users) <= users_resumed(traffic, fault_end):
        return False
    for label in alive:
        transitions = traffic.ready.get(label, [])
        if not transitions or transitions[-1][1] != 200:
            return False
    if pinned_404:
        return any(
            s.user in traffic.pinned and s.status == 404 and s.t0 >= fault_end
            for s in traffic.sends
        )
    return True


async def wait_delivered(traffic: Traffic, timeout: float) -> None:
    """Wait (at most ``timeout``) until every message answered 2xx has been received."""
    with trio.move_on_after(timeout):
        while True:
            received = {
                (user, lane, seq)
                for user, seqs in traffic.receipts.items()
                for lane, seq, _ in seqs
            }
            if all((s.user, s.lane, s.seq) in received for s in traffic.sends if s.status == 202):
                return
            await trio.sleep(0.1)


def first_404(traffic: Traffic, since: float) -> float | None:
    """Seconds from ``since`` to the first 404 for a pinned user (one only on the dead instance)."""
    answered = [
        s.t1
        for s in traffic.sends
        if s.user in traffic.pinned and s.status == 404 and s.t0 >= since
    ]
    return round(min(answered) - since, 3) if answered else None


def sent_rate(traffic: Traffic) -> float:
    """The rate the senders achieved (they fall behind when requests are slow)."""
    times = [send.t0 for send in traffic.sends]
    return round(len(times) / (max(times) - min(times)), 1) if len(times) > 1 else 0.0


def first_unready(traffic: Traffic, label: str, since: float) -> float | None:
    """Seconds from ``since`` to the first non-200 ``/readyz`` of ``label``."""
    for t, status in traffic.ready.get(label, []):
        if t >= since and status != 200:
            return round(t - since, 3)
    return None
