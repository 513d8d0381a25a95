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

import collections
import dataclasses
import heapq
import itertools
import logging
import math
import random
import reprlib
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import transaction
from BTrees.Length import Length
from BTrees.OOBTree import OOBTree
from persistent import Persistent
from ZODB.POSException import ConflictError, StorageError

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
ROOMS_KEY = "zchat_nb.rooms"
#: Most messages one ``new_messages()`` call returns; the rest come with the next calls.
MAX_PER_CALL = 1000
#: Most writers' heads one ``new_messages()`` call examines; the next call goes on from there.
MAX_HEADS_PER_CALL = 5000
#: Most entries of ``skipped`` kept (the newest), and the longest reason kept.
MAX_SKIPPED = 100
_MAX_REASON = 300
#: Skips logged per session; the rest are only counted in ``skipped``.
_LOGGED_SKIPS = 10

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
        so that each stream's key order is its commit order. A message that is already the
        stream's last (a retried send whose first commit did happen) is left alone.
        """
        assert self.streams is not None and self.heads is not None and self.count is not None
        stream = self.streams.get(writer)
        if stream is None:
            stream = self.streams[writer] = OOBTree()
        count, first, last, last_id = self.heads.get(writer, (0, message.time, -math.inf, ""))
        if last_id == message.id:
            return Message.from_record(stream[(last, last_id)])
        # A retry whose first commit did happen, with messages sent after it: stored at its time or
        # (moved past a clock that went back) later; retries come within seconds.
        for key, record in itertools.islice(stream.items((message.time,)), 1000):
            if type(key) is tuple and len(key) == 2 and key[1] == message.id:
                return Message.from_record(record)
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
        """Users whose heartbeat is at least ``since``; entries that are not (str, float) are ignored."""
        if self.presence is None:
            return []
        return sorted(
            user
            for user, when in itertools.islice(self.presence.items(), MAX_HEADS_PER_CALL)
            if type(user) is str and type(when) is float and math.isfinite(when) and when >= since
        )

    def clear(self) -> None:
        """Forget every message (a teacher's reset); readers notice through :attr:`epoch`."""
        self._new_trees()
        self.epoch += 1

    def __repr__(self) -> str:
        return f"<Room {self.name!r}>"


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
        if not (type(count) is int and count > 0 and type(last_id) is str and len(last_id) <= _ID_CHARS):
            raise ValueError(f"bad head {_capped(value)}")
        if not (
            type(first) is float and type(last) is float and math.isfinite(first) and math.isfinite(last)
        ):
            raise ValueError(f"bad head times {_capped(value)}")
        if first > last:
            raise ValueError(f"head's first time is after its last {_capped(value)}")
        return cls(count, first, last, last_id)


def _capped(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters; a repr that fails (too deep, crafted) says so."""
    try:
        text = reprlib.repr(value)
    except Exception as exc:
        text = f"<unprintable {type(value).__name__}: {type(exc).__name__}>"
    return text[:limit]


def _epoch_of(room: Room) -> int | str:
    """The room's epoch if it is an int; anything else (NaN never equals itself) as a stable str."""
    epoch = room.epoch
    return epoch if type(epoch) is int else f"bad epoch {_capped(epoch)}"


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


def _is_key(key: object) -> bool:
    """Whether ``key`` is a stream key ``(time, id)`` as writers store them."""
    return type(key) is tuple and len(key) == 2 and type(key[0]) is float and type(key[1]) is str


def _count_of(room: Room) -> int:
    try:
        count = room.count() if room.count is not None else 0
    except Exception:  # not a Length after all
        return -1
    return count if type(count) is int else -1


def find_room(rooms: object, name: str) -> Room | None:
    """``rooms[name]`` or None; a tree another client filled with keys of other types is searched."""
    if rooms is None:
        return None
    if not isinstance(rooms, OOBTree):
        raise TypeError(f"the rooms tree is a {type(rooms).__name__}, not an OOBTree")
    try:
        return rooms.get(name)
    except TypeError:  # a key that does not compare with str: look at the str keys one by one
        for key, room in itertools.islice(rooms.items(), 10 * MAX_HEADS_PER_CALL):
            if type(key) is str and key == name:
                return room
        return None


def rooms_of(conn: Connection) -> OOBTree:
    """The ``name -> Room`` tree of a database, or a new one (the caller commits)."""
    root = conn.root()
    rooms = root.get(ROOMS_KEY)
    if rooms is None:
        rooms = root[ROOMS_KEY] = OOBTree()
    return rooms


def room_names(rooms: object) -> list[str]:
    """The names in a rooms tree, skipping keys that are not room names (another client's doing)."""
    if not isinstance(rooms, OOBTree):
        return []
    return [
        key
        for key in itertools.islice(rooms.keys(), 10 * MAX_HEADS_PER_CALL)
        if type(key) is str and 0 < len(key) <= MAX_ROOM_CHARS
    ]


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
        self._epoch: int | str | None = None
        self._backlog = backlog
        self._lock = threading.RLock()
        #: Records that failed validation or could not be loaded, as ``(where, reason)``: the
        #: newest :data:`MAX_SKIPPED`, reasons cut to a few hundred characters.
        self.skipped: collections.deque[tuple[str, str]] = collections.deque(maxlen=MAX_SKIPPED)
        self._skips = 0
        self._reported: set[str] = set()
        #: Where the next call starts examining heads: ``(writer, inclusive)``, None: the beginning.
        self._heads_from: tuple[str, bool] | None = None

    # -- reading -------------------------------------------------------------------------

    def _room(self) -> Room | None:
        """Begin a transaction on this thread's connection and return the room, creating it.

        A room whose record cannot be loaded or is not a Room is reported in ``skipped`` (once)
        and gives None: a broken room must not break its readers, nor the other rooms.
        """
        tm, conn = self._host.connection()
        tm.begin()
        try:
            room = find_room(conn.root().get(ROOMS_KEY), self.room)
            if room is None:
                self._create_room()
                tm.begin()
                room = find_room(conn.root().get(ROOMS_KEY), self.room)
            if not isinstance(room, Room):
                raise TypeError(f"the room's record is a {type(room).__name__}, not a Room")
            if not (isinstance(room.streams, OOBTree) and isinstance(room.heads, OOBTree)):
                raise TypeError("the room's streams or heads are not BTrees")
            if not isinstance(room.count, Length):
                raise TypeError("the room's count is not a Length")
            return room
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:
            self._skip(f"room {self.room!r}", exc, once=True)
            return None

    def _create_room(self) -> None:
        self._commit(self._room_in, what=f"creating room {self.room!r}")

    def _room_in(self, conn: Connection) -> Room:
        """The room in ``conn``'s current transaction, added to it if missing (the caller commits)."""
        rooms = rooms_of(conn)
        room = find_room(rooms, self.room)
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
            if room is None:
                return []
            epoch = _epoch_of(room)
            if self._epoch != epoch:
                if isinstance(epoch, str):
                    self._skip(f"epoch of room {self.room!r}", ValueError(epoch), once=True)
                self._cursor.clear()
                self._epoch = epoch
                self._heads_from = None
                if self._backlog is not None:
                    for writer, head in self._heads(room):
                        self._cursor[writer] = (head.count, head.last_key)
                    backlog, self._backlog = self._backlog, None
                    return self._history(room, backlog, None)
            if _count_of(room) == sum(seen for seen, _ in self._cursor.values()):
                return []
            found: list[Message] = []
            cursor = dict(self._cursor)
            heads, resume = self._heads_slice(room)
            for writer, head in heads:
                seen, seen_key = cursor.get(writer, (0, None))
                if head.count <= seen:
                    continue
                messages, consumed, last_key = self._read_stream(
                    room, writer, seen_key, head.last_key, MAX_PER_CALL - len(found)
                )
                found.extend(messages)
                cursor[writer] = (
                    (head.count, head.last_key) if last_key is None else (seen + consumed, last_key)
                )
                if len(found) >= MAX_PER_CALL:  # the rest with the next call, from this writer on
                    resume = (writer, True)
                    break
            self._heads_from = resume
            self._cursor = cursor  # only now: an outage mid-read must not skip anything
            found.sort(key=lambda m: m.key)
            return found

    def _heads(self, room: Room, limit: int = MAX_HEADS_PER_CALL) -> list[tuple[str, _Head]]:
        """The room's writers and their heads (the first ``limit``), checked."""
        assert room.heads is not None
        return self._checked_heads(itertools.islice(room.heads.items(), limit))

    def _heads_slice(self, room: Room) -> tuple[list[tuple[str, _Head]], tuple[str, bool] | None]:
        """Up to MAX_HEADS_PER_CALL heads, from where the last call stopped, wrapping around.

        Returns the heads and where the next call should start (None: from the beginning).
        """
        assert room.heads is not None
        heads, cap = room.heads, MAX_HEADS_PER_CALL
        try:
            if self._heads_from is None:
                entries = list(itertools.islice(heads.items(), cap))
            else:
                start, inclusive = self._heads_from
                entries = list(itertools.islice(heads.items(start, excludemin=not inclusive), cap))
                if len(entries) < cap:  # wrap around
                    entries += itertools.islice(
                        heads.items(None, start, excludemax=inclusive), cap - len(entries)
                    )
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:  # keys another client made incomparable: start over
            self._skip(f"heads of room {self.room!r}", exc, once=True)
            entries = list(itertools.islice(room.heads.items(), MAX_HEADS_PER_CALL))
        last = entries[-1][0] if entries else None
        resume = (last, False) if len(entries) == cap and type(last) is str else None
        return self._checked_heads(entries), resume

    def _checked_heads(self, entries: Iterable[tuple[object, object]]) -> list[tuple[str, _Head]]:
        heads = []
        try:
            for writer, value in entries:
                try:
                    if not (type(writer) is str and 0 < len(writer) <= _ID_CHARS):
                        raise ValueError("the writer's key is not a short str")
                    heads.append((writer, _Head.check(value)))
                except Exception as exc:
                    self._skip(f"head of writer {_capped(writer, 40)}", exc, once=True)
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:  # a heads bucket that does not load
            self._skip(f"heads of room {self.room!r}", exc, once=True)
        return heads

    def _read_stream(
        self, room: Room, writer: str, after: tuple[float, str] | None, upto: tuple[float, str], limit: int
    ) -> tuple[list[Message], int, tuple[float, str] | None]:
        """At most ``limit`` messages of ``writer`` after ``after`` up to ``upto``.

        Returns the messages, how many entries were consumed, and the key of the last one if the
        stream has more up to ``upto`` (None if it was read to the end).
        """
        assert room.streams is not None
        try:
            stream = room.streams.get(writer)
            if not isinstance(stream, OOBTree):
                raise TypeError(f"the stream is a {type(stream).__name__}, not an OOBTree")
            part = stream.items(after, upto, excludemin=after is not None)
            entries = list(itertools.islice(part, limit + 1))
        except transaction.interfaces.TransientError:
            raise
        except Exception as exc:  # a crafted or broken record: report it, keep the others going
            self._skip(f"stream {writer!r:.40} after {_capped(after)}", exc)
            return [], 0, None
        more = len(entries) > limit
        entries = entries[:limit]
        found = (self._check(record, where=f"{writer}@{_capped(key, 60)}") for key, record in entries)
        messages = [m for m in found if m is not None]
        return messages, len(entries), (entries[-1][0] if more and entries else None)

    def _check(self, record: object, where: str) -> Message | None:
        try:
            return Message.from_record(record, self._host.max_text_bytes)
        except Exception as exc:  # any type: a crafted record may raise anything when inspected
            self._skip(where, exc)
            return None

    def _skip(self, where: str, exc: BaseException, *, once: bool = False) -> None:
        """Report an unreadable record in ``skipped`` (capped) and, for the first few, in the log."""
        if once:
            if where in self._reported:
                return
            if len(self._reported) > 10 * MAX_SKIPPED:
                self._reported.clear()
            self._reported.add(where)
        while exc.__cause__ is not None and not str(exc):  # StateLoadError says nothing itself
            exc = exc.__cause__
        try:
            reason = f"{type(exc).__name__}: {exc}"[:_MAX_REASON]
        except Exception:
            reason = type(exc).__name__
        self._skips += 1
        if self._skips <= _LOGGED_SKIPS:
            log.warning("room %r: skipped unreadable record %s (%s)", self.room, where[:200], reason)
            if self._skips == _LOGGED_SKIPS:
                log.warning("room %r: further unreadable records are only listed in .skipped", self.room)
        self.skipped.append((where[:200], reason))

    def history(self, n: int = 200, before: Message | None = None) -> list[Message]:
        """The last ``n`` messages by time (before ``before``, if given), oldest first.

        Reads O(log N + n) of the tree, not all of it. Does not move the cursor. Looks at the
        first :data:`MAX_HEADS_PER_CALL` writers of the room.
        """
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"history(n) needs an int n >= 0, not {n!r}")
        with self._lock, server_boundary(self._host.address_text):
            room = self._room()
            return [] if room is None else self._history(room, n, before)

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
        try:
            if self._host.is_connected():  # else the loads fail in ZEO's thread, where nobody hears them
                _prefetch_right_edges(room, [room.streams.get(writer) for writer, _ in heads])
        except transaction.interfaces.TransientError:
            raise
        except Exception:  # only a speed-up: the reads below report what does not load
            log.debug("prefetching the recent ends of the streams failed", exc_info=True)
        # The window [start - window, top) grows until it holds n messages, and shrinks while one
        # stream alone has more than n in it (ascending reads of n + 1 then miss its newest). The
        # bounds met so far make it a bisection, so it ends; a crafted stream (many messages at one
        # time) may still overflow after the last round: then it is cut, and reported.
        window, too_small, too_big = 1.0, 0.0, math.inf
        overflowing: list[str] = []
        items: list[tuple[Any, Any]] = []
        for _round in range(64):
            low = start - window
            items, overflowing = [], []
            for writer, head in heads:
                if head.last < low or (top is not None and head.first > top[0]):
                    continue
                try:
                    stream = room.streams[writer]
                    part = stream.items((low,), top, excludemax=top is not None)
                    entries = list(itertools.islice(part, n + 1))
                except transaction.interfaces.TransientError:
                    raise
                except Exception as exc:
                    self._skip(f"history of {writer!r:.40}", exc, once=True)
                    continue
                if len(entries) > n:
                    overflowing.append(writer)
                items.extend(entries)
            if overflowing:
                too_big = window
            elif len(items) >= n or low < oldest:
                break
            else:
                too_small = window
            if overflowing:
                window = (too_small + too_big) / 2 if too_small else window / 4
            else:  # widen to where n messages should be at the density just seen
                wider = window * (max(2.0, 1.2 * n / len(items)) if items else 4.0)
                window = min(wider, (too_small + too_big) / 2) if too_big < math.inf else wider
        for writer in overflowing:
            self._skip(f"history of {writer!r:.40}", ValueError("too many messages at one time"), once=True)
        keyed = [item for item in items if _is_key(item[0])]
        keyed.sort(key=lambda item: item[0])
        found = [self._check(record, where=_capped(key, 60)) for key, record in keyed[-n:]]
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

    def heartbeat(self) -> None:
        """Record that this client's user is in the room now (the widget calls it periodically)."""
        user, now = self._host.user, float(self._host.clock())

        def beat(conn: Connection) -> None:
            self._room_in(conn).beat(user, now)

        self._commit(beat, what=f"announcing presence in {self.room!r}")

    def present(self, within: float = 90.0) -> list[str]:
        """Users whose last heartbeat in this room is at most ``within`` seconds old."""
        with self._lock, server_boundary(self._host.address_text):
            room = self._room()
            return [] if room is None else room.present(float(self._host.clock()) - within)

    def __repr__(self) -> str:
        return f"<ChatSession room={self.room!r} user={self._host.user!r}>"


def commit(
    host: SessionHost,
    change: Callable[[Connection], _T],
    *,
    what: str,
    room: str = "",
    undone: str = "the message was not sent",
    maybe: str = "it may have been sent; send the same Message again (ChatSession.post): it is never doubled",
) -> _T:
    """Run ``change(conn)`` in a fresh transaction of this thread and commit it; return its result.

    The one retry loop of every write: conflicts are retried with a random pause, and a server
    that is away is waited for, within ``host.policy``; then :class:`ZChatSendError` says ``what``
    failed and ``undone`` or, when an attempt's answer was lost (it may have been committed),
    ``maybe``. A storage error on the server (disk full...) is a ZChatSendError saying so.
    ``change`` must be safe to run again: after an outage the first commit may or may not have
    happened.
    """
    policy = host.policy
    deadline = time.monotonic() + policy.timeout
    tm, conn = host.connection()
    conflicts = 0
    last_error: BaseException | None = None
    answer_lost = False
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not host.wait_connected(remaining):
            outcome = (
                maybe if answer_lost else f"{undone}. Check the server (`zchat-nb status`) and try again"
            )
            raise ZChatSendError(
                f"{what} failed: no answer from the ZEO server at {host.address_text} "
                f"within {policy.timeout:g} s; {outcome}"
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
            answer_lost = True
        except StorageError as exc:  # the server's storage failed (disk full, read-only...)
            tm.abort()
            raise ZChatSendError(
                f"{what} failed: the server could not store it ({str(exc)[:200]}); {undone}. "
                "Check the server's disk space and its log"
            ) from exc
        except BaseException:
            tm.abort()
            raise
