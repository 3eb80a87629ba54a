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


# JSON text that Python's json module parses but that must be refused:
# nesting deeper than the protocol allows (up to far past the recursion
# limit), lone surrogate escapes, non-finite and overflowing numbers, numbers
# with more digits than int() takes, repeated keys.
SURROGATE_ESCAPES = st.integers(0xD800, 0xDFFF).map(lambda code: f'"a\\u{code:04x}b"')
REFUSED_JSON = st.one_of(
    st.integers(66, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(66, 300).map(lambda n: '{"k":' * n + "0" + "}" * n),
    SURROGATE_ESCAPES,
    SURROGATE_ESCAPES.map(lambda text: "{" + text + ":1}"),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1E+999", "[1,NaN]"]),
    st.integers(4301, 6000).map(lambda n: "9" * n),
    st.text(min_size=1, max_size=5).map(
        lambda k: "{" + f"{json.dumps(k)}:1,{json.dumps(k)}:2" + "}"
    ),
)


def embed(message: str, refused: str, where: int) -> str:
    """``message`` (JSON text) with ``refused`` put somewhere inside or instead of it."""
    if where == 0:
        return refused
    if where == 1:
        return f"[{message},{refused}]"
    return '{"ok":' + message + ',"bad":' + refused + "}"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    message=JSON_VALUES.map(json.dumps),
    refused=REFUSED_JSON,
    where=st.integers(0, 2),
)
async def test_refused_json_in_a_send_body_is_400_and_the_instance_keeps_serving(
    message: str, refused: str, where: int
) -> None:
    body = '{"to":"Bob","message":' + embed(message, refused, where) + "}"
    async with serving(max_message_bytes=65536) as client:
        response = await client.post(
            "/send", data=body.encode(), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, await response.get_data()
        assert response.content_type == "application/problem+json"
        assert (await client.get("/readyz")).status_code == 200


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    message=JSON_VALUES.map(json.dumps),
    refused=REFUSED_JSON,
    where=st.integers(0, 2),
    ref_is_refused=st.booleans(),
)
async def test_refused_json_in_a_frame_is_error_invalid_and_the_socket_stays_open(
    message: str, refused: str, where: int, ref_is_refused: bool
) -> None:
    if ref_is_refused:
        frame = '{"type":"send","to":"Anne","message":' + message + ',"ref":"\\udc00"}'
    else:
        frame = '{"type":"send","to":"Anne","ref":"r","message":'
        frame += embed(message, refused, where) + "}"
    async with serving(max_message_bytes=65536) as client:
        async with client.websocket("/events?user=Anne") as anne:
            await anne.receive()
            await anne.send(frame)
            answer = json.loads(await anne.receive())
            assert (answer["type"], answer["code"]) == ("error", "invalid"), answer
            # The socket still works: a good send is acked and delivered.
            await anne.send('{"type":"send","to":"Anne","ref":"ok","message":1}')
            frames = [json.loads(await anne.receive()) for _ in range(2)]
            assert {frame["type"] for frame in frames} == {"ack", "message"}
        assert (await client.get("/readyz")).status_code == 200
