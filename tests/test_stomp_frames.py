"""The STOMP 1.2 frame codec, synchronously, without sockets."""

from __future__ import annotations

import pytest

from triows.backends.stomp_frames import (
    Frame,
    FrameParser,
    StompProtocolError,
    encode_frame,
    escape_header,
    unescape_header,
)

MESSAGE = Frame(
    "MESSAGE",
    {
        "subscription": "s1",
        "message-id": "m:1",
        "destination": "/topic/triows.user.bob",
        "content-length": "33",
    },
    b'{"type":"message","message":"hi"}',
)


def test_encode_adds_content_length_and_escapes_headers() -> None:
    data = encode_frame(Frame("SEND", {"destination": "/a:b", "note": "x\ny\\z"}, b"hi"))

    assert data == b"SEND\ndestination:/a\\cb\nnote:x\\ny\\\\z\ncontent-length:2\n\nhi\0"


def test_connect_headers_are_not_escaped() -> None:
    data = encode_frame(Frame("CONNECT", {"accept-version": "1.2", "passcode": "a\\b"}))

    assert data == b"CONNECT\naccept-version:1.2\npasscode:a\\b\n\n\0"
    assert FrameParser().feed(b"CONNECTED\nserver:x\\c\n\n\0") == [
        Frame("CONNECTED", {"server": "x\\c"})
    ]


def test_frame_round_trips_through_encode_and_parse() -> None:
    assert FrameParser().feed(encode_frame(MESSAGE)) == [MESSAGE]


def test_frame_split_at_every_byte_boundary_is_parsed_once() -> None:
    data = encode_frame(MESSAGE) + b"\n" + encode_frame(Frame("RECEIPT", {"receipt-id": "7"}))
    for cut in range(len(data) + 1):
        parser = FrameParser()
        frames = parser.feed(data[:cut]) + parser.feed(data[cut:])
        assert frames == [MESSAGE, Frame("RECEIPT", {"receipt-id": "7"})], cut


def test_frame_fed_one_byte_at_a_time_is_parsed() -> None:
    parser = FrameParser()
    frames = [frame for byte in encode_frame(MESSAGE) for frame in parser.feed(bytes([byte]))]

    assert frames == [MESSAGE]


def test_several_frames_in_one_read_come_out_in_order() -> None:
    sent = [Frame("RECEIPT", {"receipt-id": str(n)}) for n in range(50)]

    assert FrameParser().feed(b"".join(encode_frame(frame) for frame in sent)) == sent


def test_heart_beats_between_frames_are_skipped() -> None:
    data = b"\n\r\n\n" + encode_frame(MESSAGE) + b"\n\n\r\n" + encode_frame(MESSAGE) + b"\n"
    parser = FrameParser()

    assert parser.feed(data) == [MESSAGE, MESSAGE]
    assert parser.feed(b"\r") == []
    assert parser.feed(b"\n") == []


def test_header_escapes_are_decoded() -> None:
    data = b"MESSAGE\nkey\\cname:a\\cb\\nc\\rd\\\\e\n\n\0"

    assert FrameParser().feed(data) == [Frame("MESSAGE", {"key:name": "a:b\nc\rd\\e"})]


@pytest.mark.parametrize("text", ["plain", "a:b", "\\", "x\r\ny", "\\c:\\n"])
def test_escape_round_trips(text: str) -> None:
    assert unescape_header(escape_header(text)) == text


def test_undefined_escape_is_an_error() -> None:
    with pytest.raises(StompProtocolError, match="undefined escape"):
        FrameParser().feed(b"MESSAGE\nbad:a\\tb\n\n\0")


def test_crlf_line_endings_are_accepted() -> None:
    data = b"RECEIPT\r\nreceipt-id:9\r\n\r\n\0"

    assert FrameParser().feed(data) == [Frame("RECEIPT", {"receipt-id": "9"})]


def test_binary_body_with_nul_uses_content_length() -> None:
    body = b"\0a\0\nb\0"
    frame = Frame("MESSAGE", {"subscription": "s1"}, body)
    data = encode_frame(frame)
    for cut in range(len(data) + 1):
        parser = FrameParser()
        assert parser.feed(data[:cut]) + parser.feed(data[cut:]) == [
            Frame("MESSAGE", {"subscription": "s1", "content-length": str(len(body))}, body)
        ]


def test_body_without_content_length_ends_at_first_nul() -> None:
    assert FrameParser().feed(b"ERROR\nmessage:boom\n\nsome text\0") == [
        Frame("ERROR", {"message": "boom"}, b"some text")
    ]


def test_repeated_header_keeps_first_value() -> None:
    assert FrameParser().feed(b"MESSAGE\nfoo:1\nfoo:2\n\n\0") == [Frame("MESSAGE", {"foo": "1"})]


def test_unknown_command_is_an_error() -> None:
    with pytest.raises(StompProtocolError, match="unknown STOMP command 'HELLO'"):
        FrameParser().feed(b"HELLO\n\n\0")


def test_header_without_colon_is_an_error() -> None:
    with pytest.raises(StompProtocolError, match="without ':'"):
        FrameParser().feed(b"MESSAGE\nnocolon\n\n\0")


def test_content_length_not_followed_by_nul_is_an_error() -> None:
    with pytest.raises(StompProtocolError, match="not followed by NUL"):
        FrameParser().feed(b"MESSAGE\ncontent-length:2\n\nabc\0")


def test_invalid_content_length_is_an_error() -> None:
    with pytest.raises(StompProtocolError, match="invalid content-length"):
        FrameParser().feed(b"MESSAGE\ncontent-length:-1\n\n\0")


def test_body_over_the_bound_is_an_error() -> None:
    parser = FrameParser(max_body_bytes=8)
    with pytest.raises(StompProtocolError, match="exceeds 8 bytes"):
        parser.feed(b"MESSAGE\n\n0123456789")


def test_content_length_over_the_bound_is_an_error() -> None:
    with pytest.raises(StompProtocolError, match="exceeds 8 bytes"):
        FrameParser(max_body_bytes=8).feed(b"MESSAGE\ncontent-length:9\n\n")


def test_head_over_the_bound_is_an_error() -> None:
    with pytest.raises(StompProtocolError, match="frame head exceeds 16 bytes"):
        FrameParser(max_header_bytes=16).feed(b"MESSAGE\nlong-header-name:" + b"x" * 32)


def test_connect_header_with_eol_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        encode_frame(Frame("CONNECT", {"passcode": "a\nb"}))
