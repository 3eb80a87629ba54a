"""The HTTP and WebSocket surface of one instance, through Quart's test client."""

from __future__ import annotations

import json
import time

import jwt
import pytest
import trio
from quart.testing.connections import WebsocketDisconnectError, WebsocketResponseError
from quart.typing import TestClientProtocol as QuartClient

from tests.conftest import close_normally, serving
from triows.app import create_app
from triows.auth import mint_token
from triows.protocol import DEV_MODE_SENDER
from triows.settings import Settings

SECRET = "test-secret-" + "x" * 64
PROBLEM = "application/problem+json"


async def post(client: QuartClient, body: object, **kwargs: object):  # type: ignore[no-untyped-def]
    return await client.post("/send", json=body, **kwargs)


async def test_hello_frame_names_user_instance_and_protocol() -> None:
    async with serving(instance_id="inst-1") as client:
        async with client.websocket("/events?user=Bob") as bob:
            hello = json.loads(await bob.receive())
            assert len(hello.pop("session")) == 22  # 128 random bits, URL-safe base64
            assert hello == {
                "type": "hello",
                "user": "Bob",
                "instance": "inst-1",
                "protocol": 1,
                "resumable": True,
                "resumed": False,
                "missed": 0,
            }


async def test_without_sessions_the_hello_says_the_connection_is_not_resumable() -> None:
    async with serving(instance_id="inst-1", resume_window=0) as client:
        async with client.websocket("/events?user=Bob") as bob:
            assert json.loads(await bob.receive()) == {
                "type": "hello",
                "user": "Bob",
                "instance": "inst-1",
                "protocol": 1,
                "session": None,
                "resumable": False,
            }


async def test_message_reaches_each_connection_of_the_user_exactly_once(
    client: QuartClient,
) -> None:
    async with (
        client.websocket("/events?user=Bob") as phone,
        client.websocket("/events?user=Bob") as laptop,
    ):
        for socket in (phone, laptop):
            await socket.receive()  # hello
        response = await post(client, {"to": "Bob", "message": {"n": 1}, "from": "Anne"})
        assert response.status_code == 202
        sent = await response.get_json()
        assert sent["status"] == "routed"
        await post(client, {"to": "Bob", "message": {"n": 2}})
        for socket in (phone, laptop):
            first, second = json.loads(await socket.receive()), json.loads(await socket.receive())
            assert (first["id"], first["from"], first["message"]) == (sent["id"], "Anne", {"n": 1})
            assert second["message"] == {"n": 2}  # not a duplicate of the first


async def test_a_dev_mode_send_without_from_is_delivered_from_anonymous(
    client: QuartClient,
) -> None:
    async with client.websocket("/events?user=Bob") as bob:
        await bob.receive()  # hello
        assert (await post(client, {"to": "Bob", "message": "single"})).status_code == 202
        assert (await post(client, [{"to": "Bob", "message": "batch"}])).status_code == 207
        for text in ("single", "batch"):
            message = json.loads(await bob.receive())
            assert (message["message"], message["from"]) == (text, DEV_MODE_SENDER)


async def test_send_to_offline_user_is_404_problem(client: QuartClient) -> None:
    response = await post(client, {"to": "Carol", "message": "hi"})
    assert response.status_code == 404
    assert response.content_type == PROBLEM
    assert (await response.get_json())["type"].endswith("/offline")


async def test_recipient_is_offline_again_after_last_connection_left(
    client: QuartClient,
) -> None:
    async with client.websocket("/events?user=Carol") as carol:
        await carol.receive()
        assert (await post(client, {"to": "Carol", "message": 1})).status_code == 202
        await close_normally(carol)  # a normal close ends the session at once
    # Leaving the block waited for the handler, and so for its unsubscribe.
    assert (await post(client, {"to": "Carol", "message": 2})).status_code == 404


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"{not json", {"Content-Type": "application/json"}, 400),
        (b'{"to":"a/b","message":1}', {"Content-Type": "application/json"}, 400),
        (b'["to","Bob"]', {"Content-Type": "application/json"}, 400),
        (b'{"to":"Bob","message":1}', {"Content-Type": "text/plain"}, 415),
        (
            b'{"to":"Bob","message":"' + b"x" * 2000 + b'"}',
            {"Content-Type": "application/json"},
            413,
        ),
    ],
)
async def test_bad_requests_get_problem_details(
    body: bytes, headers: dict[str, str], status: int
) -> None:
    async with serving(max_message_bytes=1024) as client:
        response = await client.post("/send", data=body, headers=headers)
        assert response.status_code == status
        assert response.content_type == PROBLEM
        problem = await response.get_json()
        assert problem["status"] == status and problem["title"] and problem["detail"]


async def test_missing_credentials_are_401_problem() -> None:
    async with serving(secret=SECRET) as client:
        response = await post(client, {"to": "Bob", "message": 1})
        assert response.status_code == 401
        assert response.content_type == PROBLEM
        assert response.headers["WWW-Authenticate"] == "Bearer"


def _unsigned_token(user: str) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 60}, key=None, algorithm="none")


@pytest.mark.parametrize(
    "token",
    [
        _unsigned_token("Bob"),
        jwt.encode({"sub": "Bob", "exp": int(time.time()) + 60}, SECRET, algorithm="HS512"),
        jwt.encode({"sub": "Bob", "exp": int(time.time()) - 10}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "Bob"}, SECRET, algorithm="HS256"),  # no exp
        jwt.encode(
            {"sub": "Bob", "exp": int(time.time()) + 60}, "other-" + SECRET, algorithm="HS256"
        ),
        mint_token(SECRET, "Bob")[:-4] + "AAAA",
    ],
    ids=["alg-none", "hs512", "expired", "no-exp", "wrong-key", "tampered"],
)
async def test_bad_tokens_are_refused_on_send_and_handshake(token: str) -> None:
    async with serving(secret=SECRET) as client:
        response = await post(
            client, {"to": "Bob", "message": 1}, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 401
        async with client.websocket(f"/events?token={token}") as socket:
            with pytest.raises(WebsocketResponseError) as refused:
                await socket.receive()
        assert refused.value.response.status_code == 401


async def test_sender_is_the_token_subject_not_the_body() -> None:
    async with serving(secret=SECRET) as client:
        async with client.websocket(f"/events?token={mint_token(SECRET, 'Bob')}") as bob:
            assert json.loads(await bob.receive())["user"] == "Bob"
            response = await post(
                client,
                {"to": "Bob", "message": 1, "from": "Mallory"},
                headers={"Authorization": f"Bearer {mint_token(SECRET, 'Anne')}"},
            )
            assert response.status_code == 202
            assert json.loads(await bob.receive())["from"] == "Anne"


async def test_dev_mode_handshake_without_user_is_401(client: QuartClient) -> None:
    async with client.websocket("/events") as socket:
        with pytest.raises(WebsocketResponseError) as refused:
            await socket.receive()
    assert refused.value.response.status_code == 401


@pytest.mark.parametrize("name", ["*", "#", "a/b", "", "x" * 129, "Jürgen"])
async def test_invalid_names_are_refused_at_handshake(client: QuartClient, name: str) -> None:
    async with client.websocket("/events", query_string={"user": name}) as socket:
        with pytest.raises(WebsocketResponseError) as refused:
            await socket.receive()
    assert refused.value.response.status_code in (400, 401)


async def test_websocket_send_is_acked_and_delivered(client: QuartClient) -> None:
    async with (
        client.websocket("/events?user=Bob") as bob,
        client.websocket("/events?user=Anne") as anne,
    ):
        await bob.receive()
        await anne.receive()
        await anne.send(json.dumps({"type": "send", "to": "Bob", "message": "hi", "ref": "r1"}))
        ack = json.loads(await anne.receive())
        assert ack["type"] == "ack" and ack["ref"] == "r1" and ack["status"] == "routed"
        message = json.loads(await bob.receive())
        assert (message["id"], message["from"], message["message"]) == (ack["id"], "Anne", "hi")


async def test_websocket_send_to_offline_user_is_an_error_frame(
    client: QuartClient,
) -> None:
    async with client.websocket("/events?user=Anne") as anne:
        await anne.receive()
        await anne.send(json.dumps({"type": "send", "to": "Carol", "message": 1, "ref": "x"}))
        assert json.loads(await anne.receive())["code"] == "offline"
        await anne.send(json.dumps({"type": "send", "to": "a*b", "message": 1, "ref": "y"}))
        error = json.loads(await anne.receive())
        assert (error["type"], error["code"], error["ref"]) == ("error", "invalid", "y")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", 1008),
        (json.dumps({"type": "subscribe"}), 1008),
        ("x" * 2000, 1009),
        ("é" * 600, 1009),
    ],
)
async def test_bad_frames_close_the_socket(frame: str, code: int) -> None:
    async with serving(max_message_bytes=1024) as client:
        async with client.websocket("/events?user=Anne") as anne:
            await anne.receive()
            await anne.send(frame)
            with pytest.raises(WebsocketDisconnectError) as closed:
                await anne.receive()
            assert closed.value.args[0] == code


async def test_slow_consumer_is_closed_with_4001_while_others_keep_receiving() -> None:
    async with (
        # Without sessions: with one, the backlog waits at the broker instead.
        serving(send_queue=4, resume_window=0) as client,
        client.websocket("/events?user=Sloth") as sloth,
        client.websocket("/events?user=Bob") as bob,
    ):
        await sloth.receive()
        await bob.receive()
        # The test connection buffers 10 frames, the server queue 4: 40 cannot all fit.
        for n in range(40):
            assert (await post(client, {"to": "Sloth", "message": n})).status_code == 202
            await post(client, {"to": "Bob", "message": n})
            assert json.loads(await bob.receive())["message"] == n
        received = []
        with pytest.raises(WebsocketDisconnectError) as closed:
            while True:
                received.append(json.loads(await sloth.receive())["message"])
        assert closed.value.args[0] == 4001
        assert received == list(range(len(received))) and len(received) < 40


async def test_readyz_and_healthz_answer_while_serving(client: QuartClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).status_code == 200


async def test_metrics_count_connections_and_publish_outcomes(
    client: QuartClient,
) -> None:
    async with client.websocket("/events?user=Bob") as bob:
        await bob.receive()
        await post(client, {"to": "Bob", "message": 1})
        await post(client, {"to": "Nobody", "message": 1})
        await bob.receive()
        text = await (await client.get("/metrics")).get_data(as_text=True)
    assert "triows_connections_open 1.0" in text
    assert 'triows_messages_published_total{kind="user",outcome="routed"} 1.0' in text
    assert 'triows_messages_published_total{kind="user",outcome="unrouted"} 1.0' in text
    assert 'triows_messages_delivered_total{kind="user"} 1.0' in text
    assert "triows_broker_ready 1.0" in text


async def test_expired_token_closes_the_socket_with_4401() -> None:
    async with serving(secret=SECRET) as client:
        async with client.websocket(f"/events?token={mint_token(SECRET, 'Bob', ttl=1)}") as bob:
            await bob.receive()
            with trio.fail_after(10), pytest.raises(WebsocketDisconnectError) as closed:
                await bob.receive()
        assert closed.value.args[0] == 4401


async def test_drain_turns_readyz_503_closes_sockets_with_1012_and_refuses_new_ones() -> None:
    app = create_app(Settings())
    async with app.test_app() as test_app:
        client = test_app.test_client()
        async with client.websocket("/events?user=Bob") as bob:
            await bob.receive()
            await app.drain()
            assert (await client.get("/readyz")).status_code == 503
            with pytest.raises(WebsocketDisconnectError) as closed:
                await bob.receive()
            assert closed.value.args[0] == 1012
        async with client.websocket("/events?user=Carol") as carol:
            with pytest.raises(WebsocketResponseError) as refused:
                await carol.receive()
            assert refused.value.response.status_code == 503


async def test_chat_page_is_served_at_the_root(client: QuartClient) -> None:
    response = await client.get("/")
    assert response.status_code == 200
    # The page speaks the protocol through the client module the app serves.
    assert 'src="/triows.js"' in await response.get_data(as_text=True)
    assert (await client.get("/triows.js")).status_code == 200


async def test_connections_over_the_instance_limit_are_refused_with_503() -> None:
    async with serving(max_connections=1) as client:
        async with client.websocket("/events?user=Bob") as bob:
            await bob.receive()
            async with client.websocket("/events?user=Anne") as anne:
                with pytest.raises(WebsocketResponseError) as refused:
                    await anne.receive()
                assert refused.value.response.status_code == 503
                assert refused.value.response.headers["Retry-After"]
