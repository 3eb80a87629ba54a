"""Presence: who is online, and who is in a room, asked on any instance and answered for all.

triows keeps no database, so the answer comes from the instances themselves,
through the broker (scatter-gather):

- Every instance holds ``presence.query``. An instance asked ``GET
  /presence`` publishes the question there with a key of its own for the
  answers (``presence.reply.<random>``) and gathers them until every other
  instance it knows of has answered, or ``TRIOWS_PRESENCE_TIMEOUT``. Its own
  part it answers from memory. ``complete`` is false when one did not answer
  in time (or the broker could not take the question): the answer then says
  so rather than calling someone offline who may not be.
- Which instances there are: each announces itself on ``presence.peers``
  every :data:`PEER_INTERVAL` seconds, and says goodbye when it stops; one not
  heard of for :data:`PEER_EXPIRY` seconds is forgotten. A new instance asks
  the others to announce at once, and calls its answers incomplete until one
  interval has passed.
- Events: the members of a room get ``{"type": "presence", "room": r,
  "joined": u}`` when ``u``'s first connection joins it and ``"left"`` when its
  last one leaves. Membership is counted per instance; an instance whose count
  for ``(room, user)`` goes from 0 to 1 (or 1 to 0) first asks the others
  whether they hold ``user`` in ``room`` (one small query), and publishes the
  event on ``presence.room.<r>`` only if none does. Instances with members of
  a room hold that key, and give the event to those members' sockets. Events
  are live only: not numbered, not held for a session that is away (a
  resuming client asks again).
- Sessions: a connection that goes away while its session can still be
  resumed does not leave its rooms yet. Its instance holds the membership for
  the resume window; a resume (on any instance) takes the rooms over without
  an event and tells the holder to let go, and a session that is not
  resumed is a leave when the window ends. A normal close (1000) leaves at
  once. An instance that drains or is killed takes its holds with it: those
  users are not announced as left (queries are right again at once).

The memory backend is one process: it answers from memory, always complete.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from triows.backend import Backend, BrokerUnavailable
from triows.protocol import InvalidInput, check_room_name, check_user_name, presence_event_frame

if TYPE_CHECKING:
    from triows.connection import Connection
    from triows.settings import Settings

PRESENCE_KEY_PREFIX = "presence."
QUERY_KEY = "presence.query"
PEERS_KEY = "presence.peers"
REPLY_KEY_PREFIX = "presence.reply."
EVENTS_KEY_PREFIX = "presence.room."
# Seconds between an instance's announcements, and how long one unheard of is remembered.
PEER_INTERVAL = 2.0
PEER_EXPIRY = 3 * PEER_INTERVAL
# Instances remembered at most (a query's fan-in), and the length of their ids.
MAX_PEERS = 1024
MAX_INSTANCE_ID = 256
# Queries one instance gathers at once, and answers and event checks it runs at once:
# past them a query is answered incomplete, a question unanswered, an event dropped.
MAX_IN_FLIGHT = 256
# A presence message from the broker over this size is dropped.
MAX_BODY_BYTES = 256 * 1024
# A hold outlives the session's window by this much, so that a resume just
# inside the window reaches the holder before the hold ends.
HOLD_MARGIN = 2.0
_QUERY_ID = re.compile(r"[0-9a-f]{16}")
_REPLY_KEY = re.compile(re.escape(REPLY_KEY_PREFIX) + r"[0-9a-f]{16}")
_DIGEST = re.compile(r"[0-9a-f]{16}")


def events_key(room: str) -> str:
    return EVENTS_KEY_PREFIX + room


def session_digest(token: str) -> str:
    """What a resume says of its session to the other instances (never the token itself)."""
    return hashlib.blake2b(token.encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class UserPresence:
    user: str
    connections: int
    complete: bool

    def document(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "online": self.connections > 0,
            "connections": self.connections,
            "complete": self.complete,
        }


@dataclass(frozen=True, slots=True)
class RoomPresence:
    room: str
    users: list[str]
    complete: bool
    # More users than TRIOWS_PRESENCE_MAX_USERS are in the room: ``users`` is cut.
    truncated: bool

    def document(self) -> dict[str, Any]:
        return {
            "room": self.room,
            "users": self.users,
            "complete": self.complete,
            "truncated": self.truncated,
        }


@dataclass(slots=True)
class _Gathering:
    """One query's answers, while it waits for them."""

    waiting_for: set[str]
    # What each answer holds: "connections", "users" (and "more") or "present".
    expects: str
    answers: list[dict[str, Any]] = field(default_factory=list)
    done: trio.Event = field(default_factory=trio.Event)


@dataclass(slots=True)
class _Hold:
    """The rooms of a session that is away, kept until ``until`` or its resume."""

    until: float
    digest: str
    user: str
    rooms: tuple[str, ...]
    released: bool = False


class RouterSide(Protocol):
    """What presence uses of the router (:class:`triows.router.Router`)."""

    backend: Backend

    async def add_member(self, key: str, connection: Connection) -> None: ...

    async def remove_member(self, key: str, connection: Connection) -> None: ...

    def connections_of(self, user: str) -> int: ...

    def count_presence_event(self, outcome: str) -> None: ...


class InvalidPresenceMessage(ValueError):
    """A presence message from the broker that no triows instance would have sent."""


class Presence:
    """This instance's part of presence: its members, its peers, its queries (module docstring)."""

    def __init__(self, router: RouterSide, settings: Settings) -> None:
        self._router = router
        self._instance = settings.instance_id
        self._timeout = settings.presence_timeout
        self._max_users = settings.presence_max_users
        self._events_on = settings.presence_events
        self._hold_for = settings.resume_window + HOLD_MARGIN
        self._local_only = settings.backend == "memory"
        self._reply_key = REPLY_KEY_PREFIX + secrets.token_hex(8)
        # room -> user -> this instance's connections (and away sessions) of it in the room
        self._members: dict[str, dict[str, int]] = {}
        # instance -> when it was last heard of (Trio clock)
        self._peers: dict[str, float] = {}
        self._settled_at = math.inf
        self._gathering: dict[str, _Gathering] = {}
        self._holds: deque[_Hold] = deque()
        self._holds_of: dict[str, _Hold] = {}
        self._hold_added = trio.Event()
        # (room, user) -> the lock that keeps that pair's event checks in order
        self._turns: dict[tuple[str, str], trio.Lock] = {}
        self._tasks = 0
        self._nursery: trio.Nursery | None = None

    # Running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the presence keys, announce this instance, and expire holds, until cancelled."""
        backend = self._router.backend
        try:
            async with trio.open_nursery() as nursery:
                if not self._local_only:
                    for key in (QUERY_KEY, PEERS_KEY, self._reply_key):
                        await backend.subscribe(key)
                    self._settled_at = trio.current_time() + PEER_INTERVAL
                    nursery.start_soon(self._announce_periodically)
                nursery.start_soon(self._expire_holds)
                self._nursery = nursery
                task_status.started()
        finally:
            self._nursery = None
            if not self._local_only:
                with trio.move_on_after(1.0, shield=True):
                    await self._publish(PEERS_KEY, {"instance": self._instance, "up": False})

    async def _announce_periodically(self) -> None:
        ask = True
        while True:
            await self._publish(PEERS_KEY, {"instance": self._instance, "up": True, "ask": ask})
            ask = False
            await trio.sleep(PEER_INTERVAL)

    async def _publish(self, key: str, document: dict[str, Any]) -> bool:
        try:
            await self._router.backend.publish(key, json.dumps(document).encode())
        except BrokerUnavailable:
            return False
        return True

    def _spawn(self, task: Any, *args: Any) -> bool:
        """Run ``task(*args)`` in the background, unless too many run already."""
        nursery = self._nursery
        if nursery is None or self._tasks >= MAX_IN_FLIGHT:
            return False
        self._tasks += 1

        async def run() -> None:
            try:
                await task(*args)
            finally:
                self._tasks -= 1

        nursery.start_soon(run)
        return True

    # Membership (called by the router and by sessions)

    async def add(self, connection: Connection, room: str, *, announce: bool = True) -> None:
        """``connection`` is in ``room``: its user's first connection there is a join.

        The room's events reach the connection if it asked for them
        (``presence_events``). ``announce`` False: a resume taking its rooms
        over (not a join).
        """
        users = self._members.setdefault(room, {})
        count = users.get(connection.user, 0)
        users[connection.user] = count + 1
        if connection.presence_events:
            # Before the event is published: a joining user gets their own.
            await self._router.add_member(events_key(room), connection)
        if count == 0 and announce:
            self._check_event(room, connection.user, joined=True)

    async def remove(self, connection: Connection, room: str, *, hold: bool = False) -> None:
        """``connection`` left ``room``; ``hold``: its session is away, the rooms are kept."""
        if connection.presence_events:
            await self._router.remove_member(events_key(room), connection)
        if not hold:
            self._decrement(room, connection.user)

    def hold(self, user: str, token: str, rooms: set[str]) -> None:
        """Keep ``user`` in ``rooms`` while its session ``token`` may still be resumed."""
        if not rooms:
            return
        entry = _Hold(
            trio.current_time() + self._hold_for, session_digest(token), user, tuple(rooms)
        )
        self._holds.append(entry)
        self._holds_of[entry.digest] = entry
        self._hold_added.set()

    async def resumed(self, token: str) -> None:
        """Session ``token`` was resumed here: whoever holds its rooms lets go, without events."""
        digest = session_digest(token)
        self._let_go(digest)
        if not self._local_only:
            await self._publish(PEERS_KEY, {"instance": self._instance, "resumed": digest})

    def _let_go(self, digest: str) -> None:
        entry = self._holds_of.pop(digest, None)
        if entry is None or entry.released:
            return
        entry.released = True
        for room in entry.rooms:
            self._decrement(room, entry.user, announce=False)

    def _decrement(self, room: str, user: str, *, announce: bool = True) -> None:
        users = self._members.get(room)
        if users is None or user not in users:
            return
        users[user] -= 1
        if users[user]:
            return
        del users[user]
        if not users:
            del self._members[room]
        if announce:
            self._check_event(room, user, joined=False)

    async def _expire_holds(self) -> None:
        while True:
            while not self._holds:
                await self._hold_added.wait()
                self._hold_added = trio.Event()
            entry = self._holds[0]
            await trio.sleep_until(entry.until)
            self._holds.popleft()
            if entry.released:
                continue
            entry.released = True
            if self._holds_of.get(entry.digest) is entry:
                del self._holds_of[entry.digest]
            for room in entry.rooms:
                self._decrement(room, entry.user)

    def present_here(self, room: str, user: str) -> bool:
        return user in self._members.get(room, {})

    def users_here(self, room: str) -> list[str]:
        return sorted(self._members.get(room, {}))

    # Events

    def _check_event(self, room: str, user: str, *, joined: bool) -> None:
        if not self._events_on:
            return
        if not self._spawn(self._announce_event, room, user, joined):
            self._router.count_presence_event("dropped")

    async def _announce_event(self, room: str, user: str, joined: bool) -> None:
        pair = (room, user)
        turn = self._turns.setdefault(pair, trio.Lock())
        try:
            async with turn:
                if self.present_here(room, user) != joined:
                    return  # changed meanwhile: the check of that change says it
                if not self._local_only and await self._held_elsewhere(room, user):
                    self._router.count_presence_event("elsewhere")
                    return
                frame = presence_event_frame(room, user, joined=joined)
                try:
                    await self._router.backend.publish(events_key(room), frame.encode())
                except BrokerUnavailable:
                    self._router.count_presence_event("unavailable")
                    return
                self._router.count_presence_event("joined" if joined else "left")
        finally:
            if not turn.locked() and turn.statistics().tasks_waiting == 0:
                self._turns.pop(pair, None)

    async def _held_elsewhere(self, room: str, user: str) -> bool:
        answers, _ = await self._gather({"room": room, "user": user}, "present")
        return any(answer.get("present") is True for answer in answers)

    # Queries

    async def user(self, user: str) -> UserPresence:
        answers, complete = await self._gather({"user": user}, "connections")
        connections = self._router.connections_of(user)
        for answer in answers:
            connections += answer["connections"]
        return UserPresence(user, connections, complete)

    async def room(self, room: str) -> RoomPresence:
        answers, complete = await self._gather({"room": room}, "users")
        users = set(self.users_here(room))
        truncated = False
        for answer in answers:
            users.update(answer["users"])
            truncated = truncated or answer["more"]
        listed = sorted(users)
        if len(listed) > self._max_users:
            listed, truncated = listed[: self._max_users], True
        return RoomPresence(room, listed, complete, truncated)

    def _live_peers(self) -> set[str]:
        now = trio.current_time()
        gone = [peer for peer, seen in self._peers.items() if now - seen > PEER_EXPIRY]
        for peer in gone:
            del self._peers[peer]
        return set(self._peers)

    async def _gather(
        self, question: dict[str, str], expects: str
    ) -> tuple[list[dict[str, Any]], bool]:
        """Ask every other instance ``question``; their answers, and whether all came in time."""
        if self._local_only:
            return [], True
        settled = trio.current_time() >= self._settled_at
        peers = self._live_peers()
        if not peers:
            return [], settled
        if len(self._gathering) >= MAX_IN_FLIGHT:
            return [], False
        query = secrets.token_hex(8)
        gathering = self._gathering[query] = _Gathering(peers, expects)
        try:
            asked = {"q": query, "reply": self._reply_key, "from": self._instance, **question}
            if not await self._publish(QUERY_KEY, asked):
                return [], False
            with trio.move_on_after(self._timeout):
                await gathering.done.wait()
            return gathering.answers, settled and not gathering.waiting_for
        finally:
            del self._gathering[query]

    # What the broker hands over on presence keys (from Router.deliver; never blocks)

    def deliver(self, key: str, body: bytes, members: set[Connection]) -> None:
        """Take one presence message (``members``: the room's here, for an event).

        Raises :class:`InvalidPresenceMessage` for one no triows instance would send.
        """
        if len(body) > MAX_BODY_BYTES:
            raise InvalidPresenceMessage("over the size of any presence message")
        try:
            text = body.decode()
            value = json.loads(text)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            raise InvalidPresenceMessage("not JSON") from None
        if not isinstance(value, dict):
            raise InvalidPresenceMessage("not a JSON object")
        try:
            if key.startswith(EVENTS_KEY_PREFIX):
                self._take_event(key[len(EVENTS_KEY_PREFIX) :], value, text, members)
            elif key == QUERY_KEY:
                self._take_query(value)
            elif key == PEERS_KEY:
                self._take_peer(value)
            elif key == self._reply_key:
                self._take_answer(value)
        except (KeyError, TypeError, InvalidInput) as error:
            raise InvalidPresenceMessage(f"malformed: {error!r}") from None

    def _take_event(
        self, room: str, value: dict[str, Any], frame: str, members: set[Connection]
    ) -> None:
        if value.get("type") != "presence" or value.get("room") != room:
            raise InvalidPresenceMessage("not a presence event of the room of its key")
        if set(value) not in ({"type", "room", "joined"}, {"type", "room", "left"}):
            raise InvalidPresenceMessage("not a presence event")
        check_user_name(value.get("joined", value.get("left")))
        for connection in tuple(members):
            connection.offer(frame)

    def _take_peer(self, value: dict[str, Any]) -> None:
        instance = value["instance"]
        if not isinstance(instance, str) or len(instance) > MAX_INSTANCE_ID:
            raise InvalidPresenceMessage("'instance' is not an instance id")
        if instance == self._instance:
            return
        digest = value.get("resumed")
        if digest is not None:
            if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
                raise InvalidPresenceMessage("'resumed' is not a session digest")
            self._let_go(digest)
        elif value["up"] is True:
            if instance in self._peers or len(self._peers) < MAX_PEERS:
                self._peers[instance] = trio.current_time()
            if value.get("ask") is True:
                self._spawn(self._publish, PEERS_KEY, {"instance": self._instance, "up": True})
        else:
            self._peers.pop(instance, None)

    def _take_query(self, value: dict[str, Any]) -> None:
        if value["from"] == self._instance:
            return  # our own question: answered from memory
        query, reply = value["q"], value["reply"]
        if not (isinstance(query, str) and _QUERY_ID.fullmatch(query)):
            raise InvalidPresenceMessage("'q' is not a query id")
        if not (isinstance(reply, str) and _REPLY_KEY.fullmatch(reply)):
            raise InvalidPresenceMessage("'reply' is not a presence reply key")
        answer: dict[str, Any] = {"q": query, "instance": self._instance}
        if "room" in value:
            room = check_room_name(value["room"])
            if "user" in value:
                answer["present"] = self.present_here(room, check_user_name(value["user"]))
            else:
                users = self.users_here(room)
                answer["users"] = users[: self._max_users]
                answer["more"] = len(users) > self._max_users
        else:
            answer["connections"] = self._router.connections_of(check_user_name(value["user"]))
        self._spawn(self._publish, reply, answer)

    def _take_answer(self, value: dict[str, Any]) -> None:
        gathering = self._gathering.get(value["q"])
        instance = value["instance"]
        if gathering is None or instance not in gathering.waiting_for:
            return  # late, or not asked
        if gathering.expects == "connections":
            connections = value["connections"]
            if not isinstance(connections, int) or isinstance(connections, bool) or connections < 0:
                raise InvalidPresenceMessage("'connections' is not a count")
        elif gathering.expects == "users":
            users = value["users"]
            if not isinstance(users, list) or len(users) > self._max_users:
                raise InvalidPresenceMessage("'users' is not a list of at most the bound")
            for user in users:
                check_user_name(user)
            if not isinstance(value["more"], bool):
                raise InvalidPresenceMessage("'more' is not a boolean")
        elif not isinstance(value["present"], bool):
            raise InvalidPresenceMessage("'present' is not a boolean")
        gathering.waiting_for.discard(instance)
        gathering.answers.append(value)
        if not gathering.waiting_for:
            gathering.done.set()
