"""Wire protocol version 1: validation and encoding as pure functions (sans-IO).

Everything a client sends is checked here, and every frame the server sends is
built here, so the HTTP and WebSocket layers only move bytes. A message frame
is serialised once at the sending instance; receiving instances forward its
bytes verbatim.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final, Literal, NoReturn

PROTOCOL_VERSION: Final = 1
USER_NAME: Final = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
USER_KEY_PREFIX: Final = "user."
ROOM_KEY_PREFIX: Final = "room."
# Deepest nesting of arrays and objects a client's JSON may have: deeper
# values would recurse in the decoder or encoder (a 500, not a 400).
MAX_JSON_DEPTH: Final = 64
# A JSON escape that decodes to a surrogate (``\\ud800``-``\\udfff``); only a
# text with one is checked for lone surrogates, which UTF-8 cannot encode.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")
# A JSON string, escapes included; an unterminated one runs to the end, so the
# pattern never fails once started and a scan stays linear on any input.
_JSON_STRING: Final = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
# Up to this many brackets and commas, strings are not told apart from structure.
_TOKENS_COUNTED_ROUGHLY: Final = 64
# A long body's structure is counted on this prefix first.
_TOKENS_PREFIX_BYTES: Final = 65536

# WebSocket close codes (docs/protocol.md).
CLOSE_NORMAL: Final = 1000
CLOSE_INVALID_FRAME: Final = 1008
CLOSE_TOO_LARGE: Final = 1009
CLOSE_DRAINING: Final = 1012
CLOSE_TRY_AGAIN: Final = 1013
CLOSE_SLOW_CONSUMER: Final = 4001
CLOSE_TOKEN_EXPIRED: Final = 4401


class InvalidInput(ValueError):
    """Input from a client that the protocol does not allow; ``str()`` says why."""


class ProtocolViolation(InvalidInput):
    """A WebSocket frame that is not a protocol frame at all (the socket closes with 1008)."""


class InvalidSendFrame(InvalidInput):
    """A ``send`` frame with invalid fields; answered with an ``error`` frame."""

    def __init__(self, detail: str, ref: str | None) -> None:
        super().__init__(detail)
        self.ref = ref


class MessageTooLarge(InvalidInput):
    """The encoded message frame exceeds ``TRIOWS_MAX_MESSAGE_BYTES``."""


@dataclass(frozen=True)
class SendRequest:
    """A validated request to send ``message`` (any JSON value) to user ``to`` or to ``room``.

    Exactly one of ``to`` and ``room`` is set (the parsers make sure of it).
    """

    to: str | None
    message: Any
    ref: str | None = None
    room: str | None = None

    @property
    def key(self) -> str:
        """The broker key the message is published under."""
        return room_key(self.room) if self.room is not None else user_key(self.to or "")

    @property
    def target(self) -> str:
        """Who it goes to, as error messages say it: ``Bob`` or ``room general``."""
        return f"room {self.room}" if self.room is not None else str(self.to)


@dataclass(frozen=True)
class RoomRequest:
    """A validated ``join`` or ``leave`` frame from a WebSocket client."""

    action: Literal["join", "leave"]
    room: str
    ref: str | None = None


@dataclass(frozen=True)
class PresenceRequest:
    """A validated ``presence`` frame: who is in ``room``, or is ``user`` online (one of them)."""

    user: str | None
    room: str | None
    ref: str | None = None


def check_user_name(name: object) -> str:
    """Return ``name`` if it is a valid user name, else raise :class:`InvalidInput`.

    Names become routing keys and broker addresses, so only ``[A-Za-z0-9_.@-]``
    is allowed: wildcard and separator characters must never reach a broker.
    """
    if not isinstance(name, str) or not USER_NAME.fullmatch(name):
        raise InvalidInput(
            "user names are 1-128 characters of A-Z, a-z, 0-9, '_', '.', '@' and '-'"
        )
    return name


def user_key(name: str) -> str:
    return USER_KEY_PREFIX + name


def user_of_key(key: str) -> str | None:
    return key[len(USER_KEY_PREFIX) :] if key.startswith(USER_KEY_PREFIX) else None


def check_room_name(name: object) -> str:
    """Return ``name`` if it is a valid room name (the same rules as user names)."""
    if not isinstance(name, str) or not USER_NAME.fullmatch(name):
        raise InvalidInput(
            "room names are 1-128 characters of A-Z, a-z, 0-9, '_', '.', '@' and '-'"
        )
    return name


def room_key(name: str) -> str:
    return ROOM_KEY_PREFIX + name


def room_of_key(key: str) -> str | None:
    return key[len(ROOM_KEY_PREFIX) :] if key.startswith(ROOM_KEY_PREFIX) else None


def key_kind(key: str) -> Literal["user", "room"] | None:
    """Whether ``key`` is a user's or a room's (None: neither)."""
    if key.startswith(USER_KEY_PREFIX):
        return "user"
    if key.startswith(ROOM_KEY_PREFIX):
        return "room"
    return None


class RefusedJson(InvalidInput):
    """JSON the protocol refuses although it parses: too deep, a repeated key, a
    lone surrogate, a non-finite or oversized number."""


def json_tokens(raw: bytes | str, *, exact_above: int = _TOKENS_COUNTED_ROUGHLY) -> int:
    """The structural tokens of a JSON text: its ``[``, ``{`` and ``,`` outside strings.

    Roughly one per value, so what decoding, checking and re-encoding it
    costs grows with this count, not with its bytes (a 64 KiB string is one
    value; 64 KiB of ``{},`` are 21,000). Counted on the raw text in C before
    anything is decoded. A count of at most ``exact_above`` may include
    brackets and commas inside strings (it is an upper bound); a larger one
    does not.
    """
    # Bytes as Latin-1: the same counts, as UTF-8 never puts these characters in a multi-byte one.
    text = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    count = text.count("[") + text.count("{") + text.count(",")
    if count <= exact_above:
        return count
    text = _JSON_STRING.sub("", text)
    return text.count("[") + text.count("{") + text.count(",")


def check_tokens(count: int, limit: int) -> None:
    """Raise :class:`MessageTooLarge` when ``count`` structural tokens are over ``limit``."""
    if count > limit:
        raise MessageTooLarge(
            f"the JSON holds more than {limit} structural tokens "
            "('[', '{' and ',' outside strings)"
        )


def check_body_tokens(raw: bytes, limit: int) -> None:
    """Raise :class:`MessageTooLarge` when the body ``raw`` holds over ``limit`` structural tokens.

    A body longer than :data:`_TOKENS_PREFIX_BYTES` is judged on that prefix
    first (a lower bound: a prefix is read as the whole text would be), so a
    long body dense with structure is refused without being scanned whole.
    """
    if len(raw) > _TOKENS_PREFIX_BYTES:
        check_tokens(json_tokens(raw[:_TOKENS_PREFIX_BYTES], exact_above=limit), limit)
    check_tokens(json_tokens(raw, exact_above=limit), limit)


def _reject_constant(name: str) -> NoReturn:
    raise RefusedJson(f"{name} is not allowed: numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):
        raise RefusedJson("numbers must be finite")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    value = dict(pairs)
    if len(value) != len(pairs):
        raise RefusedJson("an object repeats a key")
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than ``limit`` deep in ``value`` (no recursion).

    One level at a time, in comprehensions: a wide value of many small
    containers costs one pass, not a Python call per container.
    """
    level = [value]
    for _ in range(limit):
        level = [
            child
            for item in level
            for child in (item.values() if isinstance(item, dict) else item)
            if isinstance(child, dict | list)
        ]
        if not level:
            return False
    return True


def check_json(raw: str, value: Any) -> None:
    """Raise :class:`RefusedJson` unless ``value`` (decoded from ``raw``) re-encodes as strict JSON.

    What the decoder let through: nesting deeper than :data:`MAX_JSON_DEPTH`
    (checked in full only when ``raw`` holds more brackets than that) and
    lone surrogates (checked only when ``raw`` has a surrogate escape or
    non-ASCII text). Non-finite numbers and repeated keys were refused while
    decoding.
    """
    if raw.count("[") + raw.count("{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise RefusedJson(f"JSON may nest at most {MAX_JSON_DEPTH} levels deep")
    try:
        if not raw.isascii():
            raw.encode()  # a literal surrogate (not from a strict UTF-8 decoder)
        if "\\u" in raw and _SURROGATE_ESCAPE.search(raw):
            json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise RefusedJson("strings must not hold lone surrogates (\\ud800-\\udfff)") from None


# The decoder of everything a client sends: repeated keys, non-finite numbers refused.
_STRICT_DECODER: Final = json.JSONDecoder(
    parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
)
# Finds where a value ends without judging it: numbers stay unconverted, keys may repeat.
_SPAN_DECODER: Final = json.JSONDecoder(parse_int=len, parse_float=len, parse_constant=len)
# JSON's whitespace (``str.strip`` would take more).
_WHITESPACE: Final = re.compile(r"[ \t\n\r]*")


def _skip_whitespace(raw: str, index: int) -> int:
    match = _WHITESPACE.match(raw, index)
    return match.end() if match else index


def _decode_value(raw: str, start: int) -> tuple[Any, int]:
    """The JSON value that starts at ``raw[start]``, decoded strictly, and where it ends.

    :class:`RefusedJson` for JSON the protocol refuses although it parses,
    :class:`InvalidInput` for text that is not JSON at all.
    """
    try:
        value, end = _STRICT_DECODER.raw_decode(raw, start)
    except RefusedJson:
        raise
    except RecursionError:
        raise RefusedJson(f"JSON may nest at most {MAX_JSON_DEPTH} levels deep") from None
    except json.JSONDecodeError:
        raise InvalidInput("the body is not valid JSON") from None
    except ValueError:
        # int() refuses more than sys.get_int_max_str_digits() digits.
        raise RefusedJson("a number has too many digits") from None
    return value, end


def _load_object(raw: str) -> dict[str, Any]:
    """Decode a JSON object; :class:`RefusedJson` for JSON the protocol refuses.

    Values are not checked with :func:`check_json` yet, so a caller can read
    fields (a frame's ``ref``) before refusing them.
    """
    value, end = _decode_value(raw, _skip_whitespace(raw, 0))
    if _skip_whitespace(raw, end) != len(raw):
        raise InvalidInput("the body is not valid JSON")
    if not isinstance(value, dict):
        raise InvalidInput("the body must be a JSON object")
    return value


def _send_fields(value: dict[str, Any], ref: str | None = None) -> SendRequest:
    """The request of a send object: ``message`` and exactly one of ``to`` or ``room``."""
    if "message" not in value:
        raise InvalidInput("'message' is required")
    if ("to" in value and value["to"] is not None) == (
        "room" in value and value["room"] is not None
    ):
        raise InvalidInput("a send takes exactly one of 'to' (a user) or 'room'")
    if value.get("room") is not None:
        try:
            room = check_room_name(value["room"])
        except InvalidInput as error:
            raise InvalidInput(f"'room': {error}") from None
        return SendRequest(None, value["message"], ref, room=room)
    try:
        to = check_user_name(value.get("to"))
    except InvalidInput as error:
        raise InvalidInput(f"'to': {error}") from None
    return SendRequest(to, value["message"], ref)


def _utf8(raw: bytes) -> str:
    try:
        # Strictly UTF-8 (RFC 8259 §8.1): json.loads would also take UTF-16
        # and let encoded surrogates through ("surrogatepass").
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidInput("the body is not valid JSON: it must be UTF-8") from None


# The sender of a dev-mode POST /send whose body has no "from".
DEV_MODE_SENDER = "anonymous"


def send_object(
    raw: str, value: dict[str, Any], *, dev_mode: bool
) -> tuple[SendRequest, str | None]:
    """Check one send object (a body, or an item of a batch) decoded from ``raw``.

    The request and, in dev mode, its ``from`` (:data:`DEV_MODE_SENDER` when
    the body names none, so a delivery always names a sender, as with a
    token); :class:`InvalidInput` says why not.
    """
    check_json(raw, value)
    request = _send_fields(value)
    sender = DEV_MODE_SENDER if dev_mode else None
    if dev_mode and value.get("from") is not None:
        try:
            sender = check_user_name(value["from"])
        except InvalidInput as error:
            raise InvalidInput(f"'from': {error}") from None
    return request, sender


def parse_send_body(raw: bytes, *, dev_mode: bool) -> tuple[SendRequest, str | None]:
    """Parse a ``POST /send`` body into a request and, in dev mode, its ``from``."""
    text = _utf8(raw)
    return send_object(text, _load_object(text), dev_mode=dev_mode)


def parse_send_batch(
    raw: bytes, *, dev_mode: bool, max_items: int
) -> list[tuple[SendRequest, str | None] | InvalidInput] | None:
    """Parse a ``POST /send`` body that is a JSON array of send objects (a batch).

    Returns None when the body is not an array (it is then a single send).
    Items are decoded one at a time, each exactly as a single body is
    (:func:`send_object`): an item the protocol refuses (a repeated key, a
    number with too many digits, bad fields) becomes its own
    :class:`InvalidInput` in the result, in order, and the others go on. The
    batch as a whole is refused with :class:`MessageTooLarge` as soon as an
    item past ``max_items`` starts (before it is decoded), and with
    :class:`InvalidInput` when it is not a JSON array of objects.
    """
    if raw.lstrip(b" \t\n\r")[:1] != b"[":
        return None
    text = _utf8(raw)
    parsed: list[tuple[SendRequest, str | None] | InvalidInput] = []
    index = _skip_whitespace(text, text.index("[") + 1)
    closed = text.startswith("]", index)
    while not closed:
        if len(parsed) == max_items:
            raise MessageTooLarge(f"a batch holds at most {max_items} messages")
        start = index
        try:
            value, index = _decode_value(text, start)
            item: tuple[SendRequest, str | None] | InvalidInput | None = None
        except RefusedJson as error:
            value, index = _span(text, start)
            item = error
        if not isinstance(value, dict):
            raise InvalidInput("a batch must be a JSON array of send objects")
        if item is None:
            try:
                item = send_object(text[start:index], value, dev_mode=dev_mode)
            except InvalidInput as error:
                item = error
        parsed.append(item)
        index = _skip_whitespace(text, index)
        if text.startswith(",", index):
            index = _skip_whitespace(text, index + 1)
        elif text.startswith("]", index):
            closed = True
        else:
            raise InvalidInput("the body is not valid JSON")
    if _skip_whitespace(text, index + 1) != len(text):
        raise InvalidInput("the body is not valid JSON")
    return parsed


def _span(raw: str, start: int) -> tuple[Any, int]:
    """The value at ``raw[start]`` read loosely, to skip an item that was refused."""
    try:
        value, end = _SPAN_DECODER.raw_decode(raw, start)
    except RecursionError:
        raise RefusedJson(f"JSON may nest at most {MAX_JSON_DEPTH} levels deep") from None
    except ValueError:
        raise InvalidInput("the body is not valid JSON") from None
    return value, end


def parse_client_frame(raw: str) -> SendRequest | RoomRequest | PresenceRequest:
    """Parse a text frame from a WebSocket client: ``send``, ``join``, ``leave`` or ``presence``.

    Raises :class:`ProtocolViolation` for a frame that is not one of them at
    all, and :class:`InvalidSendFrame` (with the frame's ``ref`` in ``ref``,
    when it can be told and echoed) for a frame with invalid fields or JSON
    the protocol refuses (the socket stays open).
    """
    try:
        value = _load_object(raw)
    except RefusedJson as error:
        raise InvalidSendFrame(str(error), None) from None
    except InvalidInput as error:
        raise ProtocolViolation(str(error)) from None
    kind = value.get("type")
    if kind not in ("send", "join", "leave", "presence"):
        raise ProtocolViolation(
            "a client may send only 'send', 'join', 'leave' and 'presence' frames"
        )
    ref = value.get("ref")
    if ref is not None and not isinstance(ref, str):
        raise ProtocolViolation("'ref' must be a string")
    if ref is not None and not _encodable(ref):
        raise InvalidSendFrame("'ref' must not hold lone surrogates", None)
    try:
        check_json(raw, value)
        if kind == "send":
            return _send_fields(value, ref)
        if kind == "presence":
            return presence_request(value.get("user"), value.get("room"), ref)
        try:
            room = check_room_name(value.get("room"))
        except InvalidInput as error:
            raise InvalidInput(f"'room': {error}") from None
    except InvalidInput as error:
        raise InvalidSendFrame(str(error), ref) from None
    return RoomRequest("join" if kind == "join" else "leave", room, ref)


def presence_request(user: object, room: object, ref: str | None = None) -> PresenceRequest:
    """A presence question about exactly one of ``user`` and ``room`` (:class:`InvalidInput`)."""
    if (user is None) == (room is None):
        raise InvalidInput("ask about exactly one of 'user' and 'room'")
    if user is not None:
        return PresenceRequest(check_user_name(user), None, ref)
    try:
        return PresenceRequest(None, check_room_name(room), ref)
    except InvalidInput as error:
        raise InvalidInput(f"'room': {error}") from None


def presence_events_asked(value: str | None) -> bool:
    """``?presence=``: whether a connection asks for its rooms' presence events (default no)."""
    if value is None or value in ("0", "false"):
        return False
    if value in ("1", "true"):
        return True
    raise InvalidInput("'presence' is 1 (send the rooms' presence events) or 0")


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def new_message_id() -> str:
    return uuid.uuid4().hex


def encode_message(message_id: str, sender: str | None, request: SendRequest) -> bytes:
    """The ``message`` frame as it travels through the broker and to every socket.

    Raises :class:`InvalidInput` for a message that is not strict JSON (a
    request built without :func:`parse_send_body` or :func:`parse_client_frame`).
    """
    frame = {
        "type": "message",
        "id": message_id,
        "from": sender,
        "to": request.to,
        "message": request.message,
        "ts": time.time_ns() // 1_000_000,
    }
    if request.room is not None:
        # A room message: "to" is null and "room" names the room.
        frame["room"] = request.room
    try:
        return _dumps(frame).encode()
    except ValueError as error:  # UnicodeEncodeError, NaN, too many digits
        raise RefusedJson(f"the message is not strict JSON: {error.__class__.__name__}") from None
    except RecursionError:
        raise RefusedJson(f"JSON may nest at most {MAX_JSON_DEPTH} levels deep") from None


def hello_frame(
    user: str,
    instance: str,
    session: str | None = None,
    *,
    resumed: bool = False,
    missed: int = 0,
) -> str:
    """The first frame of a connection; ``session`` None: this one cannot be resumed."""
    frame: dict[str, Any] = {
        "type": "hello",
        "user": user,
        "instance": instance,
        "protocol": PROTOCOL_VERSION,
        "session": session,
        "resumable": session is not None,
    }
    if session is not None:
        frame["resumed"] = resumed
        frame["missed"] = missed
    return _dumps(frame)


def ack_frame(ref: str | None, message_id: str, status: str) -> str:
    return _dumps({"type": "ack", "ref": ref, "id": message_id, "status": status})


def error_frame(ref: str | None, code: str, detail: str) -> str:
    return _dumps({"type": "error", "ref": ref, "code": code, "detail": detail})


def joined_frame(ref: str | None, room: str) -> str:
    return _dumps({"type": "joined", "ref": ref, "room": room})


def left_frame(ref: str | None, room: str) -> str:
    return _dumps({"type": "left", "ref": ref, "room": room})


def presence_frame(ref: str | None, answer: dict[str, Any]) -> str:
    """The answer to a ``presence`` frame: ``answer`` is what ``GET /presence`` would say."""
    return _dumps({"type": "presence", "ref": ref, **answer})


def presence_event_frame(room: str, user: str, *, joined: bool) -> str:
    """What a room's members get when ``user`` joins it or leaves it."""
    return _dumps({"type": "presence", "room": room, "joined" if joined else "left": user})
