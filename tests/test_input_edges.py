"""Client JSON that must be refused with 400 / ``error invalid``, never a 500 or a lost socket.

Deep nesting, lone surrogates (in ``message`` and ``ref``), non-finite
numbers, huge numbers and repeated keys: each parses in Python, and each
would have broken something after (the encoder, a browser's JSON.parse, the
sender's writer).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import serving
from triows.protocol import (
    InvalidInput,
    InvalidSendFrame,
    SendRequest,
    encode_message,
    parse_client_frame,
    parse_send_body,
)

DEEP = "[" * 1000 + "]" * 1000
REFUSED_MESSAGES = {
    "deep": DEEP,
    "deep-objects": '{"a":' * 200 + "1" + "}" * 200,
    "lone-surrogate": '"\\ud800"',
    "lone-low-surrogate": '"x\\udfffy"',
    "surrogate-in-key": '{"\\ud800":1}',
    "nan": "NaN",
    "infinity": "Infinity",
    "minus-infinity": "[-Infinity]",
    "overflowing-float": "1e400",
    "long-float": "9" * 400 + ".5",
    "too-many-digits": "9" * 5000,
    "duplicate-keys": '{"a":1,"a":2}',
}


def send_body(message: str, extra: str = "") -> str:
    return '{"to":"Bob","message":' + message + extra + "}"


@pytest.mark.parametrize("message", REFUSED_MESSAGES.values(), ids=REFUSED_MESSAGES.keys())
def test_send_bodies_holding_refused_json_are_invalid_input(message: str) -> None:
    with pytest.raises(InvalidInput):
        parse_send_body(send_body(message).encode(), dev_mode=True)


@pytest.mark.parametrize("message", REFUSED_MESSAGES.values(), ids=REFUSED_MESSAGES.keys())
def test_frames_holding_refused_json_are_answered_with_their_ref(message: str) -> None:
    frame = '{"type":"send","ref":"r1","to":"Bob","message":' + message + "}"
    with pytest.raises(InvalidSendFrame) as raised:
        parse_client_frame(frame)
    # The ref is echoed when it was read before the JSON was refused.
    assert raised.value.ref in ("r1", None)


def test_a_repeated_top_level_key_is_refused() -> None:
    with pytest.raises(InvalidInput, match="repeats"):
        parse_send_body(b'{"to":"Bob","message":1,"to":"Eve"}', dev_mode=True)


def test_a_body_with_utf8_encoded_surrogates_is_not_json() -> None:
    # json.loads would decode these bytes with "surrogatepass".
    with pytest.raises(InvalidInput, match="UTF-8"):
        parse_send_body(b'{"to":"Bob","message":"\xed\xa0\x80"}', dev_mode=True)


def test_a_lone_surrogate_in_ref_is_an_error_without_the_ref() -> None:
    with pytest.raises(InvalidSendFrame) as raised:
        parse_client_frame('{"type":"send","ref":"\\ud800","to":"Bob","message":1}')
    assert raised.value.ref is None


@pytest.mark.parametrize(
    "message",
    ['"\\ud83d\\ude00 paired"', '"e123 1e300"', "1e308", "9" * 400, "[" * 63 + "]" * 63],
    ids=["paired-surrogates", "exponent-like-text", "big-finite", "big-int", "64-deep-with-body"],
)
def test_values_that_merely_look_suspicious_are_accepted(message: str) -> None:
    request, _ = parse_send_body(send_body(message).encode(), dev_mode=True)
    assert json.loads(encode_message("id", "Anne", request))["message"] == json.loads(message)


def test_encode_message_refuses_a_value_no_parser_produced() -> None:
    for value in (float("nan"), "\ud800", [float("inf")]):
        with pytest.raises(InvalidInput):
            encode_message("id", "Anne", SendRequest("Bob", value))


@pytest.mark.parametrize("message", REFUSED_MESSAGES.values(), ids=REFUSED_MESSAGES.keys())
async def test_send_gets_400_and_the_instance_keeps_serving(message: str) -> None:
    async with serving() as client:
        async with client.websocket("/events?user=Bob") as bob:
            await bob.receive()
            response = await client.post(
                "/send",
                data=send_body(message).encode(),
                headers={"Content-Type": "application/json"},
            )
            assert response.status_code == 400
            assert response.content_type == "application/problem+json"
            ok = await client.post("/send", json={"to": "Bob", "message": "still here"})
            assert ok.status_code == 202
            assert json.loads(await bob.receive())["message"] == "still here"


@pytest.mark.parametrize(
    "frame",
    [
        *(
            '{"type":"send","ref":"r","to":"Bob","message":' + m + "}"
            for m in REFUSED_MESSAGES.values()
        ),
        '{"type":"send","ref":"\\ud800","to":"Bob","message":1}',
    ],
    ids=[*REFUSED_MESSAGES.keys(), "surrogate-ref"],
)
async def test_a_refused_frame_gets_error_invalid_and_the_socket_stays_open(frame: str) -> None:
    async with serving() as client:
        async with client.websocket("/events?user=Anne") as anne:
            await anne.receive()
            await anne.send(frame)
            answer = json.loads(await anne.receive())
            assert (answer["type"], answer["code"]) == ("error", "invalid")
            await anne.send('{"type":"send","ref":"ok","to":"Anne","message":"still here"}')
            frames = [json.loads(await anne.receive()) for _ in range(2)]
            assert {f["type"] for f in frames} == {"ack", "message"}
