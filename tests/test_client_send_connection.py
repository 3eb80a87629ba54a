"""``triows.client.SendConnection``: many ``POST /send`` on one keep-alive connection."""

from __future__ import annotations

import json

import pytest

from triows.client import open_events, open_send_connection
from triows.process import serve_instance


async def test_one_connection_carries_many_sends_and_each_reaches_bob() -> None:
    async with serve_instance("memory") as server:
        async with (
            open_events(server.base_url, user="Bob") as bob,
            open_send_connection(server.base_url) as connection,
        ):
            for number in range(3):
                status, body = await connection.send("Bob", {"n": number}, sender="Anne")
                assert status == 202
                assert json.loads(body)["status"] == "routed"
                frame = await bob.receive()
                assert (frame["from"], frame["message"]) == ("Anne", {"n": number})
                assert frame["id"] == json.loads(body)["id"]


async def test_a_send_to_an_offline_user_answers_404_and_the_connection_stays_usable() -> None:
    async with serve_instance("memory") as server:
        async with open_send_connection(server.base_url) as connection:
            status, body = await connection.send("Nobody", "hi")
            assert status == 404
            assert json.loads(body)["type"].endswith("/offline")
            status, _ = await connection.send("bad name!", "hi")
            assert status == 400


async def test_only_plain_http_urls_are_accepted() -> None:
    with pytest.raises(ValueError, match="http://"):
        async with open_send_connection("https://example.org"):
            pass


async def test_sends_go_on_after_the_server_ends_keep_alive() -> None:
    # Hypercorn closes a keep-alive connection after 1,000 requests
    # (keep_alive_max_requests); the next request opens a new connection.
    async with serve_instance("memory") as server:
        async with open_send_connection(server.base_url) as connection:
            for number in range(1005):
                status, _ = await connection.send("Nobody", number)
                assert status == 404, number
