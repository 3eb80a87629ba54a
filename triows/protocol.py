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
from typing import Any, Final, NoReturn

PROTOCOL_VERSION: Final = 1
USER_NAME: Final = re.compile(r"[A-Za-z0-9_.@-]{1,128}")
USER_KEY_PREFIX: Final = "user."
# Deepest nesting of arrays and objects a client's JSON may have: deeper
# values would recurse in the decoder or encoder (a 500, not a 400).
MAX_JSON_DEPTH: Final = 64
# A JSON escape that decodes to a surrogate (``\\ud800``-``\\udfff``); only a
# text with one is checked for lone surrogates, which UTF-8 cannot encode.
_SURROGATE_ESCAPE: Final = re.compile(r"\\u[dD][89a-fA-F]")

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


class RefusedJson(InvalidInput):
    """JSON the protocol refuses although it parses: too deep, a repeated key, a
    lone surrogate, a non-finite or oversized number."""


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


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in ``value`` (iterative: no recursion)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def check_json(raw: str, value: Any) -> None:
    """Raise :class:`RefusedJson` unless ``value`` (decoded from ``raw``) re-encodes as strict JSON.

    What the decoder let through: nesting deeper than :data:`MAX_JSON_DEPTH`
    (checked in full only when ``raw`` holds more brackets than that) and
    lone surrogates (checked only when ``raw`` has a surrogate escape or
    non-ASCII text). Non-finite numbers and repeated keys were refused while
    decoding.
    """
    if raw.count("[") + raw.count("{") > MAX_JSON_DEPTH and _depth(value) > MAX_JSON_DEPTH:
        raise RefusedJson(f"JSON may nest at most {MAX_JSON_DEPTH} levels deep")
    try:
        if not raw.isascii():
            raw.encode()  # a literal surrogate (not from a strict UTF-8 decoder)
        if "\\u" in raw and _SURROGATE_ESCAPE.search(raw):
            json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise RefusedJson("strings must not hold lone surrogates (\\ud800-\\udfff)") from None


def _load_object(raw: str) -> dict[str, Any]:
    """Decode a JSON object; :class:`RefusedJson` for JSON the protocol refuses.

    Values are not checked with :func:`check_json` yet, so a caller can read
    fields (a frame's ``ref``) before refusing them.
    """
    try:
        value = json.loads(
            raw,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            object_pairs_hook=_unique_keys,
        )
    except RefusedJson:
        raise
    except RecursionError:
        raise RefusedJson(f"JSON may nest at most {MAX_JSON_DEPTH} levels deep") from None
    except json.JSONDecodeError:
        raise InvalidInput("the body is not valid JSON") from None
    except ValueError:
        # int() refuses more than sys.get_int_max_str_digits() digits.
        raise RefusedJson("a number has too many digits") from None
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
    try:
        # Strictly UTF-8 (RFC 8259 §8.1): json.loads would also take UTF-16
        # and let encoded surrogates through ("surrogatepass").
        text = raw.decode()
    except UnicodeDecodeError:
        raise InvalidInput("the body is not valid JSON: it must be UTF-8") from None
    value = _load_object(text)
    check_json(text, value)
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
    at all, and :class:`InvalidSendFrame` (with the frame's ``ref`` in ``ref``,
    when it can be told and echoed) for a frame with invalid fields or JSON
    the protocol refuses (the socket stays open).
    """
    try:
        value = _load_object(raw)
    except RefusedJson as error:
        raise InvalidSendFrame(str(error), None) from None
    except InvalidInput as error:
        raise ProtocolViolation(str(error)) from None
    if value.get("type") != "send":
        raise ProtocolViolation("the only frame a client may send is {'type': 'send', ...}")
    ref = value.get("ref")
    if ref is not None and not isinstance(ref, str):
        raise ProtocolViolation("'ref' must be a string")
    if ref is not None and not _encodable(ref):
        raise InvalidSendFrame("'ref' must not hold lone surrogates", None)
    try:
        check_json(raw, value)
        to, message = _send_fields(value)
    except InvalidInput as error:
        raise InvalidSendFrame(str(error), ref) from None
    return SendRequest(to, message, ref)


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
    try:
        return _dumps(frame).encode()
    except ValueError as error:  # UnicodeEncodeError, NaN, too many digits
        raise RefusedJson(f"the message is not strict JSON: {error.__class__.__name__}") from None
    except RecursionError:
        raise RefusedJson(f"JSON may nest at most {MAX_JSON_DEPTH} levels deep") from None


def hello_frame(user: str, instance: str) -> str:
    return _dumps(
        {"type": "hello", "user": user, "instance": instance, "protocol": PROTOCOL_VERSION}
    )


def ack_frame(ref: str | None, message_id: str, status: str) -> str:
    return _dumps({"type": "ack", "ref": ref, "id": message_id, "status": status})


def error_frame(ref: str | None, code: str, detail: str) -> str:
    return _dumps({"type": "error", "ref": ref, "code": code, "detail": detail})
