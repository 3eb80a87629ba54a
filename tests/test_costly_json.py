"""JSON that is cheap to send and costly to parse, and batch items checked like single bodies.

Driven against real ``triows serve`` processes (dev mode, memory backend) with
the frames and bodies an abuser would send; the parsing rules underneath are
tested as pure functions.
"""

from __future__ import annotations

import json

import httpx
import pytest
import trio

from tests.conftest import serving
from triows.client import open_events
from triows.process import serve_instance
from triows.protocol import (
    InvalidInput,
    MessageTooLarge,
    SendRequest,
    check_body_tokens,
    check_tokens,
    json_tokens,
    parse_send_batch,
)

# Hang guard only: no test asserts on how long something took.
STEP_TIMEOUT = 30
JSON = {"Content-Type": "application/json"}
# 64 KiB of empty objects: one of the cheapest frames to send, among the costliest to parse.
EMPTY_OBJECTS = [{}] * 21_500
# A faster rate than the default, so the cost charged to the costly frame is waited out quickly.
FAST_SENDER = {"TRIOWS_SEND_RATE": "5000"}


async def test_a_frame_of_21500_empty_objects_is_refused_too_large_and_not_delivered() -> None:
    async with serve_instance("memory", env=FAST_SENDER) as server:
        async with (
            open_events(server.base_url, user="Bob") as bob,
            open_events(server.base_url, user="Mallory") as mallory,
        ):
            with trio.fail_after(STEP_TIMEOUT):
                frame = {"type": "send", "to": "Bob", "message": EMPTY_OBJECTS, "ref": "costly"}
                await mallory.websocket.send_message(json.dumps(frame, separators=(",", ":")))
                answer = await mallory.receive()
                assert (answer["type"], answer["code"]) == ("error", "too_large")
                assert "structural tokens" in answer["detail"]
                # The socket stays open and usable, and Bob got nothing before this one.
                await mallory.send("Bob", "after", ref="plain")
                assert (await mallory.receive())["type"] == "ack"
                assert (await bob.receive())["message"] == "after"


async def test_a_body_of_21500_empty_objects_is_413_before_it_is_parsed() -> None:
    async with serve_instance("memory") as server, httpx.AsyncClient() as http:
        body = json.dumps({"to": "Bob", "message": EMPTY_OBJECTS}, separators=(",", ":")).encode()
        response = await http.post(f"{server.base_url}/send", content=body, headers=JSON)
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
        assert "structural tokens" in response.json()["detail"]


async def test_a_batch_of_one_item_of_21500_empty_objects_is_413_as_a_whole() -> None:
    async with serve_instance("memory") as server, httpx.AsyncClient() as http:
        batch = [{"to": "Bob", "message": EMPTY_OBJECTS}]
        body = json.dumps(batch, separators=(",", ":")).encode()
        response = await http.post(f"{server.base_url}/send", content=body, headers=JSON)
        assert response.status_code == 413
        assert "structural tokens" in response.json()["detail"]


async def test_a_batch_over_the_item_limit_is_413_before_the_items_past_it_are_read() -> None:
    async with serve_instance("memory", env={"TRIOWS_MAX_BATCH": "3"}) as server:
        async with httpx.AsyncClient() as http:
            # Four items, the fourth never finished: only an answer given on
            # reaching it, before decoding it, can be 413 rather than 400.
            items = ",".join(json.dumps({"to": "Bob", "message": n}) for n in range(3))
            body = f'[{items},{{"to":"Bob","message":'.encode()
            response = await http.post(f"{server.base_url}/send", content=body, headers=JSON)
            assert response.status_code == 413
            assert "at most 3" in response.json()["detail"]


async def test_a_batch_item_repeating_to_fails_alone_and_reaches_no_one() -> None:
    async with serve_instance("memory") as server, httpx.AsyncClient() as http:
        async with (
            open_events(server.base_url, user="Bob") as bob,
            open_events(server.base_url, user="Eve") as eve,
        ):
            body = b'[{"to":"Bob","message":"forged","to":"Eve"},{"to":"Bob","message":"fine"}]'
            response = await http.post(f"{server.base_url}/send", content=body, headers=JSON)
            assert response.status_code == 207
            repeated, fine = response.json()
            assert repeated["status"] == 400
            assert repeated["error"]["detail"] == "an object repeats a key"
            assert fine["status"] == "routed"
            with trio.fail_after(STEP_TIMEOUT):
                assert (await bob.receive())["message"] == "fine"
                # Eve's first message is this one: the forged item never reached her.
                await http.post(
                    f"{server.base_url}/send", json={"to": "Eve", "message": "next"}, headers=JSON
                )
                assert (await eve.receive())["message"] == "next"


async def test_a_5000_digit_number_fails_its_batch_item_as_it_fails_a_single_body() -> None:
    huge = "9" * 5000
    async with serve_instance("memory") as server, httpx.AsyncClient() as http:
        async with open_events(server.base_url, user="Bob") as bob:
            single = f'{{"to":"Bob","message":{huge}}}'.encode()
            response = await http.post(f"{server.base_url}/send", content=single, headers=JSON)
            assert response.status_code == 400
            detail = response.json()["detail"]
            batch = f'[{{"to":"Bob","message":{huge}}},{{"to":"Bob","message":2}}]'.encode()
            response = await http.post(f"{server.base_url}/send", content=batch, headers=JSON)
            assert response.status_code == 207
            digits, fine = response.json()
            assert (digits["status"], digits["error"]["detail"]) == (400, detail)
            assert fine["status"] == "routed"
            with trio.fail_after(STEP_TIMEOUT):
                assert (await bob.receive())["message"] == 2


async def test_a_websocket_frame_is_charged_one_send_per_send_cost_tokens(
    autojump_clock: trio.abc.Clock,
) -> None:
    # One send per second, no burst: a frame of 644 tokens costs 1 + 644 // 64 = 11 sends.
    async with serving(send_rate=1.0, send_burst=1) as client:
        async with client.websocket("/events?user=Anne") as anne:
            await anne.receive()  # hello
            message = [[] for _ in range(320)]  # 320 '[' and 319 ','
            frame = json.dumps({"type": "send", "to": "Anne", "message": message, "ref": "a"})
            assert json_tokens(frame) == 1 + 3 + 640  # the frame's '{' and ',' around it
            started = trio.current_time()
            await anne.send(frame)
            answers = {json.loads(await anne.receive())["type"] for _ in range(2)}
            assert answers == {"ack", "message"}
            # The one send in the bucket was there; the other ten were waited for.
            assert trio.current_time() - started >= 10


def test_structural_tokens_inside_strings_are_not_counted() -> None:
    text = json.dumps({"message": "[{, " * 1000, "list": [1, 2, 3]})
    assert json_tokens(text) == 5  # '{', the ',' between fields, '[' and its two ','
    assert json_tokens(text.encode()) == json_tokens(text)
    escaped = json.dumps({"message": '\\"[' * 100 + "é"})
    assert json_tokens(escaped) == json_tokens(escaped.encode()) == 1


def test_an_unterminated_string_is_counted_in_one_pass() -> None:
    assert json_tokens('"' + '\\"[,' * 10_000) == 0
    assert json_tokens("[" * 100 + '"' + "\\") == 100


def test_check_tokens_names_the_limit() -> None:
    check_tokens(10, 10)
    with pytest.raises(MessageTooLarge, match="more than 10 structural tokens"):
        check_tokens(11, 10)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"m":"' + b"," * 70_000 + b'"}',  # a string across the prefix's end
        b'{"m":"' + b'\\"[' * 30_000 + b'"}',  # escaped quotes across it
        b'["' + b"x" * 65_529 + b'",' + b"1," * 10 + b"1]",  # the cut just after a string
        b"[" + b"1," * 40_000 + b"1]",  # structure all along
    ],
)
def test_a_long_body_is_judged_as_its_whole_count_says(raw: bytes) -> None:
    count = json_tokens(raw)
    check_body_tokens(raw, count)
    with pytest.raises(MessageTooLarge):
        check_body_tokens(raw, count - 1)


def test_a_rough_count_within_the_limit_is_enough() -> None:
    text = json.dumps({"message": ", " * 100})
    assert json_tokens(text, exact_above=1000) == 101
    assert json_tokens(text) == 1


def test_each_batch_item_is_decoded_strictly_and_fails_alone() -> None:
    raw = b' [ {"to":"Bob","message":NaN} , {"to":"Bob","message":1,"from":"Anne"} ] '
    refused, fine = parse_send_batch(raw, dev_mode=True, max_items=10) or []
    assert isinstance(refused, InvalidInput)
    assert fine == (SendRequest("Bob", 1), "Anne")


@pytest.mark.parametrize(
    "raw",
    [b"[", b'[{"to":"Bob","message":1},]', b'[{"to":"Bob","message":1}] x', b"[1]", b'[{"a":1'],
)
def test_a_batch_that_is_not_an_array_of_objects_is_refused_whole(raw: bytes) -> None:
    with pytest.raises(InvalidInput):
        parse_send_batch(raw, dev_mode=True, max_items=10)
