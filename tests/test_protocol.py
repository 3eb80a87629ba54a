"""The wire protocol's validation and encoding, as pure functions."""

import json

import pytest

from triows.protocol import (
    InvalidInput,
    InvalidSendFrame,
    ProtocolViolation,
    SendRequest,
    check_user_name,
    encode_message,
    parse_client_frame,
    parse_send_body,
)

INVALID_NAMES = ["*", "#", "a/b", "", "x" * 129, "Jürgen", "a b", "user.*", "a>b", None, 7]


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_user_names_are_refused(name: object) -> None:
    with pytest.raises(InvalidInput):
        check_user_name(name)


@pytest.mark.parametrize("name", ["Bob", "a", "x" * 128, "anne.smith@example.com", "a_b-c.d"])
def test_valid_user_names_are_accepted(name: str) -> None:
    assert check_user_name(name) == name


def test_send_body_from_is_ignored_outside_dev_mode() -> None:
    request, sender = parse_send_body(b'{"to":"Bob","message":1,"from":"Mallory"}', dev_mode=False)
    assert request == SendRequest("Bob", 1) and sender is None


def test_send_body_without_message_is_invalid() -> None:
    with pytest.raises(InvalidInput, match="'message' is required"):
        parse_send_body(b'{"to":"Bob"}', dev_mode=True)


@pytest.mark.parametrize("raw", ["not json", "[1]", '{"type":"hello"}', '{"type":"send","ref":3}'])
def test_non_protocol_frames_are_violations(raw: str) -> None:
    with pytest.raises(ProtocolViolation):
        parse_client_frame(raw)


def test_send_frame_with_bad_recipient_keeps_its_ref() -> None:
    with pytest.raises(InvalidSendFrame) as caught:
        parse_client_frame('{"type":"send","to":"a/b","message":1,"ref":"r1"}')
    assert caught.value.ref == "r1"


def test_encoded_message_frame_has_every_field() -> None:
    frame = json.loads(encode_message("id1", "Anne", SendRequest("Bob", {"x": [1, "é"]})))
    assert frame.pop("ts") > 0
    assert frame == {
        "type": "message",
        "id": "id1",
        "from": "Anne",
        "to": "Bob",
        "message": {"x": [1, "é"]},
    }
