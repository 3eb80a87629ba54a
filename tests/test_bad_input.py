"""Bad input of any kind gets a clear 4xx or close code, never a 5xx or a dead instance."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart.testing.connections import WebsocketDisconnectError

from tests.conftest import serving

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)
BODIES = st.binary(max_size=300) | JSON_VALUES.map(lambda value: json.dumps(value).encode())
SEND_LIKE = st.fixed_dictionaries(
    {"to": st.text(max_size=20) | JSON_VALUES, "message": JSON_VALUES},
    optional={"from": st.text(max_size=10), "ref": st.text(max_size=5) | JSON_VALUES},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies=st.lists(BODIES | SEND_LIKE.map(lambda v: json.dumps(v).encode()), max_size=8))
async def test_any_send_body_gets_a_problem_or_an_answer_and_the_instance_keeps_serving(
    bodies: list[bytes],
) -> None:
    async with serving(max_message_bytes=256) as client:
        for body in bodies:
            response = await client.post(
                "/send", data=body, headers={"Content-Type": "application/json"}
            )
            assert response.status_code in (202, 207, 400, 404, 413)  # 207: a batch (array)
            if response.status_code >= 400:
                assert response.content_type == "application/problem+json"
        assert (await client.get("/readyz")).status_code == 200


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=st.text(max_size=300) | SEND_LIKE.map(lambda v: json.dumps({"type": "send", **v})))
async def test_any_client_frame_gets_an_answer_or_a_close_code(frame: str) -> None:
    async with serving(max_message_bytes=256) as client:
        async with client.websocket("/events?user=Anne") as anne:
            await anne.receive()
            await anne.send(frame)
            try:
                answer = json.loads(await anne.receive())
            except WebsocketDisconnectError as closed:
                assert closed.args[0] in (1008, 1009)
            else:
                assert answer["type"] in ("ack", "error")
        assert (await client.get("/readyz")).status_code == 200
