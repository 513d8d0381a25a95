"""The chat model: rooms stored in ZODB, and the per-reader session that reads and writes them.

The seed (Kuchling's ``chatter.py``) kept one BTree keyed by ``time.time()`` and a ``_v_last_time``
cursor. That cursor is lost whenever the object is ghostified, and it never delivers a message
stamped earlier but committed later than one already seen; and every writer appending to the end of
one shared BTree makes bucket splits, which cannot be merged, conflict all the time under load.

Here each writer (one per :class:`~zchat_nb.client.ChatClient`) appends to a stream of its own,
``Room.streams[writer]``, keyed by ``(time, id)``, where times only grow: a writer's key order is
its commit order. A reader's cursor is the last key it was given from each stream, held by the
:class:`ChatSession` in ordinary memory, never on a persistent object. Writers touch only their own
stream, their own key of ``Room.heads`` and the ``Room.count`` counter, all of which merge, so
concurrent senders do not conflict. History merges the recent ends of the streams by time.
Records are plain tuples of ``str`` and ``float`` so that the unpickling allow-list stays tiny.

This module knows nothing of ZEO, widgets or IPython: a :class:`ChatSession` gets its connection,
its wake-ups and its clock from a :class:`SessionHost` (``zchat_nb.client.ChatClient`` in practice).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import transaction
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.POSException import ConflictError

from .exceptions import (
    InvalidMessageError,
    ZChatConnectionError,
    ZChatDisconnected,
    ZChatSendError,
    disconnected,
    server_boundary,
)

if TYPE_CHECKING:
    from ZODB.Connection import Connection

__all__ = [
    "DEFAULT_MAX_TEXT_BYTES",
    "ChatSession",
    "Message",
    "Room",
    "SendPolicy",
    "SessionHost",
    "commit",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_TEXT_BYTES = 64 * 1024
MAX_AUTHOR_CHARS = 64
MAX_ROOM_CHARS = 64
_ID_CHARS = 32
_ID_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")
ROOMS_KEY = "zchat_nb.rooms"

Record = tuple[str, str, str, float]
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message; immutable.

    ``id`` is made by the sender and unique, ``time`` is the sender's clock (seconds since the epoch).
    """

    id: str
    author: str
    text: str
    time: float

    @property
    def key(self) -> tuple[float, str]:
        """The message's key in its writer's stream: ordered by time, ties broken by id."""
        return (self.time, self.id)

    def to_record(self) -> Record:
        return (self.id, self.author, self.text, self.time)

    @classmethod
    def from_record(cls, record: object, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> Message:
        """Check a stored record written by some client and turn it into a Message.

        Raises ``ValueError`` naming what is wrong: another client may have written anything.
        """
        if not (isinstance(record, tuple) and len(record) == 4):
            raise ValueError(f"record is not a 4-tuple: {type(record).__name__}")
        id_, author, text, when = record
        if not (isinstance(id_, str) and 0 < len(id_) <= _ID_CHARS):
            raise ValueError(f"bad message id {id_!r:.40}")
        if not (isinstance(author, str) and 0 < len(author) <= MAX_AUTHOR_CHARS):
            raise ValueError(f"bad author {author!r:.80}")
        if not isinstance(text, str) or len(text) > max_text_bytes:
            raise ValueError("text is not a str or longer than the limit")
        if len(text.encode("utf-8", "surrogatepass")) > max_text_bytes:
            raise ValueError(f"text is over {max_text_bytes} bytes")
        if not (isinstance(when, float) and math.isfinite(when)):
            raise ValueError(f"bad time {when!r:.40}")
        return cls(id_, author, text, when)


def check_text(text: object, max_text_bytes: int) -> str:
    """Return ``text`` if it can be sent, else raise :class:`InvalidMessageError` saying why."""
    if not isinstance(text, str):
        raise InvalidMessageError(
            f"message text must be a str, not {type(text).__name__} ({text!r:.60}); "
            "convert it first, for example with str(value)"
        )
    if not text.strip():
        raise InvalidMessageError("message text is empty; type something to send")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_text_bytes:
        raise InvalidMessageError(
            f"message text is {size} bytes, over the {max_text_bytes}-byte limit; "
            "split it, or raise the limit with connect(..., max_text_bytes=N)"
        )
    return text


def check_author(author: object) -> str:
    if not isinstance(author, str) or not author.strip():
        raise InvalidMessageError(f"user name must be a non-empty str, not {author!r:.60}")
    if len(author) > MAX_AUTHOR_CHARS:
        raise InvalidMessageError(
            f"user name {author[:20]!r}... is {len(author)} characters; use at most {MAX_AUTHOR_CHARS}"
        )
    return author.strip()


def check_message_id(id_: object) -> str:
    """Return ``id_`` if it can be a message id, a new random id if it is None, else raise."""
    if id_ is None:
        return uuid.uuid4().hex
    if not (isinstance(id_, str) and 0 < len(id_) <= _ID_CHARS and all(c in _ID_ALPHABET for c in id_)):
        raise InvalidMessageError(
            f"message id must be 1 to {_ID_CHARS} letters, digits, '-' or '_', not {id_!r:.60}; "
            "leave it out to get a new one"
        )
    return id_


def check_room_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_ROOM_CHARS:
        raise InvalidMessageError(
            f"room name must be a non-empty str of at most {MAX_ROOM_CHARS} characters, not {name!r:.80}"
        )
    return name.strip()


class Room(Persistent):
    """A chat room as stored in ZODB.

    Every attribute has a class-level default so that records written by older versions load.
    """

    name = ""
    created = 0.0
    #: Bumped by :meth:`clear`; readers that see a new epoch start their cursors afresh.
    epoch = 0
    #: ``writer -> stream``; a stream is an ``OOBTree`` of ``(time, id) -> record`` that only its
    #: writer appends to, so writers never conflict. A writer's times increase in commit order.
    streams: OOBTree | None = None
    #: ``writer -> (count, first time, last time, last id)``. Writers change only their own key,
    #: so concurrent commits merge.
    heads: OOBTree | None = None
    #: Number of messages in this epoch; a reader with as many delivered is idle.
    count: Length | None = None
    #: ``user -> last heartbeat time``; one key per user, so concurrent heartbeats merge.
    presence: OOBTree | None = None

    def __init__(self, name: str, created: float = 0.0) -> None:
        self.name = name
        self.created = created
        self._new_trees()

    def _new_trees(self) -> None:
        self.streams = OOBTree()
        self.heads = OOBTree()
        self.count = Length()

    def append(self, writer: str, message: Message) -> Message:
        """Add ``message`` to the end of ``writer``'s stream and return it as stored.

        Its time is moved just past the writer's previous message if the writer's clock went back,
        so that each stream's key order is its commit order. A message whose id is already in the
        stream (a retried send whose first commit did happen, even with later sends since) is left
        alone.
        """
        assert self.streams is not None and self.heads is not None and self.count is not None
        stream = self.streams.get(writer)
        if stream is None:
            stream = self.streams[writer] = OOBTree()
        count, first, last, last_id = self.heads.get(writer, (0, message.time, -math.inf, ""))
        if last_id == message.id:
            return Message.from_record(stream[(last, last_id)])
        stored = _find_retried(stream, message)
        if stored is not None:
            return stored
        if message.time <= last:
            message = dataclasses.replace(message, time=math.nextafter(last, math.inf))
        stream[message.key] = message.to_record()
        self.heads[writer] = (count + 1, first, message.time, message.id)
        self.count.change(1)
        return message

    def records(self) -> Iterator[tuple[Any, Any]]:
        """Every ``(key, record)`` of the room in time order (reads everything: for exports)."""
        assert self.streams is not None
        return heapq.merge(*(stream.items() for stream in self.streams.values()), key=lambda item: item[0])

    def beat(self, user: str, when: float) -> None:
        if self.presence is None:
            self.presence = OOBTree()
        self.presence[user] = when

    def present(self, since: float) -> list[str]:
        if self.presence is None:
            return []
        return sorted(user for user, when in self.presence.items() if when >= since)

    def clear(self) -> None:
        """Forget every message (a teacher's reset); readers notice through :attr:`epoch`."""
        self._new_trees()
        self.epoch += 1

    def __repr__(self) -> str:
        return f"<Room {self.name!r}>"


#: Entries of a stream looked at for a retried message's id (see :func:`_find_retried`).
RETRY_WINDOW = 256


def _find_retried(stream: OOBTree, message: Message) -> Message | None:
    """The stored copy of ``message`` if an earlier attempt committed it, else None.

    A retry carries the first attempt's time and id; the stored key is that key, or a later time
    when the writer's clock had gone back. So only keys from ``message.key`` on can match, and a
    new message (later than everything stored) costs one tree descent. At most
    :data:`RETRY_WINDOW` keys are looked at, so a bogus early time cannot make a send scan the
    whole stream.
    """
    for count, key in enumerate(stream.keys(min=message.key)):
        if count >= RETRY_WINDOW:
            break
        if key[1] == message.id:
            return Message.from_record(stream[key])
    return None


@dataclass(frozen=True)
class _Head:
    """A writer's entry in ``Room.heads``, checked."""

    count: int
    first: float
    last: float
    last_id: str

    @property
    def last_key(self) -> tuple[float, str]:
        return (self.last, self.last_id)

    @classmethod
    def check(cls, value: object) -> _Head:
        if not (isinstance(value, tuple) and len(value) == 4):
            raise ValueError(f"head is not a 4-tuple: {type(value).__name__}")
        count, first, last, last_id = value
        if not (isinstance(count, int) and count > 0 and isinstance(last_id, str)):
            raise ValueError(f"bad head {value!r:.80}")
        if not (isinstance(first, float) and isinstance(last, float) and math.isfinite(last)):
            raise ValueError(f"bad head times {value!r:.80}")
        return cls(count, first, last, last_id)


def _prefetch_right_edges(room: Room, trees: list[Any], levels: int = 4) -> None:
    """Ask ZEO for the recent end of each stream in one pipelined round trip per tree level.

    History reads the newest buckets of many streams; loading them one by one costs a round trip
    each (about 60 for 20 writers). ``Connection.prefetch`` sends the loads together instead.
    Uses the BTree node state: ``(child0, key1, child1, ...)`` then the first bucket; a small tree
    keeps its one bucket inline instead.
    """
    jar = room._p_jar
    if jar is None or not hasattr(jar.db().storage, "prefetch"):  # in-process storages: no round trips
        return
    nodes = [tree for tree in trees if tree is not None]
    for _ in range(levels):
        if not nodes:
            return
        jar.prefetch(nodes)
        children: list[Persistent] = []
        for node in nodes:
            state = node.__getstate__() if type(node).__name__.endswith("BTree") else None
            if state and len(state) == 2 and isinstance(state[0][-1], Persistent):  # an inner node
                children.append(state[0][-1])
        nodes = children


def rooms_of(conn: Connection) -> OOBTree:
    """The ``name -> Room`` tree of a database, or a new one (the caller commits)."""
    root = conn.root()
    rooms = root.get(ROOMS_KEY)
    if rooms is None:
        rooms = root[ROOMS_KEY] = OOBTree()
    return rooms


@dataclass(frozen=True)
class SendPolicy:
    """How hard a send tries before it gives up and raises :class:`ZChatSendError`."""

    #: Seconds a send may take in all, server outages included.
    timeout: float = 10.0
    #: Conflict retries before giving up (each is a fresh transaction).
    max_conflicts: int = 50
    #: Upper bound of the random pause after a conflict, doubled each time from ``backoff / 32``.
    backoff: float = 0.05


class SessionHost(Protocol):
    """What a :class:`ChatSession` needs from its client; ``ChatClient`` implements it."""

    user: str
    writer: str
    max_text_bytes: int
    policy: SendPolicy
    clock: Callable[[], float]
    #: Held while a message is committed: one send at a time per writer.
    send_lock: threading.Lock

    def connection(self) -> tuple[transaction.TransactionManager, Connection]:
        """This thread's transaction manager and connection."""

    def generation(self) -> int:
        """A counter bumped on every invalidation, (dis)connect and commit of this client."""

    def wait_for_change(self, generation: int, timeout: float) -> bool:
        """Block until :meth:`generation` differs from ``generation``, or ``timeout`` passes."""

    def wait_connected(self, timeout: float) -> bool:
        """Block until the client is connected or ``timeout`` passes; returns whether it is."""

    def is_connected(self) -> bool: ...

    def report(self, kind: str, **details: Any) -> None:
        """Tell observers (the inspector) about a commit or a poll."""

    @property
    def closed(self) -> bool: ...

    @property
    def address_text(self) -> str: ...


class ChatSession:
    """A reader and writer of one room, with its own cursor.

    Each ChatSession delivers every message of its room exactly once through
    :meth:`new_messages`, its own messages included, whatever the order of the senders' clocks.
    A session may be used from several threads: each thread reads through its own connection.
    """

    def __init__(self, host: SessionHost, room: str, *, backlog: int | None = None) -> None:
        self._host = host
        self.room = check_room_name(room)
        #: ``writer -> (messages delivered, key of the last one)``; plain memory, never persisted.
        self._cursor: dict[str, tuple[int, tuple[float, str] | None]] = {}
        self._bad_heads: set[str] = set()
        self._epoch: int | None = None
        self._backlog = backlog
        self._lock = threading.RLock()
        #: Records that failed validation or could not be loaded, as ``(where, reason)``.
        self.skipped: list[tuple[str, str]] = []

    # -- reading -------------------------------------------------------------------------

    def _room(self) -> Room:
        """Begin a transaction on this thread's connection and return the room, creating it."""
        tm, conn = self._host.connection()
        tm.begin()
        rooms = conn.root().get(ROOMS_KEY)
        room = rooms.get(self.room) if rooms is not None else None
        if room is None:
            self._create_room()
            tm.begin()
            room = conn.root()[ROOMS_KEY][self.room]
        return room

    def _create_room(self) -> None:
        self._commit(self._room_in, what=f"creating room {self.room!r}")

    def _room_in(self, conn: Connection) -> Room:
        """The room in ``conn``'s current transaction, added to it if missing (the caller commits)."""
        rooms = rooms_of(conn)
        room = rooms.get(self.room)
        if room is None:
            room = rooms[self.room] = Room(self.room, created=float(self._host.clock()))
        return room

    def new_messages(self, timeout: float | None = None) -> list[Message]:
        """Messages this session has not returned yet, oldest first.

        With ``timeout``, wait up to that many seconds for at least one, woken by the server's
        invalidations rather than by polling. Raises :class:`ZChatDisconnected` if the server is
        away (and, with ``timeout``, stays away that long).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._host.closed:
                raise ZChatConnectionError("the client of this session is closed")
            if not self._host.is_connected():
                remaining = 0.0 if deadline is None else deadline - time.monotonic()
                if not self._host.wait_connected(remaining):
                    raise disconnected(self._host.address_text)
            generation = self._host.generation()
            try:
                with server_boundary(self._host.address_text):
                    messages = self._poll()
            except ZChatDisconnected:  # the server went away mid-read: wait for it, if there is time
                if deadline is None or time.monotonic() >= deadline:
                    raise
                continue
            if messages or deadline is None:
                return messages
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._host.wait_for_change(generation, remaining)

    def _poll(self) -> list[Message]:
        started = time.perf_counter()
        found = self._collect()
        self._host.report("poll", room=self.room, cost=time.perf_counter() - started, count=len(found))
        return found

    def _collect(self) -> list[Message]:
        with self._lock:
            room = self._room()
            assert room.count is not None and room.heads is not None
            if self._epoch != room.epoch:
                self._cursor.clear()
                self._epoch = room.epoch
                if self._backlog is not None:
                    for writer, head in self._heads(room):
                        self._cursor[writer] = (head.count, head.last_key)
                    backlog, self._backlog = self._backlog, None
                    return self._history(room, backlog, None)
            if room.count() == sum(seen for seen, _ in self._cursor.values()):
                return []
            found: list[Message] = []
            cursor = dict(self._cursor)
            for writer, head in self._heads(room):
                seen, seen_key = cursor.get(writer, (0, None))
                if head.count > seen:
                    found.extend(self._read_stream(room, writer, seen_key, head.last_key))
                    cursor[writer] = (head.count, head.last_key)
            self._cursor = cursor  # only now: an outage mid-read must not skip anything
            found.sort(key=lambda m: m.key)
            return found

    def _heads(self, room: Room) -> list[tuple[str, _Head]]:
        """The room's writers and their heads, checked (another client may have written anything)."""
        assert room.heads is not None
        heads = []
        for writer, value in room.heads.items():
            try:
                heads.append((writer, _Head.check(value)))
            except ValueError as exc:
                if writer not in self._bad_heads:
                    self._bad_heads.add(writer)
                    self._skip(f"head of writer {writer!r:.40}", exc)
        return heads

    def _read_stream(
        self, room: Room, writer: str, after: tuple[float, str] | None, upto: tuple[float, str]
    ) -> list[Message]:
        assert room.streams is not None
        try:
            stream = room.streams[writer]
            entries = list(stream.items(after, upto, excludemin=after is not None))
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:  # a crafted or broken record: report it, keep the others going
            self._skip(f"stream {writer!r:.40} after {after}", exc)
            return []
        found = (self._check(record, where=f"{writer}@{key!r:.60}") for key, record in entries)
        return [m for m in found if m is not None]

    def _check(self, record: object, where: str) -> Message | None:
        try:
            return Message.from_record(record, self._host.max_text_bytes)
        except ValueError as exc:
            self._skip(where, exc)
            return None

    def _skip(self, where: str, exc: BaseException) -> None:
        while exc.__cause__ is not None and not str(exc):  # StateLoadError says nothing itself
            exc = exc.__cause__
        reason = f"{type(exc).__name__}: {exc}"
        log.warning("room %r: skipped unreadable record %s (%s)", self.room, where, reason)
        self.skipped.append((where, reason))

    def history(self, n: int = 200, before: Message | None = None) -> list[Message]:
        """The last ``n`` messages by time (before ``before``, if given), oldest first.

        Reads O(log N + n) of the tree, not all of it. Does not move the cursor.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"history(n) needs an int n >= 0, not {n!r}")
        with self._lock, server_boundary(self._host.address_text):
            return self._history(self._room(), n, before)

    def _history(self, room: Room, n: int, before: Message | None) -> list[Message]:
        heads = self._heads(room)
        if n == 0 or not heads:
            return []
        assert room.streams is not None
        top: tuple[float, str] | None = before.key if before is not None else None
        start = max(head.last for _, head in heads)
        if top is not None:
            start = min(start, top[0])
        oldest = min(head.first for _, head in heads)
        if self._host.is_connected():  # else the loads fail in ZEO's thread, where nobody hears them
            _prefetch_right_edges(room, [room.streams.get(writer) for writer, _ in heads])
        window = 1.0
        while True:
            # Only the streams that have messages between low and top; each read is O(log N).
            low = start - window
            items: list[tuple[Any, Any]] = []
            for writer, head in heads:
                if head.last < low or (top is not None and head.first > top[0]):
                    continue
                try:
                    stream = room.streams[writer]
                    items.extend(stream.items((low,), top, excludemax=top is not None))
                except transaction.interfaces.TransientError:
                    raise
                except Exception as exc:
                    self._skip(f"history of {writer!r:.40}", exc)
            if len(items) >= n or low < oldest:
                break
            # Widen the window to where n messages should be at the density just seen.
            window *= max(2.0, 1.2 * n / len(items)) if items else 4.0
        items.sort(key=lambda item: item[0])
        found = [self._check(record, where=f"{key!r:.60}") for key, record in items[-n:]]
        return [m for m in found if m is not None]

    # -- writing -------------------------------------------------------------------------

    def add_message(self, text: str) -> Message:
        """Commit ``text`` as a new message from this client's user and return it.

        Conflicts and server outages are retried within ``SendPolicy.timeout``; a retry after an
        outage never duplicates the message, even when the first commit's answer was lost.
        Raises :class:`InvalidMessageError` for bad text and :class:`ZChatSendError` when the
        message could not be committed in time (it was then not sent).
        """
        text = check_text(text, self._host.max_text_bytes)
        message = Message(uuid.uuid4().hex, self._host.user, text, float(self._host.clock()))
        return self.post(message)

    def draft(self, text: object, *, author: object = None, id: object = None) -> Message:
        """Build, without committing, a checked message of ``text`` stamped with the host's clock.

        :meth:`post` commits it; posting the same draft again never stores it twice, which is how
        a send whose answer was lost is retried. ``author`` is a display name checked like any
        user name (default: this client's user); ``id`` is a caller-made id of 1 to 32 letters,
        digits, ``-`` or ``_`` (default: a new one). Raises :class:`InvalidMessageError`.
        """
        text = check_text(text, self._host.max_text_bytes)
        author = self._host.user if author is None else check_author(author)
        return Message(check_message_id(id), author, text, float(self._host.clock()))

    def post(self, message: Message) -> Message:
        """Commit an already built message and return it as stored (idempotent, like a retry)."""
        writer = self._host.writer
        stored: list[Message] = []

        def append(conn: Connection) -> None:
            stored[:] = [self._room_in(conn).append(writer, message)]

        # One send at a time per writer: each stream's key order must be its commit order.
        with self._host.send_lock:
            self._commit(append, what=f"sending to room {self.room!r}")
        return stored[0]

    def _commit(self, change: Callable[[Connection], object], what: str) -> None:
        commit(self._host, change, what=what, room=self.room)

    # -- presence ------------------------------------------------------------------------

    def heartbeat(self, user: str | None = None) -> None:
        """Record that ``user`` (default: this client's user) is in the room now (the widget calls it)."""
        user, now = self._host.user if user is None else check_author(user), float(self._host.clock())

        def beat(conn: Connection) -> None:
            self._room_in(conn).beat(user, now)

        self._commit(beat, what=f"announcing presence in {self.room!r}")

    def present(self, within: float = 90.0) -> list[str]:
        """Users whose last heartbeat in this room is at most ``within`` seconds old."""
        with self._lock, server_boundary(self._host.address_text):
            return self._room().present(float(self._host.clock()) - within)

    def __repr__(self) -> str:
        return f"<ChatSession room={self.room!r} user={self._host.user!r}>"


def commit(
    host: SessionHost,
    change: Callable[[Connection], _T],
    *,
    what: str,
    room: str = "",
    undone: str = "the message was not sent",
) -> _T:
    """Run ``change(conn)`` in a fresh transaction of this thread and commit it; return its result.

    The one retry loop of every write: conflicts are retried with a random pause, and a server
    that is away is waited for, within ``host.policy``; then :class:`ZChatSendError` says ``what``
    failed and ``undone``. ``change`` must be safe to run again: after an outage the first commit
    may or may not have happened.
    """
    policy = host.policy
    deadline = time.monotonic() + policy.timeout
    tm, conn = host.connection()
    conflicts = 0
    last_error: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not host.wait_connected(remaining):
            raise ZChatSendError(
                f"{what} failed: no answer from the ZEO server at {host.address_text} "
                f"within {policy.timeout:g} s; {undone}. Check the server (`zchat-nb status`) "
                "and try again"
            ) from last_error
        try:
            started = time.perf_counter()
            tm.begin()
            result = change(conn)
            tm.commit()
            latency = time.perf_counter() - started
            host.report("commit", room=room, what=what, latency=latency, conflicts=conflicts)
            return result
        except ConflictError as exc:
            tm.abort()
            conflicts += 1
            last_error = exc
            if conflicts > policy.max_conflicts:
                raise ZChatSendError(
                    f"{what} failed: {conflicts} write conflicts in a row; {undone}. Try again"
                ) from exc
            pause = random.uniform(0, min(policy.backoff, policy.backoff * 2**conflicts / 32))
            time.sleep(pause)  # a random pause so that conflicting writers stop colliding
        except transaction.interfaces.TransientError as exc:
            # ClientDisconnected: the commit may or may not have happened; retrying is safe
            # because `change` is.
            tm.abort()
            last_error = exc
        except BaseException:
            tm.abort()
            raise
