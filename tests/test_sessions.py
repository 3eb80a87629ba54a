"""Sessions (docs/protocol.md#sessions) on one instance, memory backend.

Across instances, drains and SIGKILL on real brokers: tests/test_session_resume.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from quart.typing import TestClientProtocol as QuartClient

from tests.conftest import close_normally, serving
from triows.auth import mint_token
from triows.backend import SessionDelivery
from triows.connection import Connection
from triows.metrics import Metrics
from triows.protocol import SendRequest, encode_message
from triows.router import Router
from triows.session import Resume, SessionLink, parse_resume, queue_name
from triows.settings import Settings

SECRET = "session-secret-" + "x" * 64


async def receive(socket: Any) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await socket.receive())
    return frame


async def send(client: QuartClient, to: str, message: object, **kwargs: Any) -> Any:
    response = await client.post("/send", json={"to": to, "message": message}, **kwargs)
    return response.status_code, await response.get_json()


async def test_message_frames_of_a_session_carry_seq_one_more_each(client: QuartClient) -> None:
    async with client.websocket("/events?user=Bob") as bob:
        assert (await receive(bob))["resumable"] is True
        for n in range(3):
            await send(client, "Bob", n)
        assert [(await receive(bob))["seq"] for _ in range(3)] == [1, 2, 3]


async def test_a_resume_gets_what_was_sent_while_away_first_in_order_then_live(
    client: QuartClient,
) -> None:
    async with client.websocket("/events?user=Bob") as bob:
        token = (await receive(bob))["session"]
        await send(client, "Bob", "before")
        seen = await receive(bob)
    # Gone without a close frame: the session waits, and sends to Bob are held.
    statuses = [await send(client, "Bob", n) for n in range(3)]
    assert [(status, body["status"]) for status, body in statuses] == [(202, "queued")] * 3
    cursor = f"{seen['seq']}-{seen['id']}"
    async with client.websocket(f"/events?user=Bob&session={token}&last={cursor}") as bob:
        hello = await receive(bob)
        assert (hello["session"], hello["resumed"], hello["missed"]) == (token, True, 3)
        missed = [await receive(bob) for _ in range(3)]
        assert [(frame["message"], frame["seq"]) for frame in missed] == [(0, 2), (1, 3), (2, 4)]
        assert (await send(client, "Bob", "live"))[1]["status"] == "routed"
        assert ((await receive(bob))["message"], "live") == ("live", "live")


async def test_an_unknown_token_gets_a_fresh_session_that_says_it_was_not_resumed(
    client: QuartClient,
) -> None:
    token = "A" * 22
    async with client.websocket(f"/events?user=Bob&session={token}&last=7") as bob:
        hello = await receive(bob)
        assert hello["resumed"] is False and hello["session"] != token
        await send(client, "Bob", "fresh")
        assert (await receive(bob))["seq"] == 1


async def test_another_users_token_never_resumes_their_session() -> None:
    anne, mallory = mint_token(SECRET, "Anne"), mint_token(SECRET, "Mallory")
    sender = {"Authorization": f"Bearer {mint_token(SECRET, 'Carol')}"}
    async with serving(secret=SECRET) as client:
        async with client.websocket(f"/events?token={anne}") as socket:
            token = (await receive(socket))["session"]
        assert (await send(client, "Anne", "for Anne only", headers=sender))[0] == 202
        async with client.websocket(f"/events?token={mallory}&session={token}") as socket:
            hello = await receive(socket)
            assert (hello["user"], hello["resumed"]) == ("Mallory", False)
            assert (await send(client, "Mallory", "own", headers=sender))[0] == 202
            assert (await receive(socket))["message"] == "own"  # not Anne's
        # Anne's session still holds hers.
        async with client.websocket(f"/events?token={anne}&session={token}") as socket:
            assert (await receive(socket))["resumed"] is True
            assert (await receive(socket))["message"] == "for Anne only"


async def test_a_normal_close_ends_the_session_at_once(client: QuartClient) -> None:
    async with client.websocket("/events?user=Bob") as bob:
        token = (await receive(bob))["session"]
        await close_normally(bob)
    assert (await send(client, "Bob", "after"))[0] == 404
    async with client.websocket(f"/events?user=Bob&session={token}") as bob:
        assert (await receive(bob))["resumed"] is False


async def test_a_session_unused_for_the_window_is_gone(autojump_clock: trio.abc.Clock) -> None:
    async with serving(resume_window=30) as client:
        async with client.websocket("/events?user=Bob") as bob:
            token = (await receive(bob))["session"]
        assert (await send(client, "Bob", "held"))[1]["status"] == "queued"
        await trio.sleep(31)
        async with client.websocket(f"/events?user=Bob&session={token}") as bob:
            assert (await receive(bob))["resumed"] is False
            await close_normally(bob)
        assert (await send(client, "Bob", "nobody"))[0] == 404


async def test_a_resumed_session_is_in_its_rooms_again_and_got_their_messages(
    client: QuartClient,
) -> None:
    async with client.websocket("/events?user=Bob") as bob:
        token = (await receive(bob))["session"]
        await bob.send(json.dumps({"type": "join", "room": "general"}))
        assert (await receive(bob))["type"] == "joined"
    room = await client.post("/send", json={"room": "general", "message": "while away"})
    assert room.status_code == 202
    async with client.websocket(f"/events?user=Bob&session={token}") as bob:
        assert (await receive(bob))["missed"] == 1
        assert (await receive(bob))["message"] == "while away"
        await client.post("/send", json={"room": "general", "message": "live"})
        assert (await receive(bob))["message"] == "live"
        await bob.send(json.dumps({"type": "leave", "room": "general"}))
        assert (await receive(bob))["type"] == "left"
        await close_normally(bob)
    refused = await client.post("/send", json={"room": "general", "message": "nobody"})
    assert refused.status_code == 404


async def test_a_full_session_refuses_further_messages_to_its_user() -> None:
    async with serving(session_max_messages=2) as client:
        async with client.websocket("/events?user=Bob") as bob:
            await receive(bob)
        assert [(await send(client, "Bob", n))[0] for n in range(2)] == [202, 202]
        status, problem = await send(client, "Bob", "one too many")
        assert status == 503 and problem["type"].endswith("/recipient-full")


async def test_a_slow_reader_in_a_session_holds_no_more_than_its_prefetch_here() -> None:
    # With a session the backlog waits in the session's queue, not in the
    # connection's: nothing overflows, nobody is closed, everything arrives.
    async with serving(send_queue=4) as client, client.websocket("/events?user=Sloth") as sloth:
        await receive(sloth)
        for n in range(40):
            assert (await send(client, "Sloth", n))[0] == 202
        assert [(await receive(sloth))["message"] for _ in range(40)] == list(range(40))


@pytest.mark.parametrize(
    "query",
    [
        "session=short",
        "session=" + "A" * 22 + "&last=x",
        "last=3",
        "session=" + "A" * 22 + "&last=3-Z",
    ],
)
async def test_a_malformed_session_or_cursor_is_refused_400(
    client: QuartClient, query: str
) -> None:
    response = await client.get(
        f"/events?user=Bob&{query}", headers={"Accept": "text/event-stream"}
    )
    assert response.status_code == 400


async def test_opening_sessions_is_paced_per_user_like_joins() -> None:
    async with serving(send_rate=1, send_burst=2) as client:
        for _ in range(2):
            async with client.websocket("/events?user=Bob") as bob:
                await receive(bob)
        response = await client.get("/events?user=Bob", headers={"Accept": "text/event-stream"})
        assert response.status_code == 429 and "retry-after" in response.headers


def test_the_queue_of_a_token_depends_on_the_user() -> None:
    token = "A" * 22
    assert queue_name("triows", "Anne", token) != queue_name("triows", "Mallory", token)
    assert parse_resume(token, "12-" + "a" * 32) == Resume(token, 12, "a" * 32)


class _Queue:
    """A session queue that only records acks (SessionLink's side is under test)."""

    def __init__(self, waiting: int) -> None:
        self.waiting = waiting
        self.acked: list[int] = []

    def ack(self, tag: int) -> None:
        self.acked.append(tag)


def _delivery(tag: int, message_id: str, *, redelivered: bool) -> SessionDelivery:
    body = encode_message(message_id, "Anne", SendRequest("Bob", tag))
    return SessionDelivery("user.Bob", body, tag, redelivered)


async def test_a_resume_skips_what_the_client_saw_before_its_instance_could_ack_it() -> None:
    # A killed instance wrote 1 and 2 but acked neither: the broker gives back
    # 1, 2 and 3. The client saw 2 (its seq 8): only 3 is written, as seq 9.
    router = Router(_NoBackend(), Metrics(), Settings())
    connection = Connection("Bob", 16)
    link = SessionLink(connection, router, "A" * 22, Resume("A" * 22, 8, "b" * 32))
    queue = _Queue(waiting=3)
    link.attach(queue)  # type: ignore[arg-type]
    for tag, message_id in ((1, "a" * 32), (2, "b" * 32), (3, "c" * 32)):
        link.deliver(_delivery(tag, message_id, redelivered=True))
    link.settle()
    link.start()
    assert queue.acked == [1, 2] and link.missed == 1
    frame = json.loads(connection._queue[0][0])  # type: ignore[index]
    assert (frame["id"], frame["seq"]) == ("c" * 32, 9)


class _NoBackend:
    sessions = None
