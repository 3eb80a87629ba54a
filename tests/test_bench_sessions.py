"""The sessions benches count what a resume must not do (refuse, lose, duplicate, reorder),
per user across its connections, and report sessions on against off side by side."""

from __future__ import annotations

from bench.cpu import ROLES
from bench.faults.sessions import Sent, SessionUser, account
from bench.report import markdown
from bench.targets import TARGETS, with_resume_window


def _user(name: str, ids: list[str], seqs: list[int]) -> SessionUser:
    user = SessionUser(name, [])
    user.ids, user.seqs = ids, seqs
    return user


def _sent(user: str, message_id: str | None, status: int = 202, outcome: str = "routed") -> Sent:
    return Sent(user, 0.0, status, outcome if status == 202 else "", message_id)


def test_a_message_delivered_to_one_user_twice_is_one_duplicate() -> None:
    # Bob saw m2 on B, and again on A after resuming: one message, twice.
    bob = _user("bob", ["m1", "m2", "m2", "m3"], [1, 2, 3, 4])
    sent = [_sent("bob", "m1"), _sent("bob", "m2"), _sent("bob", "m3", outcome="queued")]
    counted = account([bob], sent)
    assert (counted["duplicated"], counted["lost_2xx"], counted["refused"]) == (1, 0, 0)
    assert counted["outcomes"] == {"routed": 2, "queued": 1}


def test_the_same_message_id_at_two_users_is_no_duplicate() -> None:
    # Ids are per send; a send to a room would reach both, once each.
    alice, bob = _user("alice", ["m1"], [1]), _user("bob", ["m1"], [1])
    assert account([alice, bob], [_sent("alice", "m1")])["duplicated"] == 0


def test_a_2xx_never_delivered_is_lost_and_a_refusal_is_not() -> None:
    bob = _user("bob", ["m1"], [1])
    sent = [
        _sent("bob", "m1"),
        _sent("bob", "m2"),
        _sent("bob", None, status=503),
        _sent("bob", None, 0),
    ]
    counted = account([bob], sent)
    assert (counted["lost_2xx"], counted["refused"]) == (1, 2)
    assert counted["refused_by_status"] == {"503": 1, "0": 1}


def test_order_and_seq_are_checked_across_a_resume() -> None:
    bob = _user("bob", ["m2", "m1", "m3"], [1, 2, 4])
    sent = [_sent("bob", "m1"), _sent("bob", "m2"), _sent("bob", "m3")]
    counted = account([bob], sent)
    assert (counted["reordered"], counted["seq_not_consecutive"]) == (1, 1)


def test_a_target_run_per_resume_window_is_named_and_set_for_it() -> None:
    variant = with_resume_window(TARGETS["amqp091-rabbitmq"], "0")
    assert variant.name == "amqp091-rabbitmq:resume0"
    assert dict(variant.env) == {"TRIOWS_RESUME_WINDOW": "0"}
    assert variant.base == "amqp091-rabbitmq"


def _row(target: str, scenario: str, msg_per_s: float, server_ms: float) -> dict[str, object]:
    return {
        "target": target,
        "scenario": scenario,
        "status": "ok",
        "msg_per_s": msg_per_s,
        "server_cpu_ms_per_message": server_ms,
        "rss_kib_per_connection": 30.0,
        "broker_kib_per_connection": 20.0,
        "session_queues": 1000,
        "broker_queue_kib_per_session": 15.0,
        "latency_ms": {"p50": 1.0, "p99": 2.0},
        "lost": 0,
        "duplicated": 0,
        "out_of_order": 0,
        "loadgen_saturated": False,
        "loadgen_cpu_share": 0.5,
        "other_cpu_cores": 0.1,
        "cpu_per_1000": dict.fromkeys(ROLES, 0.25),
        "params": {},
    }


def test_the_report_sets_sessions_on_against_off_with_their_ratios() -> None:
    rows = [
        _row("amqp091-rabbitmq:resume0", "direct", 1000.0, 0.5),
        _row("amqp091-rabbitmq:resume120", "direct", 900.0, 0.6),
    ]
    result = {
        "started": "2026-12-06 12:00:00 UTC",
        "quick": True,
        "run_seconds": 10.0,
        "machine": {"cpu_model": "test", "logical_cores": 2},
        "command": "python -m bench direct --resume-window 0,120",
        "rows": rows,
    }
    text = markdown(result)
    assert "| amqp091-rabbitmq | 0 | 1,000 | 0.500 | not run |" in text
    assert "| **amqp091-rabbitmq 120 / 0** |  | 0.90x | 1.20x | - |" in text
