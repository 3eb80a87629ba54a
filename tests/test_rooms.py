"""Rooms (docs/protocol.md): parsing, the ``rooms`` claim, the router's per-key edges, one instance.

Across instances and brokers: tests/test_across_instances.py.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jwt
import pytest
import trio
from quart.typing import TestClientProtocol as QuartClient

from tests.conftest import close_normally, serving
from tests.test_router_delivery import RecordingBackend as DeliveringBackend
from tests.test_router_unit import RecordingBackend, SubscribeFailed
from tests.test_server_process import run_cli
from triows.auth import AuthError, Identity, mint_token, verify_token
from triows.backend import BrokerUnavailable
from triows.connection import Connection
from triows.metrics import Metrics
from triows.protocol import (
    InvalidInput,
    InvalidSendFrame,
    ProtocolViolation,
    RoomRequest,
    SendRequest,
    encode_message,
    parse_client_frame,
    parse_send_batch,
    parse_send_body,
)
from triows.router import InvalidDelivery, Router, TooManyRooms, check_delivery
from triows.settings import Settings

SECRET = "room-secret-" + "x" * 64
PROBLEM = "application/problem+json"


# -- parsing ---------------------------------------------------------------------


def test_a_send_takes_a_room_instead_of_a_user() -> None:
    request = parse_client_frame('{"type":"send","room":"general","message":1,"ref":"r"}')
    assert request == SendRequest(None, 1, "r", room="general")
    assert isinstance(request, SendRequest) and request.key == "room.general"
    body, _ = parse_send_body(b'{"room":"general","message":1}', dev_mode=True)
    assert body.key == "room.general" and body.to is None


@pytest.mark.parametrize(
    "fields",
    ['"to":"Bob","room":"general"', "", '"to":null,"room":null'],
    ids=["both", "neither", "both-null"],
)
def test_a_send_with_both_or_neither_of_to_and_room_is_invalid(fields: str) -> None:
    sep = "," if fields else ""
    with pytest.raises(InvalidSendFrame) as refused:
        parse_client_frame(f'{{"type":"send",{fields}{sep}"message":1,"ref":"r"}}')
    assert refused.value.ref == "r"
    with pytest.raises(InvalidInput, match="exactly one"):
        parse_send_body(f'{{{fields}{sep}"message":1}}'.encode(), dev_mode=True)


def test_join_and_leave_frames_parse() -> None:
    assert parse_client_frame('{"type":"join","room":"general","ref":"1"}') == RoomRequest(
        "join", "general", "1"
    )
    assert parse_client_frame('{"type":"leave","room":"team-a"}') == RoomRequest(
        "leave", "team-a", None
    )


@pytest.mark.parametrize("room", ['"a/b"', '"#"', '"a*"', '""', "1", "null", '"' + "r" * 129 + '"'])
def test_a_room_name_follows_the_user_name_rules(room: str) -> None:
    with pytest.raises(InvalidSendFrame, match="'room'") as refused:
        parse_client_frame(f'{{"type":"join","room":{room},"ref":"j"}}')
    assert refused.value.ref == "j"
    if room != "null":
        with pytest.raises(InvalidInput, match="'room'"):
            parse_send_body(f'{{"room":{room},"message":1}}'.encode(), dev_mode=True)


def test_an_unknown_frame_type_is_still_a_protocol_violation() -> None:
    with pytest.raises(ProtocolViolation):
        parse_client_frame('{"type":"subscribe","room":"general"}')


def test_a_room_message_frame_names_the_room_and_has_no_recipient() -> None:
    frame = json.loads(encode_message("id1", "Anne", SendRequest(None, "hi", room="general")))
    assert (frame["room"], frame["to"], frame["from"]) == ("general", None, "Anne")
    user_frame = json.loads(encode_message("id2", "Anne", SendRequest("Bob", "hi")))
    assert "room" not in user_frame


def test_a_batch_may_mix_users_and_rooms() -> None:
    batch = parse_send_batch(
        b'[{"to":"Bob","message":1},{"room":"general","message":2},{"room":"a/b","message":3}]',
        dev_mode=True,
        max_items=10,
    )
    assert batch is not None
    first, second, third = batch
    assert not isinstance(first, InvalidInput) and first[0].key == "user.Bob"
    assert not isinstance(second, InvalidInput) and second[0].key == "room.general"
    assert isinstance(third, InvalidInput)


# -- the rooms claim ---------------------------------------------------------------


def test_the_rooms_claim_allows_names_and_prefixes() -> None:
    identity = verify_token(SECRET, mint_token(SECRET, "Anne", rooms=("general", "team-*")))
    assert identity.rooms == ("general", "team-*")
    assert identity.may_use_room("general")
    assert identity.may_use_room("team-a") and identity.may_use_room("team-")
    assert not identity.may_use_room("general2")
    assert not identity.may_use_room("team")
    assert not identity.may_use_room("random")


def test_a_token_without_the_claim_allows_no_room_and_dev_mode_allows_all() -> None:
    assert not verify_token(SECRET, mint_token(SECRET, "Anne")).may_use_room("general")
    assert verify_token(SECRET, mint_token(SECRET, "Anne", rooms=("*",))).may_use_room("x")
    assert Identity("Anne").may_use_room("anything")


@pytest.mark.parametrize(
    "rooms", ["general", ["a/b"], ["team*x"], [1], [None], ["**"], ["x"] * 257]
)
def test_a_malformed_rooms_claim_is_refused(rooms: Any) -> None:
    now = int(time.time())
    claims = {"sub": "Anne", "exp": now + 60, "rooms": rooms}
    with pytest.raises(AuthError, match="rooms"):
        verify_token(SECRET, jwt.encode(claims, SECRET, "HS256"))


def test_token_command_puts_rooms_in_the_claim() -> None:
    env = {**os.environ, "TRIOWS_SECRET": SECRET}
    result = run_cli("token", "Anne", "--room", "general", "--room", "team-*", env=env)
    assert result.returncode == 0, result.stderr
    assert verify_token(SECRET, result.stdout.strip()).rooms == ("general", "team-*")
    refused = run_cli("token", "Anne", "--room", "a/b", env=env)
    assert refused.returncode == 2 and "room name" in refused.stderr


# -- router: rooms share the users' edges ------------------------------------------


def member(user: str) -> Connection:
    return Connection(user, queue_size=8)


def queued(connection: Connection) -> list[dict[str, Any]]:
    frames = [json.loads(frame) for frame in connection._queue]
    connection._queue.clear()
    return frames


def room_frame(room: str = "general", message: object = "hi") -> bytes:
    return encode_message("0123456789abcdef", "Anne", SendRequest(None, message, room=room))


async def test_a_room_is_subscribed_on_its_first_member_and_unsubscribed_on_its_last() -> None:
    backend = RecordingBackend()
    router = Router(backend, Metrics(), Settings())
    anne, bob = member("Anne"), member("Bob")
    async with router.attached(anne), router.attached(bob):
        backend.calls.clear()
        await router.join(anne, "general")
        assert backend.calls == [("subscribe", "room.general")]
        assert "room.general" in backend.held
        await router.join(bob, "general")
        await router.join(bob, "general")  # already in: nothing
        assert backend.calls == [("subscribe", "room.general")]
        await router.leave(anne, "general")
        assert backend.calls == [("subscribe", "room.general")]
        await router.leave(bob, "general")
        await router.leave(bob, "general")  # not in: nothing
        assert backend.calls == [("subscribe", "room.general"), ("unsubscribe", "room.general")]
        assert router.rooms_of(bob) == frozenset()


async def test_a_room_and_a_user_of_the_same_name_are_different_keys() -> None:
    backend = RecordingBackend()
    router = Router(backend, Metrics(), Settings())
    general = member("general")
    async with router.attached(general):
        await router.join(general, "general")
        assert {"user.general", "room.general"} <= backend.held
        await router.leave(general, "general")
        assert "user.general" in backend.held and "room.general" not in backend.held


async def test_detaching_leaves_every_room_of_the_connection() -> None:
    backend = RecordingBackend()
    router = Router(backend, Metrics(), Settings())
    anne, bob = member("Anne"), member("Bob")
    async with router.attached(bob):
        async with router.attached(anne):
            await router.join(anne, "general")
            await router.join(anne, "random")
            await router.join(bob, "general")
        assert backend.held == {"user.Bob", "room.general"}
        router.deliver("room.general", room_frame())
        assert [frame["room"] for frame in queued(bob)] == ["general"]
    assert backend.held == set()
    assert router.idle.is_set()


async def test_leaving_stops_delivery_at_once_and_the_other_members_still_get_it() -> None:
    router = Router(RecordingBackend(), Metrics(), Settings())
    phone, laptop, anne = member("Bob"), member("Bob"), member("Anne")
    async with router.attached(phone), router.attached(laptop), router.attached(anne):
        for connection in (phone, laptop, anne):
            await router.join(connection, "general")
        router.deliver("room.general", room_frame(message=1))
        assert [[f["message"] for f in queued(c)] for c in (phone, laptop, anne)] == [[1]] * 3
        await router.leave(anne, "general")
        router.deliver("room.general", room_frame(message=2))
        assert [[f["message"] for f in queued(c)] for c in (phone, laptop, anne)] == [
            [2],
            [2],
            [],
        ]


async def test_a_connection_joins_at_most_max_rooms() -> None:
    backend = RecordingBackend()
    router = Router(backend, Metrics(), Settings(max_rooms=2))
    anne = member("Anne")
    async with router.attached(anne):
        await router.join(anne, "a")
        await router.join(anne, "b")
        await router.join(anne, "b")  # already in: not a third
        with pytest.raises(TooManyRooms):
            await router.join(anne, "c")
        assert "room.c" not in backend.held
        await router.leave(anne, "a")
        await router.join(anne, "c")
        assert router.rooms_of(anne) == {"b", "c"}


async def test_a_failed_room_subscribe_leaves_no_membership() -> None:
    backend = RecordingBackend()
    router = Router(backend, Metrics(), Settings())
    anne = member("Anne")
    async with router.attached(anne):
        backend.fail_subscribes = 1
        with pytest.raises(SubscribeFailed):
            await router.join(anne, "general")
        assert router.rooms_of(anne) == frozenset()
        await router.join(anne, "general")
        assert "room.general" in backend.held


async def test_a_join_cancelled_midway_still_settles_the_subscription(
    autojump_clock: trio.testing.MockClock,
) -> None:
    backend = RecordingBackend(delay=1.0)
    router = Router(backend, Metrics(), Settings())
    anne = member("Anne")
    async with router.attached(anne):
        with trio.move_on_after(0.001):
            await router.join(anne, "general")
        assert router.rooms_of(anne) == {"general"}
        assert "room.general" in backend.held
    assert backend.held == set()


async def test_join_needs_an_attached_connection_and_refuses_while_draining() -> None:
    router = Router(RecordingBackend(), Metrics(), Settings())
    with pytest.raises(ValueError, match="attached"):
        await router.join(member("Anne"), "general")
    anne = member("Anne")
    async with router.attached(anne):
        router.released = True
        with pytest.raises(BrokerUnavailable):
            await router.join(anne, "general")


def test_a_delivery_on_a_room_key_must_be_a_frame_of_that_room() -> None:
    check_delivery("room.general", room_frame().decode())
    user_frame = encode_message("0123456789abcdef", "Anne", SendRequest("general", 1)).decode()
    with pytest.raises(InvalidDelivery):
        check_delivery("room.general", user_frame)  # a user's frame on a room key
    with pytest.raises(InvalidDelivery):
        check_delivery("user.general", room_frame().decode())  # a room's frame on a user key
    with pytest.raises(InvalidDelivery):
        check_delivery("room.general", room_frame("random").decode())
    with_recipient = json.loads(room_frame()) | {"to": "Bob"}
    with pytest.raises(InvalidDelivery):
        check_delivery("room.general", json.dumps(with_recipient))


async def test_metrics_count_published_and_delivered_by_kind() -> None:
    metrics = Metrics()
    router = Router(RecordingBackend(), metrics, Settings())
    anne = member("Anne")
    async with router.attached(anne):
        await router.join(anne, "general")
        await router.send("Anne", SendRequest(None, 1, room="general"))
        await router.send("Anne", SendRequest("Nobody", 1))
        router.deliver("room.general", room_frame())
    sample = metrics.registry.get_sample_value
    published = "triows_messages_published_total"
    assert sample(published, {"outcome": "routed", "kind": "room"}) == 1
    assert sample(published, {"outcome": "unrouted", "kind": "user"}) == 1
    assert sample("triows_messages_delivered_total", {"kind": "room"}) == 1
    assert sample("triows_messages_delivered_total", {"kind": "user"}) == 0


# -- one instance, through the app -------------------------------------------------


async def receive(socket: Any) -> dict[str, Any]:
    with trio.fail_after(10):
        frame: dict[str, Any] = json.loads(await socket.receive())
    return frame


async def test_members_and_the_sender_get_a_room_message_and_others_do_not(
    client: QuartClient,
) -> None:
    async with (
        client.websocket("/events?user=Anne") as anne,
        client.websocket("/events?user=Bob") as bob,
        client.websocket("/events?user=Carol") as carol,
    ):
        for socket in (anne, bob, carol):
            await receive(socket)  # hello
        for socket in (anne, bob):
            await socket.send(json.dumps({"type": "join", "room": "general", "ref": "j"}))
            assert await receive(socket) == {"type": "joined", "ref": "j", "room": "general"}
        await anne.send(json.dumps({"type": "send", "room": "general", "message": 1, "ref": "s"}))
        frames = [await receive(anne), await receive(anne)]
        ack = next(frame for frame in frames if frame["type"] == "ack")
        mine = next(frame for frame in frames if frame["type"] == "message")
        assert ack["status"] == "routed" and mine["id"] == ack["id"]
        theirs = await receive(bob)
        assert (theirs["from"], theirs["room"], theirs["to"], theirs["message"]) == (
            "Anne",
            "general",
            None,
            1,
        )
        # Carol is in no room: the next frame she gets is her own direct message.
        response = await client.post("/send", json={"to": "Carol", "message": "direct"})
        assert response.status_code == 202
        assert (await receive(carol))["message"] == "direct"


async def test_post_send_to_a_room_is_404_without_members_and_routed_with_one(
    client: QuartClient,
) -> None:
    response = await client.post("/send", json={"room": "general", "message": 1})
    assert response.status_code == 404 and response.content_type == PROBLEM
    assert "room general" in (await response.get_json())["detail"]
    async with client.websocket("/events?user=Bob") as bob:
        await receive(bob)
        await bob.send(json.dumps({"type": "join", "room": "general"}))
        assert (await receive(bob))["type"] == "joined"
        response = await client.post(
            "/send",
            json=[{"room": "general", "message": 1, "from": "Anne"}, {"room": "x", "message": 2}],
        )
        assert response.status_code == 207
        first, second = await response.get_json()
        assert first["status"] == "routed" and second["status"] == 404
        frame = await receive(bob)
        assert (frame["id"], frame["from"], frame["room"]) == (first["id"], "Anne", "general")
        await bob.send(json.dumps({"type": "leave", "room": "general", "ref": "l"}))
        assert await receive(bob) == {"type": "left", "ref": "l", "room": "general"}
        # Leaving waited for the unsubscribe: nobody is in the room any more.
        response = await client.post("/send", json={"room": "general", "message": 2})
        assert response.status_code == 404


async def test_a_closed_socket_leaves_its_rooms(client: QuartClient) -> None:
    async with client.websocket("/events?user=Bob") as bob:
        await receive(bob)
        await bob.send(json.dumps({"type": "join", "room": "general"}))
        assert (await receive(bob))["type"] == "joined"
        assert (
            await client.post("/send", json={"room": "general", "message": 1})
        ).status_code == 202
        await close_normally(bob)  # else its session holds the room for a resume
    assert (await client.post("/send", json={"room": "general", "message": 2})).status_code == 404


async def test_too_many_rooms_is_an_error_frame_and_the_socket_stays_open() -> None:
    async with serving(max_rooms=1) as client, client.websocket("/events?user=Bob") as bob:
        await receive(bob)
        await bob.send(json.dumps({"type": "join", "room": "a", "ref": "1"}))
        assert (await receive(bob))["type"] == "joined"
        await bob.send(json.dumps({"type": "join", "room": "b", "ref": "2"}))
        error = await receive(bob)
        assert (error["type"], error["code"], error["ref"]) == ("error", "too_many_rooms", "2")
        await bob.send(json.dumps({"type": "join", "room": "a/b", "ref": "3"}))
        assert (await receive(bob))["code"] == "invalid"
        await bob.send(
            json.dumps({"type": "send", "to": "Bob", "room": "a", "message": 1, "ref": "4"})
        )
        assert (await receive(bob))["code"] == "invalid"
        await bob.send(json.dumps({"type": "send", "room": "a", "message": 1, "ref": "5"}))
        kinds = {(await receive(bob))["type"], (await receive(bob))["type"]}
        assert kinds == {"ack", "message"}


async def test_the_token_decides_which_rooms_a_user_may_join_and_send_to() -> None:
    allowed = mint_token(SECRET, "Anne", rooms=("team-*",))
    async with serving(secret=SECRET) as client:
        async with client.websocket(f"/events?token={allowed}") as anne:
            await receive(anne)
            for room, answer in (("team-a", "joined"), ("general", "error")):
                await anne.send(json.dumps({"type": "join", "room": room, "ref": room}))
                frame = await receive(anne)
                assert frame["type"] == answer, frame
            assert frame["code"] == "forbidden"
            await anne.send(json.dumps({"type": "send", "room": "general", "message": 1}))
            assert (await receive(anne))["code"] == "forbidden"
            # Sending needs the claim, not membership.
            await anne.send(json.dumps({"type": "send", "room": "team-b", "message": 1}))
            refused = await receive(anne)
            assert (refused["type"], refused["code"]) == ("error", "offline")
            await close_normally(anne)

        no_rooms = mint_token(SECRET, "Bob")
        headers = {"Authorization": f"Bearer {no_rooms}"}
        response = await client.post(
            "/send", json={"room": "team-a", "message": 1}, headers=headers
        )
        assert response.status_code == 403 and response.content_type == PROBLEM
        assert (await response.get_json())["type"].endswith("/forbidden")
        response = await client.post(
            "/send", json=[{"room": "team-a", "message": 1}], headers=headers
        )
        assert (await response.get_json())[0]["status"] == 403
        headers = {"Authorization": f"Bearer {allowed}"}
        response = await client.post(
            "/send", json={"room": "team-a", "message": 1}, headers=headers
        )
        assert response.status_code == 404  # allowed, but nobody is in it


async def test_joins_count_against_the_frame_rate_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with serving(send_rate=1.0, send_burst=1) as client:
        async with client.websocket("/events?user=Bob") as bob:
            await receive(bob)
            started = trio.current_time()
            for n in range(4):
                await bob.send(json.dumps({"type": "join", "room": f"r{n % 2}", "ref": str(n)}))
                assert (await receive(bob))["type"] == "joined"
            # One frame a second after the burst of one: 3 waited for their token.
            assert trio.current_time() - started >= 3


async def test_release_all_unsubscribes_rooms_too_and_flushes_their_messages() -> None:
    backend = DeliveringBackend()
    router = Router(backend, Metrics(), Settings())
    bob = Connection("Bob", 64)
    async with trio.open_nursery() as nursery, router.attached(bob):
        await router.join(bob, "general")
        for n in range(3):
            await backend.publish("room.general", room_frame(message=n))
        nursery.start_soon(router.run)
        await router.release_all(timeout=5)
        assert backend.keys == set()
        assert [frame["message"] for frame in queued(bob)] == [0, 1, 2]
        nursery.cancel_scope.cancel()
