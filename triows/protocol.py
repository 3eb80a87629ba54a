"""Wire protocol version 1: validation and encoding as pure functions (sans-IO).

Everything a client sends is checked here, and every frame the server sends is
built here, so the HTTP and WebSocket layers only move bytes. A message frame
is serialised once at the sending instance; receiving instances forward its
bytes verbatim.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Final

PROTOCOL_VERSION: Final = 1
USER_NAME: Final = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
USER_KEY_PREFIX: Final = "user."

# WebSocket close codes (DESIGN §4).
CLOSE_INVALID_FRAME: Final = 1008
CLOSE_TOO_LARGE: Final = 1009
CLOSE_DRAINING: Final = 1012
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
    """A validated request to send ``message`` (any JSON value) to user ``to``."""

    to: str
    message: Any
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


def _load_object(raw: bytes | str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidInput("the body must be a JSON object")
    return value


def _send_fields(value: dict[str, Any]) -> tuple[str, Any]:
    if "message" not in value:
        raise InvalidInput("'message' is required")
    try:
        to = check_user_name(value.get("to"))
    except InvalidInput as error:
        raise InvalidInput(f"'to': {error}") from None
    return to, value["message"]


def parse_send_body(raw: bytes, *, dev_mode: bool) -> tuple[SendRequest, str | None]:
    """Parse a ``POST /send`` body into a request and, in dev mode, its ``from``."""
    value = _load_object(raw)
    to, message = _send_fields(value)
    sender = None
    if dev_mode and value.get("from") is not None:
        try:
            sender = check_user_name(value["from"])
        except InvalidInput as error:
            raise InvalidInput(f"'from': {error}") from None
    return SendRequest(to, message), sender


def parse_send_batch(
    raw: bytes, *, dev_mode: bool, max_items: int
) -> list[tuple[SendRequest, str | None] | InvalidInput] | None:
    """Parse a ``POST /send`` body that is a JSON array of send objects (a batch).

    Returns None when the body is not an array (it is then a single send). The
    batch as a whole is refused (:class:`InvalidInput`, or
    :class:`MessageTooLarge` over ``max_items``) when it is not an array of
    objects; each object is then checked exactly as a single body would be, and
    an invalid one becomes its own :class:`InvalidInput` in the result, in order.
    """
    if raw.lstrip()[:1] != b"[":
        return None
    try:
        items = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidInput("the body is not valid JSON") from None
    if not isinstance(items, list):
        raise InvalidInput("the body must be a JSON object or an array of them")
    if len(items) > max_items:
        raise MessageTooLarge(f"a batch holds at most {max_items} messages, got {len(items)}")
    if not all(isinstance(item, dict) for item in items):
        raise InvalidInput("a batch must be a JSON array of send objects")
    parsed: list[tuple[SendRequest, str | None] | InvalidInput] = []
    for item in items:
        try:
            # Each item goes through the single-body parser, so both are checked alike.
            parsed.append(parse_send_body(_dumps(item).encode(), dev_mode=dev_mode))
        except InvalidInput as error:
            parsed.append(error)
        except (ValueError, RecursionError):
            parsed.append(InvalidInput("the item cannot be encoded as JSON"))
    return parsed


def parse_client_frame(raw: str) -> SendRequest:
    """Parse a text frame from a WebSocket client; only ``send`` frames exist.

    Raises :class:`ProtocolViolation` for a frame that is not a ``send`` object
    at all, and :class:`InvalidInput` (with the frame's ``ref`` in ``ref``) for
    a ``send`` frame with invalid fields.
    """
    try:
        value = _load_object(raw)
    except InvalidInput as error:
        raise ProtocolViolation(str(error)) from None
    if value.get("type") != "send":
        raise ProtocolViolation("the only frame a client may send is {'type': 'send', ...}")
    ref = value.get("ref")
    if ref is not None and not isinstance(ref, str):
        raise ProtocolViolation("'ref' must be a string")
    try:
        to, message = _send_fields(value)
    except InvalidInput as error:
        raise InvalidSendFrame(str(error), ref) from None
    return SendRequest(to, message, ref)


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def new_message_id() -> str:
    return uuid.uuid4().hex


def encode_message(message_id: str, sender: str | None, request: SendRequest) -> bytes:
    """The ``message`` frame as it travels through the broker and to every socket."""
    frame = {
        "type": "message",
        "id": message_id,
        "from": sender,
        "to": request.to,
        "message": request.message,
        "ts": time.time_ns() // 1_000_000,
    }
    return _dumps(frame).encode()


def hello_frame(user: str, instance: str) -> str:
    return _dumps({"type": "hello", "user": user, "instance": instance, "protocol": 1})


def ack_frame(ref: str | None, message_id: str, status: str) -> str:
    return _dumps({"type": "ack", "ref": ref, "id": message_id, "status": status})


def error_frame(ref: str | None, code: str, detail: str) -> str:
    return _dumps({"type": "error", "ref": ref, "code": code, "detail": detail})
