"""``POST /send`` with a JSON array: one request, each message's own outcome, in order."""

from __future__ import annotations

import json

import pytest
import trio
from quart.testing.connections import WebsocketDisconnectError

from tests.conftest import serving
from triows.auth import mint_token

SECRET = "batch-secret-" + "x" * 48


async def test_a_batch_answers_each_item_in_order_and_delivers_the_routed_ones() -> None:
    async with serving() as client:
        async with client.websocket("/events?user=Bob") as bob:
            await bob.receive()  # hello
            batch = [
                {"to": "Bob", "message": 1, "from": "Anne"},
                {"to": "Carol", "message": 2},
                {"to": "a/b", "message": 3},
                {"to": "Bob", "message": 4},
            ]
            response = await client.post("/send", json=batch)
            assert response.status_code == 207
            first, offline, invalid, last = await response.get_json()
            assert first["status"] == last["status"] == "routed"
            assert offline["status"] == 404
            assert offline["error"]["type"].endswith("/offline")
            assert invalid["status"] == 400
            assert invalid["error"]["type"].endswith("/invalid")
            delivered = [json.loads(await bob.receive()) for _ in range(2)]
            # Published concurrently: each arrives once, with the id its item was given.
            assert {(m["id"], m["message"]) for m in delivered} == {
                (first["id"], 1),
                (last["id"], 4),
            }


async def test_an_empty_batch_is_an_empty_answer() -> None:
    async with serving() as client:
        response = await client.post("/send", json=[])
        assert response.status_code == 207
        assert await response.get_json() == []


async def test_a_batch_over_the_count_is_413_and_nothing_is_sent() -> None:
    async with serving(max_batch=3) as client:
        async with client.websocket("/events?user=Bob") as bob:
            await bob.receive()
            response = await client.post(
                "/send", json=[{"to": "Bob", "message": n} for n in range(4)]
            )
            assert response.status_code == 413
            assert response.content_type == "application/problem+json"
            ok = await client.post("/send", json=[{"to": "Bob", "message": "only"}])
            assert (await ok.get_json())[0]["status"] == "routed"
            assert json.loads(await bob.receive())["message"] == "only"


@pytest.mark.parametrize("body", [[1, {"to": "Bob", "message": 1}], [[{"to": "Bob"}]]])
async def test_a_batch_of_non_objects_is_400(body: list[object]) -> None:
    async with serving() as client:
        response = await client.post("/send", json=body)
        assert response.status_code == 400


async def test_a_batch_is_sent_as_the_token_subject() -> None:
    async with serving(secret=SECRET) as client:
        async with client.websocket(f"/events?token={mint_token(SECRET, 'Bob')}") as bob:
            await bob.receive()
            response = await client.post(
                "/send",
                json=[{"to": "Bob", "message": 1, "from": "Mallory"}],
                headers={"Authorization": f"Bearer {mint_token(SECRET, 'Anne')}"},
            )
            assert response.status_code == 207
            assert json.loads(await bob.receive())["from"] == "Anne"


async def test_token_expiry_runs_on_the_trio_clock(autojump_clock: trio.abc.Clock) -> None:
    async with serving(secret=SECRET) as client:
        async with client.websocket(f"/events?token={mint_token(SECRET, 'Bob', ttl=3600)}") as bob:
            await bob.receive()
            # An hour on the virtual clock passes at once: the reader's deadline fires.
            with pytest.raises(WebsocketDisconnectError) as closed:
                await bob.receive()
            assert closed.value.args[0] == 4401
