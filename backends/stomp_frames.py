"""STOMP 1.2 frames, sans-IO: encode frames to bytes and parse bytes into frames.

Written by hand because no maintained library offers this without its own I/O:
``stomp.py`` splits frames inside its thread-driven socket transport (its
``parse_frame`` needs one whole frame already cut out), ``stomper`` and
``stompest`` are unmaintained, and ``stompman``'s parser is bundled with its
asyncio client, walks the input one byte at a time in Python and silently
drops malformed frames instead of reporting them.

The parser keeps no state but a buffer and the head of the frame it is
reading, so it can be fed any split of the byte stream; everything here is
synchronous and tested without sockets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

CLIENT_COMMANDS = frozenset(
    {
        "CONNECT",
        "STOMP",
        "SEND",
        "SUBSCRIBE",
        "UNSUBSCRIBE",
        "ACK",
        "NACK",
        "BEGIN",
        "COMMIT",
        "ABORT",
        "DISCONNECT",
    }
)
SERVER_COMMANDS = frozenset({"CONNECTED", "MESSAGE", "RECEIPT", "ERROR"})
COMMANDS = CLIENT_COMMANDS | SERVER_COMMANDS

# STOMP 1.2 leaves the headers of the handshake frames unescaped so that a
# 1.0 peer can still read them.
UNESCAPED_COMMANDS = frozenset({"CONNECT", "CONNECTED"})

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
"""Bound on the command line and headers of one frame."""
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
"""Bound on the body of one frame."""

_ESCAPES = {"\\": "\\\\", "\r": "\\r", "\n": "\\n", ":": "\\c"}
_UNESCAPES = {"\\": "\\", "r": "\r", "n": "\n", "c": ":"}


class StompProtocolError(Exception):
    """The peer sent bytes that are not a valid STOMP 1.2 frame."""


@dataclass(frozen=True)
class Frame:
    """One STOMP frame. ``headers`` keeps the first value of a repeated header."""

    command: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""


def escape_header(text: str) -> str:
    """Escape a header name or value as STOMP 1.2 requires (``\\\\ \\r \\n \\c``)."""
    return "".join(_ESCAPES.get(char, char) for char in text)


def unescape_header(text: str) -> str:
    """Undo :func:`escape_header`; an undefined escape is a protocol error."""
    if "\\" not in text:
        return text
    out: list[str] = []
    chars = iter(text)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        escaped = next(chars, "")
        replacement = _UNESCAPES.get(escaped)
        if replacement is None:
            raise StompProtocolError(f"undefined escape sequence '\\{escaped}' in header {text!r}")
        out.append(replacement)
    return "".join(out)


def encode_frame(frame: Frame) -> bytes:
    """Serialise ``frame``.

    A ``content-length`` header is added when the body is not empty and the
    frame has none, so a body may hold NUL bytes.
    """
    headers = dict(frame.headers)
    if frame.body and "content-length" not in headers:
        headers["content-length"] = str(len(frame.body))
    escape = frame.command not in UNESCAPED_COMMANDS
    lines = [frame.command]
    for name, value in headers.items():
        if escape:
            lines.append(f"{escape_header(name)}:{escape_header(value)}")
        else:
            if any(char in name + value for char in "\r\n") or ":" in name:
                raise ValueError(f"{frame.command} header {name!r} cannot hold ':' or EOL")
            lines.append(f"{name}:{value}")
    head = "\n".join(lines) + "\n\n"
    return head.encode("utf-8") + frame.body + b"\0"


@dataclass(frozen=True)
class _Head:
    command: str
    headers: dict[str, str]
    body_start: int
    content_length: int | None


class FrameParser:
    """Turn a byte stream into frames, whatever the boundaries of the reads.

    Heart-beats (EOLs between frames) are consumed silently: the caller learns
    the peer is alive from the bytes arriving, not from the frames.
    """

    def __init__(
        self,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self._buffer = bytearray()
        self._head: _Head | None = None
        self._nul_scan_from = 0
        self._max_header_bytes = max_header_bytes
        self._max_body_bytes = max_body_bytes

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data`` and return every frame it completes, in order.

        Raises :class:`StompProtocolError` on invalid input; the parser is then
        unusable, as is the connection it reads.
        """
        self._buffer += data
        frames: list[Frame] = []
        while (frame := self._next_frame()) is not None:
            frames.append(frame)
        return frames

    def _next_frame(self) -> Frame | None:
        if self._head is None:
            self._skip_heartbeats()
            self._head = self._parse_head()
            if self._head is None:
                return None
            self._nul_scan_from = self._head.body_start
        head = self._head
        if head.content_length is not None:
            end = head.body_start + head.content_length
            if len(self._buffer) <= end:
                return None
            if self._buffer[end] != 0:
                raise StompProtocolError(
                    f"{head.command} body of content-length {head.content_length}"
                    " is not followed by NUL"
                )
        else:
            end = self._buffer.find(b"\0", self._nul_scan_from)
            if end < 0:
                self._nul_scan_from = len(self._buffer)
                if len(self._buffer) - head.body_start > self._max_body_bytes:
                    raise StompProtocolError(
                        f"{head.command} body exceeds {self._max_body_bytes} bytes"
                    )
                return None
        body = bytes(self._buffer[head.body_start : end])
        del self._buffer[: end + 1]
        self._head = None
        return Frame(head.command, head.headers, body)

    def _skip_heartbeats(self) -> None:
        start = 0
        while start < len(self._buffer):
            if self._buffer[start] == 0x0A:  # \n
                start += 1
            elif self._buffer.startswith(b"\r\n", start):
                start += 2
            else:
                break
        if start:
            del self._buffer[:start]

    def _parse_head(self) -> _Head | None:
        buffer = self._buffer
        lines: list[str] = []
        position = 0
        while True:
            newline = buffer.find(b"\n", position, self._max_header_bytes + 1)
            if newline < 0:
                if len(buffer) > self._max_header_bytes:
                    raise StompProtocolError(f"frame head exceeds {self._max_header_bytes} bytes")
                return None
            line_end = (
                newline - 1 if newline > position and buffer[newline - 1] == 0x0D else newline
            )
            raw = bytes(buffer[position:line_end])
            position = newline + 1
            if not raw:
                break
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise StompProtocolError(f"frame head line is not UTF-8: {raw!r}") from None
        command, *header_lines = lines
        if command not in COMMANDS:
            raise StompProtocolError(f"unknown STOMP command {command!r}")
        unescape = command not in UNESCAPED_COMMANDS
        headers: dict[str, str] = {}
        for line in header_lines:
            name, colon, value = line.partition(":")
            if not colon:
                raise StompProtocolError(f"{command} header line without ':': {line!r}")
            if unescape:
                name, value = unescape_header(name), unescape_header(value)
            # STOMP 1.2: when a header repeats, only the first value counts.
            headers.setdefault(name, value)
        return _Head(command, headers, position, self._content_length(command, headers))

    def _content_length(self, command: str, headers: dict[str, str]) -> int | None:
        raw = headers.get("content-length")
        if raw is None:
            return None
        if not (raw.isascii() and raw.isdigit()):
            raise StompProtocolError(f"{command} has an invalid content-length {raw!r}")
        length = int(raw)
        if length > self._max_body_bytes:
            raise StompProtocolError(
                f"{command} content-length {length} exceeds {self._max_body_bytes} bytes"
            )
        return length
