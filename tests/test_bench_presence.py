"""The presence bench's own arithmetic: CPU per query less the idle CPU, which answers
count as complete and which as wrong, and where each user sits.

The scenario itself needs thousands of sockets and minutes (``python -m bench
presence``); its quick run costs more than the quick matrix can spare, so it
is not part of it.
"""

from __future__ import annotations

import json
import random

import pytest

from bench.presence import Population, QueryTally, cpu_ms_per_query
from bench.report import markdown


def test_cpu_per_query_takes_away_the_idle_cpu_over_as_long() -> None:
    # 3 s of CPU in 10 s of queries; idle, 0.5 s in 5 s (so 1 s in 10 s); 1,000 queries.
    assert cpu_ms_per_query(3.0, 10.0, 0.5, 5.0, 1000) == pytest.approx(2.0)


def test_cpu_per_query_is_none_without_queries_or_an_idle_window() -> None:
    assert cpu_ms_per_query(3.0, 10.0, 0.5, 5.0, 0) is None
    assert cpu_ms_per_query(3.0, 10.0, 0.5, 0.0, 10) is None


def test_a_complete_answer_that_disagrees_with_the_bench_is_wrong() -> None:
    tally = QueryTally()
    right = {"user": "u1", "online": True, "connections": 1, "complete": True}
    tally.answer(0.001, 200, json.dumps(right).encode(), "user", 1)
    offline = {**right, "online": False, "connections": 0}
    tally.answer(0.002, 200, json.dumps(offline).encode(), "user", 1)
    room = {"room": "r", "users": ["a", "b"], "complete": True, "truncated": False}
    tally.answer(0.003, 200, json.dumps(room).encode(), "room", ["a", "b"])
    tally.answer(0.004, 200, json.dumps(room).encode(), "room", ["a", "b", "c"])
    summary = tally.summary()
    assert (summary["queries"], summary["wrong"], summary["complete_fraction"]) == (4, 2, 1.0)


def test_an_incomplete_answer_is_counted_neither_complete_nor_wrong() -> None:
    tally = QueryTally()
    partial = {"room": "r", "users": ["a"], "complete": False, "truncated": False}
    tally.answer(0.01, 200, json.dumps(partial).encode(), "room", ["a", "b"])
    whole = {"room": "r", "users": ["a", "b"], "complete": True, "truncated": False}
    tally.answer(0.01, 200, json.dumps(whole).encode(), "room", ["a", "b"])
    summary = tally.summary()
    assert (summary["complete_fraction"], summary["wrong"]) == (0.5, 0)


def test_a_refused_query_is_a_failure_not_an_answer() -> None:
    tally = QueryTally()
    tally.answer(0.01, 429, b"{}", "user", 1)
    summary = tally.summary()
    assert summary["queries"] == 0
    assert summary["failed_queries"] == {"HTTP 429": 1}
    assert summary["complete_fraction"] is None


def test_latency_percentiles_are_in_milliseconds() -> None:
    tally = QueryTally()
    answer = json.dumps({"online": True, "connections": 1, "complete": True}).encode()
    for milliseconds in range(1, 101):
        tally.answer(milliseconds / 1000, 200, answer, "user", 1)
    assert tally.summary()["latency_ms"] == {"p50": 50.0, "p99": 99.0, "max": 100.0}


def test_every_room_holds_room_size_users_and_each_user_is_in_one() -> None:
    population = Population("p-", users=1000, room_size=100)
    assert population.rooms == 10
    members = [population.members(room) for room in range(population.rooms)]
    assert all(len(users) == 100 for users in members)
    everyone = sorted(user for users in members for user in users)
    assert everyone == sorted(population.user(number) for number in range(1000))


def test_questions_alternate_user_and_room_and_carry_the_right_answer() -> None:
    population = Population("p-", users=40, room_size=10)
    rng = random.Random(0)
    path, kind, right = population.question(rng, 0)
    assert (path.startswith("/presence?user=p-"), kind, right) == (True, "user", 1)
    path, kind, right = population.question(rng, 1)
    assert path.startswith("/presence?room=p--room") and kind == "room"
    room = int(path.rsplit("room", 1)[1])
    assert right == population.members(room)


def test_the_report_has_a_presence_table_and_no_empty_cpu_table() -> None:
    row = {
        "target": "amqp091-rabbitmq",
        "backend": "amqp091",
        "broker": "rabbitmq",
        "scenario": "presence",
        "status": "ok",
        "instances": 2,
        "queries": 2000,
        "queries_per_s": 200.0,
        "latency_ms": {"p50": 5.0, "p99": 20.0, "max": 30.0},
        "complete_fraction": 1.0,
        "wrong": 0,
        "failed_queries": {},
        "users": 10000,
        "rooms": 100,
        "room_size": 100,
        "server_cpu_ms_per_query": 2.5,
        "broker_cpu_ms_per_query": 0.4,
        "idle_instances_cpu_percent": 3.0,
        "params": {"query_rate": 200.0},
    }
    result = {
        "started": "2026-12-06 20:00:00 UTC",
        "quick": False,
        "run_seconds": 100.0,
        "machine": {"cpu_model": "x", "logical_cores": 2},
        "command": "python -m bench presence",
        "rows": [row],
    }
    text = markdown(result)
    assert "| amqp091-rabbitmq | 2 | 10,000 | 100 of 100 | 200 | 200 | 5.0 / 20.0 " in text
    assert "CPU seconds per 1,000 delivered messages" not in text
